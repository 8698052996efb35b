"""Activation checkpointing of every n-th transformer block."""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def apply_gradient_checkpointing(transformer: torch.nn.Module, interval: int = 1) -> int:
    """Recompute block i's activations in backward when i % interval == 0; returns how many blocks."""
    count = 0
    for i, blk in enumerate(transformer_blocks(transformer)):
        if i % interval:
            continue
        forward = blk.forward

        @functools.wraps(forward)
        def wrapped(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        blk.forward = wrapped
        count += 1
    return count
