"""Regional torch.compile: each transformer block compiled on its own (one graph, reused)."""
from __future__ import annotations

import torch

from flux_ray.core.checkpointing import transformer_blocks


def compile_blocks(transformer: torch.nn.Module) -> int:
    blocks = transformer_blocks(transformer)
    for blk in blocks:
        blk.compile()
    return len(blocks)
