"""core/cudagraph_lookup.py: the faster lookups give torch's own answers, and install only over checked code."""
from __future__ import annotations

import random

import pytest
import torch
from torch._inductor import cudagraph_trees

from flux_ray.core import cudagraph_lookup

ORIGINAL = {name: getattr(cudagraph_trees.CUDAGraphNode, name) for name in cudagraph_lookup.REPLACEMENTS}


class Node:
    """The parts of a CUDAGraphNode both lookups read: its outputs' weak references, its parent, its path."""

    def __init__(self, parent: "Node | None"):
        self.parent, self.outputs_weakrefs = parent, []
        self.path_weakrefs = [n.outputs_weakrefs for n in self._path_from_root]  # as CUDAGraphNode builds it

    @property
    def _path_from_root(self):
        nodes, node = [], self
        while node:
            nodes.append(node)
            node = node.parent
        yield from reversed(nodes)


@pytest.fixture
def restore_torch():
    yield
    for name, fn in ORIGINAL.items():
        setattr(cudagraph_trees.CUDAGraphNode, name, fn)


def test_install_replaces_checked_lookups_only(restore_torch, monkeypatch):
    assert cudagraph_lookup.install()  # this torch's lookups are among the checked ones
    for name, fn in cudagraph_lookup.REPLACEMENTS.items():
        assert getattr(cudagraph_trees.CUDAGraphNode, name) is fn
    assert cudagraph_lookup.install()  # again: nothing to do
    for name, fn in ORIGINAL.items():
        setattr(cudagraph_trees.CUDAGraphNode, name, fn)
    monkeypatch.setitem(cudagraph_lookup.CHECKED, "_is_alias_of_live_recorded_tensor", {"0" * 16})
    assert not cudagraph_lookup.install()  # an unchecked version keeps torch's
    for name, fn in ORIGINAL.items():
        assert getattr(cudagraph_trees.CUDAGraphNode, name) is fn


def _same_answers(nodes, queries) -> None:
    for n in nodes:
        for q in queries:
            for name, fn in cudagraph_lookup.REPLACEMENTS.items():
                assert fn(n, q) == ORIGINAL[name](n, q), name


def _dead_ref_at(ptr: int) -> cudagraph_trees.StorageWeakRefWrapper:
    """A weak reference to a storage that has died, recorded at ``ptr`` (its memory now another tensor's)."""
    ghost = torch.randn(3)
    ref = cudagraph_trees.StorageWeakRefWrapper(ghost)
    ref._data_ptr = ptr
    del ghost
    assert ref() is None
    return ref


def test_lookups_answer_as_torch_does():
    """Outputs that are None (static outputs), an alias of an earlier output (a view: same storage), a dead
    output recorded at the address a live one now holds, outputs added after a lookup; queried from every node
    with the outputs, views of them and tensors outside the path (parameters)."""
    a, b, c, param = torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(4)
    root = Node(None)
    wrap = cudagraph_trees.StorageWeakRefWrapper
    root.outputs_weakrefs += [None, _dead_ref_at(b.untyped_storage().data_ptr()), wrap(a)]
    mid = Node(root)
    mid.outputs_weakrefs += [wrap(b), wrap(a[1:])]
    leaf = Node(mid)
    queries = [a, a[2:], b, b[:1], c, param]
    _same_answers([root, mid, leaf], queries)
    assert cudagraph_lookup.is_alias_of_live_recorded_tensor(leaf, b) == (1, 0)  # not the dead (0, 1)
    assert cudagraph_lookup.is_alias_of_live_recorded_tensor(leaf, a[2:]) == (0, 2)  # the first alias
    recorded = cudagraph_lookup.is_cuda_graph_recorded_tensor
    assert recorded(leaf, b) and not recorded(leaf, c)
    leaf.outputs_weakrefs.append(wrap(c))  # a graph's outputs come after lookups
    _same_answers([root, mid, leaf], queries)
    assert cudagraph_lookup.is_alias_of_live_recorded_tensor(leaf, c) == (2, 0)

    rng = random.Random(0)  # and a longer random path
    keep, nodes, queries = [], [], [param]
    parent = None
    for _ in range(10):
        node = Node(parent)
        nodes.append(node)
        _same_answers(nodes, queries)  # before this node has outputs
        for _ in range(rng.randint(0, 6)):
            kind = rng.random()
            if kind < 0.15:
                node.outputs_weakrefs.append(None)
            elif kind < 0.25 and keep:
                node.outputs_weakrefs.append(_dead_ref_at(rng.choice(keep).untyped_storage().data_ptr()))
            else:
                base = rng.choice(keep) if kind < 0.4 and keep else torch.randn(rng.randint(2, 5))
                out = base[1:]  # a view: an alias when ``base`` is an earlier output
                node.outputs_weakrefs.append(cudagraph_trees.StorageWeakRefWrapper(out))
                keep.append(out)
                queries += [out, out[:1]]
        parent = node
        _same_answers(nodes, queries)


def test_check_mode_answers_as_torch_and_raises_on_a_difference(restore_torch):
    """``check``: torch's answer returned, ours compared (counted); a stale pointer set makes ours differ."""
    cls = cudagraph_trees.CUDAGraphNode
    assert cudagraph_lookup.install(check=True)
    for name in cudagraph_lookup.REPLACEMENTS:
        assert getattr(cls, name).flux_ray and getattr(cls, name) is not cudagraph_lookup.REPLACEMENTS[name]
    assert cudagraph_lookup.install()  # already installed (checking): left as it is
    a, c = torch.randn(4), torch.randn(4)
    root = Node(None)
    root.outputs_weakrefs.append(cudagraph_trees.StorageWeakRefWrapper(a))
    leaf = Node(root)
    before = cudagraph_lookup.CHECKS["lookups"]
    assert cls._is_cuda_graph_recorded_tensor(leaf, a) and not cls._is_cuda_graph_recorded_tensor(leaf, c)
    assert cls._is_alias_of_live_recorded_tensor(leaf, a[1:]) == (0, 0)
    assert cudagraph_lookup.CHECKS["lookups"] == before + 3
    root.__dict__["_flux_ray_ptrs"] = (1, frozenset())  # a pointer set that missed an output
    with pytest.raises(RuntimeError, match="_is_cuda_graph_recorded_tensor answered False where torch's answered True"):
        cls._is_cuda_graph_recorded_tensor(leaf, a)
    with pytest.raises(RuntimeError, match="_is_alias_of_live_recorded_tensor answered None"):
        cls._is_alias_of_live_recorded_tensor(leaf, a)


@pytest.mark.parametrize("env, mode, installed", [(None, "reduce-overhead", True), ("0", "reduce-overhead", False),
                                                  ("1", "reduce-overhead", True), ("check", "reduce-overhead", "check"),
                                                  (None, None, False), ("1", None, False)])
def test_compile_blocks_installs_them_when_asked(restore_torch, monkeypatch, env, mode, installed):
    """With a CUDA-graph mode, unless FLUX_RAY_FAST_GRAPH_RECORDING=0; check: the comparing lookups (torch.compile
    is lazy: nothing compiles)."""
    from flux_ray.core.compile import FAST_RECORDING_ENV, compile_blocks
    from flux_ray.core.model import build_transformer_from_config
    from flux_ray.core.tiny import TINY_TRANSFORMER

    if env is None:
        monkeypatch.delenv(FAST_RECORDING_ENV, raising=False)
    else:
        monkeypatch.setenv(FAST_RECORDING_ENV, env)
    model = build_transformer_from_config(dict(TINY_TRANSFORMER, num_layers=1, num_single_layers=1), "cpu",
                                          torch.float32, seed=0)
    compile_blocks(model, backend="eager", mode=mode)
    for name, fn in cudagraph_lookup.REPLACEMENTS.items():
        now = getattr(cudagraph_trees.CUDAGraphNode, name)
        if installed == "check":
            assert getattr(now, "flux_ray", False) and now is not fn
        else:
            assert (now is fn) == installed
