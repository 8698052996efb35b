"""Regional torch.compile: each transformer block compiled on its own (one graph, reused).

Blocks of one kind share their compiled code: 4 graphs a shape (first double block, whose input needs no
grad; the other double blocks; first single block, whose input strides differ; the others), plus one
variant a kind where checkpointing wraps every n-th block (the checkpoint is traced into the graph).
Caveat (bench/RESULTS.md, call 2 and 3): inductor's on-disk cache key does not include the SDPA backend
that ``sdpa_kernel`` selected, so a node that compiled these blocks under one ``train.attention_backend``
serves that graph to a later run asking for another. Clear TORCHINDUCTOR_CACHE_DIR when switching.
"""
from __future__ import annotations

import torch

from flux_ray.core.checkpointing import transformer_blocks


def compile_blocks(transformer: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile each block in place (``backend`` other than inductor: tests of the capture on a CPU)."""
    blocks = transformer_blocks(transformer)
    for blk in blocks:
        blk.compile(backend=backend)
    return len(blocks)
