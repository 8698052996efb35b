"""train/base_cache.py's premise, on the tiny Flux with compiled blocks (aot_eager: dynamo's capture and guards as
under inductor, without inductor's CPU codegen): a cached model restored in place for the next trial reuses its
compiled graphs (nothing recompiles) and trains exactly as it did the first time.
"""
from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from flux_ray.core.compile import compile_blocks
from flux_ray.core.lora import add_lora
from flux_ray.core.model import build_transformer_from_config
from flux_ray.core.step import FluxBatch, FluxLossFn
from flux_ray.core.tiny import FLUX_SCHEDULER, TINY_TRANSFORMER
from flux_ray.spec import FlowSpec, LoraSpec
from flux_ray.train import base_cache
from flux_ray.train.base_cache import CachedBase


def _trial(model, params, lr: float, steps: int = 3) -> list[float]:
    """A few optimizer steps with a fresh optimizer, as a trial runs them; the same batch and draws every trial."""
    fn = FluxLossFn(model, FlowSpec(), scheduler_config=dict(FLUX_SCHEDULER), fast_schedule=False)
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(2)
    batch = FluxBatch(torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g),
                      torch.randn(1, 32, generator=g))
    losses = []
    for i in range(steps):
        loss = fn(batch, torch.Generator().manual_seed(10 + i))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_a_restored_cached_model_reuses_its_graphs_and_retrains_identically():
    torch.manual_seed(0)
    model = build_transformer_from_config(TINY_TRANSFORMER, "cpu", torch.float32, seed=0)
    params = add_lora(model, LoraSpec(lora_rank=4, flux_lora_target="all+ffs"))
    with torch.no_grad():  # non-zero B, so every LoRA factor trains
        for p in params:
            p.add_(0.05)
    compile_blocks(model, backend="aot_eager")
    entry = CachedBase(key="k", transformer=model, model=model, adapter=None, lora_init=None, tread=None)
    base_cache.keep(entry, torch.device("cpu"))
    try:
        first = _trial(model, entry.trainable(), lr=1e-2)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        changed = [p.detach().clone() for p in entry.trainable()]
        entry.restore(torch.device("cpu"))  # what take() does on a hit
        assert any(not torch.equal(c, p) for c, p in zip(changed, entry.trainable()))  # back to the initial weights
        second = _trial(model, entry.trainable(), lr=1e-2)
        assert counters["stats"]["unique_graphs"] == graphs  # the compiled blocks served the reused model
        assert second == first  # same weights, RNG and draws: the same trial again
    finally:
        base_cache.drop()
