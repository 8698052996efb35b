"""Faster CUDA graph recording for blocks compiled one by one (``train.dynamo_mode`` reduce-overhead). No Ray import.

Inductor's CUDA graph trees record one graph per compiled block call: 57 forward and 57 backward graphs in one
path for FLUX.1-dev. Recording a graph asks, for each of its static inputs and outputs, whether the tensor is the
output of an earlier graph in the path (``CUDAGraphNode._is_cuda_graph_recorded_tensor`` and
``_is_alias_of_live_recorded_tensor``), and answers by walking every output of every earlier graph in Python:
quadratic in the path. A cold or warm process spent 18-22 s of its third step recording through Ray, most of it
there (bench/RESULTS.md calls 40-41: cProfile of the warm-up steps, 19 M weak-reference checks).

``install()`` replaces the two lookups with the same answers found through a set of each graph's output
pointers: a graph's outputs are appended once, after its recording, and only ever replaced by a wrapper of the
same storage (``_initialize_cached_tensors``), so a pointer set keyed on the list's length is exact. Where the set
holds the pointer, the graph's outputs are walked in order as before (liveness included), so the first live
alias found is the one torch's loop finds. Installed only over the torch functions this was checked against
(their source is compared); any other version keeps torch's own. The bare step at 512 px recorded in 3.95 s
instead of 14.71 s with the same losses (call 43); through Ray a cold run's third step took 2.3-4.2 s instead
of 18-22 s, and in ``check`` mode 20,000 lookups of a 1-GPU run gave torch's answers (calls 44-47). On by default
(``FLUX_RAY_FAST_GRAPH_RECORDING=0``: torch's own; core/compile.py).
"""
from __future__ import annotations

import hashlib
import inspect
import logging

from torch._inductor import cudagraph_trees
from torch._inductor.cudagraph_trees import maybe_deref

log = logging.getLogger("flux_ray.cudagraph")

# sha256 (first 16 hex) of the replaced methods' source in the torch versions checked (2.11, 2.13)
CHECKED = {
    "_is_cuda_graph_recorded_tensor": {"1014837d2e4df0d8"},
    "_is_alias_of_live_recorded_tensor": {"a2039ec1ec4bbfb8", "d4caf01f5d492878"},
}


def source_digest(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]


def _output_ptrs(node) -> frozenset:
    """The data pointers of a graph node's outputs, cached until its output list grows."""
    refs = node.outputs_weakrefs
    cached = node.__dict__.get("_flux_ray_ptrs")
    if cached is None or cached[0] != len(refs):
        cached = (len(refs), frozenset(r.data_ptr() for r in refs if r is not None))
        node.__dict__["_flux_ray_ptrs"] = cached
    return cached[1]


def is_cuda_graph_recorded_tensor(self, t) -> bool:
    "Is this tensor an output of a node in this path"
    ptr = t.untyped_storage().data_ptr()
    return any(ptr in _output_ptrs(node) for node in self._path_from_root)


def is_alias_of_live_recorded_tensor(self, t):
    "The (depth, output index) of the first live output in this path that shares the tensor's storage, or None"
    ptr = t.untyped_storage().data_ptr()
    for depth, node in enumerate(self._path_from_root):
        if ptr not in _output_ptrs(node):
            continue
        for output_index, storage_ref in enumerate(node.outputs_weakrefs):
            if storage_ref is not None and storage_ref.data_ptr() == ptr and maybe_deref(storage_ref) is not None:
                return (depth, output_index)
    return None


REPLACEMENTS = {"_is_cuda_graph_recorded_tensor": is_cuda_graph_recorded_tensor,
                "_is_alias_of_live_recorded_tensor": is_alias_of_live_recorded_tensor}
for _fn in REPLACEMENTS.values():
    _fn.flux_ray = True  # installed already (as themselves, or wrapped by the check mode)
CHECKS = {"lookups": 0}
"""How many lookups the ``check`` mode answered both ways (all equal, or it raised)."""


def _checked(name: str, ours, torchs):
    """Both answers, compared; torch's is returned. A difference raises naming the lookup and both answers."""
    def lookup(self, t):
        mine, theirs = ours(self, t), torchs(self, t)
        if mine != theirs:
            raise RuntimeError(f"flux_ray's {name} answered {mine!r} where torch's answered {theirs!r}: set "
                               "FLUX_RAY_FAST_GRAPH_RECORDING=0 (torch's lookups) and report this")
        CHECKS["lookups"] += 1
        if CHECKS["lookups"] % 5000 == 0:
            log.warning("CUDA graph lookups: %d answered by flux_ray's and torch's code alike", CHECKS["lookups"])
        return theirs
    lookup.flux_ray = True
    return lookup


def install(check: bool = False) -> bool:
    """Replace the two lookups on ``CUDAGraphNode`` when torch's are the checked ones; returns whether it did.
    ``check``: answer with torch's and compare each answer with ours (slow: torch's walk plus ours)."""
    cls = cudagraph_trees.CUDAGraphNode
    current = {name: getattr(cls, name, None) for name in REPLACEMENTS}
    if all(getattr(fn, "flux_ray", False) for fn in current.values()):
        return True
    for name, fn in current.items():
        if fn is None or source_digest(fn) not in CHECKED[name]:
            log.info("CUDA graph trees' %s is not a version flux_ray checked: recording keeps torch's lookups", name)
            return False
    for name, fn in REPLACEMENTS.items():
        setattr(cls, name, _checked(name, fn, current[name]) if check else fn)
    return True
