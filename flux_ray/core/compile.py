"""Regional torch.compile: each transformer block compiled on its own (one graph, reused).

Blocks of one kind share their compiled code: 4 graphs a shape (first double block, whose input needs no
grad; the other double blocks; first single block, whose input strides differ; the others), plus one
variant a kind where checkpointing wraps every n-th block (the checkpoint is traced into the graph).
Caveat (bench/RESULTS.md, call 2 and 3): inductor's on-disk cache key does not include the SDPA backend
that ``sdpa_kernel`` selected, so a node that compiled these blocks under one ``train.attention_backend``
serves that graph to a later run asking for another. Clear TORCHINDUCTOR_CACHE_DIR when switching.
"""
from __future__ import annotations

import functools
import os

import torch

from flux_ray.core.checkpointing import transformer_blocks
from flux_ray.spec import CUDA_GRAPH_MODES


FAST_RECORDING_ENV = "FLUX_RAY_FAST_GRAPH_RECORDING"
"""In the workers' environment: ``1`` (the default) core/cudagraph_lookup.py's lookups while CUDA graphs record;
``0`` torch's own; ``check`` torch's answers, each compared with ours (a difference raises)."""


def _has_subclass_weights(module: torch.nn.Module) -> bool:
    """Quantized bases hold tensor subclasses (quanto, torchao, bitsandbytes) as weights."""
    return any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in module.parameters())


def _unaliased(forward):
    """A single block returns two slices of one tensor. AOT autograd cannot compile a graph whose outputs
    alias each other when its inputs include tensor subclasses ("ANY output aliasing ... is currently
    unsupported"), so a quantized block returns copies (two activation-sized copies; the weights dominate).
    Wrapped into ``forward`` itself: dynamo traces a module's forward hooks as a graph of their own."""
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out
    return wrapped


def compile_blocks(transformer: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile each block in place (``backend`` other than inductor: tests of the capture on a CPU; ``mode``:
    torch.compile's, e.g. reduce-overhead for CUDA graphs of each block)."""
    fast = os.environ.get(FAST_RECORDING_ENV, "1")
    if mode in CUDA_GRAPH_MODES and fast in ("1", "check"):
        from flux_ray.core.cudagraph_lookup import install  # CUDA graph trees: record the blocks' graphs faster

        install(check=fast == "check")
    blocks, singles = transformer_blocks(transformer), set(transformer.single_transformer_blocks)
    for blk in blocks:
        if blk in singles and _has_subclass_weights(blk):
            blk.forward = _unaliased(blk.forward)
        blk.compile(backend=backend, mode=mode)
    return len(blocks)
