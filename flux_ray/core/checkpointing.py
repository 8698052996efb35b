"""Activation checkpointing of every n-th transformer block.

The recomputation runs in backward, outside the forward's ``sdpa_kernel`` context (FluxLossFn enters it
around the forward only). Left alone it would pick PyTorch's default SDPA kernel, not the one the
forward used (the default picked cuDNN attention, which crashed Flux steps on H200), and the
checkpoint's saved-tensor check fails on the mismatch. So the eager recomputation re-enters the SDPA
backends the forward ran under. Under torch.compile (core/compile.py compiles each block after this
wraps it) the checkpoint is traced into the block's graph, recomputed inside the compiled backward,
and needs no such context.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def _same_sdpa_backends_on_recompute():
    """context_fn for checkpoint: the recomputation runs under the forward's SDPA backends."""
    from torch.nn.attention import _cur_sdpa_kernel_backends, sdpa_kernel

    backends = _cur_sdpa_kernel_backends()
    return contextlib.nullcontext(), sdpa_kernel(backends) if backends else contextlib.nullcontext()


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
            if torch.compiler.is_compiling():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, context_fn=_same_sdpa_backends_on_recompute,
                              **kwargs)

        blk.forward = wrapped
        count += 1
    return count
