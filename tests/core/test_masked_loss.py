"""Masked loss (conditioning_type: mask): the batch's latent-resolution mask weighs the per-pixel loss
(core/step.py packed_loss_mask, core/flow.py velocity_loss). Tiny Flux, CPU."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from flux_ray.core import flow as F
from flux_ray.core.lora import add_lora
from flux_ray.core.model import build_transformer_from_config
from flux_ray.core.step import FluxBatch, FluxLossFn, packed_loss_mask
from flux_ray.core.tiny import FLUX_SCHEDULER, TINY_TRANSFORMER
from flux_ray.spec import FlowSpec, LoraSpec

CONFIG = dict(TINY_TRANSFORMER, num_layers=1, num_single_layers=1)


def setup():
    model = build_transformer_from_config(CONFIG, "cpu", torch.float32, seed=0)
    params = add_lora(model, LoraSpec(lora_rank=4, flux_lora_target="all"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    fn = FluxLossFn(model, FlowSpec(flow_schedule_auto_shift=True), scheduler_config=dict(FLUX_SCHEDULER),
                    fast_schedule=False)
    g = torch.Generator().manual_seed(2)
    batch = FluxBatch(torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g),
                      torch.randn(2, 32, generator=g))
    return fn, params, batch


def loss_and_grads(fn, params, batch):
    for p in params:
        p.grad = None
    loss = fn(batch, torch.Generator().manual_seed(3))
    loss.backward()
    return loss.item(), [p.grad.clone() for p in params]


def test_a_zero_mask_gives_zero_loss_and_zero_gradient():
    fn, params, batch = setup()
    loss, grads = loss_and_grads(fn, params, dataclasses.replace(batch, loss_mask=torch.zeros(2, 1, 8, 8)))
    assert loss == 0.0 and all(g.abs().max() == 0 for g in grads)
    loss, grads = loss_and_grads(fn, params, dataclasses.replace(batch, loss_mask=torch.ones(2, 1, 8, 8)))
    plain, plain_grads = loss_and_grads(fn, params, batch)
    assert loss == plain > 0  # a full mask is the unmasked loss
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_a_half_mask_takes_the_loss_from_the_masked_half_only():
    """Left half masked in: the loss is the per-element loss summed over the left half (divided by all elements,
    SimpleTuner's mean of the masked loss), whatever the prediction's error on the right half."""
    fn, params, batch = setup()
    half = torch.zeros(2, 1, 8, 8)
    half[..., :4] = 1.0
    loss, _ = loss_and_grads(fn, params, dataclasses.replace(batch, loss_mask=half))
    b, _, h, w = batch.latents.shape
    latents = F.pack_latents(batch.latents)
    g = torch.Generator().manual_seed(3)  # the loss function's draws, in its order
    sigmas = F.sample_sigmas(b, fn.flow, image_seq_len=(h // 2) * (w // 2), scheduler_config=fn.scheduler_config,
                             generator=g)
    noise = torch.randn(latents.shape, generator=g)
    guidance = F.guidance_values(b, fn.flow, g)
    with torch.no_grad():
        pred = fn.predict(batch, F.noisy_latents(latents, noise, sigmas), sigmas, guidance)
    per = F.unpack_latents((pred - (noise - latents)).pow(2), h, w)  # (B, 16, h, w) per-element loss
    left = (per[..., :4].sum(dim=(1, 2, 3)) / per[0].numel()).mean().item()
    right = (per[..., 4:].sum(dim=(1, 2, 3)) / per[0].numel()).mean().item()
    assert loss == pytest.approx(left, rel=1e-5)
    assert right > 0.1 * left  # the right half's error is real, and left out


def test_packed_mask_lines_up_with_packed_latents():
    mask = torch.zeros(1, 1, 4, 6)
    mask[0, 0, 1, 3] = 1.0
    latents = torch.zeros(1, 16, 4, 6)
    latents[0, :, 1, 3] = 1.0
    weights = packed_loss_mask(FluxBatch(latents, torch.zeros(1, 2, 4), torch.zeros(1, 4), loss_mask=mask))
    torch.testing.assert_close(weights, F.pack_latents(latents))
