"""Flow-matching math against diffusers' own reference functions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift

from flux_ray.core import flow as F
from flux_ray.spec import FlowSpec


@pytest.mark.parametrize("h, w", [(16, 16), (8, 24), (32, 12)])
def test_pack_unpack_and_ids_match_diffusers(h, w):
    x = torch.randn(2, 16, h, w)
    ours = F.pack_latents(x)
    ref = FluxPipeline._pack_latents(x, 2, 16, h, w)
    assert torch.equal(ours, ref)
    # diffusers' unpack takes pixel sizes and the VAE scale factor (8)
    assert torch.equal(F.unpack_latents(ours, h, w), FluxPipeline._unpack_latents(ref, h * 8, w * 8, 8))
    assert torch.equal(F.unpack_latents(ours, h, w), x)
    ids_ref = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)
    assert torch.equal(F.latent_image_ids(h, w), ids_ref)


@pytest.mark.parametrize("seq", [64, 256, 1024, 4096, 6000])
def test_calculate_shift_matches_diffusers(seq):
    assert F.calculate_shift(seq) == pytest.approx(diffusers_calculate_shift(seq))
    assert F.calculate_shift(seq, 256, 4096, 0.5, 1.15) == pytest.approx(
        diffusers_calculate_shift(seq, 256, 4096, 0.5, 1.15))


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_static_shift_equals_scheduler_time_shift(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True)
    sigmas = torch.linspace(1.0, 0.01, 20)
    ref = sched.time_shift(math.log(shift), 1.0, sigmas)
    torch.testing.assert_close(F.shift_sigmas(sigmas, shift), ref)
    # and equals the scheduler's static shift formula
    static = FlowMatchEulerDiscreteScheduler(shift=shift)
    torch.testing.assert_close(F.shift_sigmas(sigmas, shift), shift * sigmas / (1 + (shift - 1) * sigmas))
    assert static.config.shift == shift


def test_auto_shift_uses_scheduler_settings_and_sequence_length():
    flow = FlowSpec(flow_schedule_auto_shift=True)
    cfg = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    s_small = F.effective_shift(flow, 256, cfg)
    s_big = F.effective_shift(flow, 4096, cfg)
    assert s_small == pytest.approx(math.exp(0.5)) and s_big == pytest.approx(math.exp(1.15))
    sched = FlowMatchEulerDiscreteScheduler(**cfg, use_dynamic_shifting=True)
    # exactly what FluxPipeline does for 28 steps at this sequence length
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=diffusers_calculate_shift(1024))
    grid = F.eval_sigmas(28, flow, image_seq_len=1024, scheduler_config=cfg)
    torch.testing.assert_close(grid, sched.sigmas[:-1].float(), atol=1e-5, rtol=1e-5)


def test_sigma_samplers_have_the_right_distributions():
    g = torch.Generator().manual_seed(0)
    n = 20000
    logit = F.sample_sigmas(n, FlowSpec(), image_seq_len=256, generator=g)
    assert abs(logit.mean().item() - 0.5) < 0.02 and 0.15 < logit.std().item() < 0.25
    uni = F.sample_sigmas(n, FlowSpec(flow_use_uniform_schedule=True), image_seq_len=256, generator=g)
    assert abs(uni.std().item() - (1 / 12) ** 0.5) < 0.01
    beta = F.sample_sigmas(n, FlowSpec(flow_use_beta_schedule=True), image_seq_len=256, generator=g)
    assert abs(beta.var().item() - 0.05) < 0.005  # Beta(2,2): variance 1/20
    shifted = F.sample_sigmas(n, FlowSpec(flow_schedule_shift=3.0), image_seq_len=256, generator=g)
    assert shifted.mean() > logit.mean() + 0.1
    fast = F.sample_sigmas(n, FlowSpec(), image_seq_len=256, fast_schedule=True, generator=g)
    assert set(fast.unique().tolist()) == {1.0, 0.75, 0.5, 0.25}
    assert abs((fast == 1.0).float().mean().item() - 0.7) < 0.02


@pytest.mark.parametrize("alpha, beta", [(2.0, 2.0), (3.0, 1.0), (0.5, 0.5), (1.5, 4.0)])
def test_beta_schedule_samples_beta_alpha_beta(alpha, beta):
    """flow_beta_schedule_alpha/_beta: the sigmas are Beta(alpha, beta) (KS test against scipy's CDF), the same
    draws again from the same generator seed, and the integer case keeps the old median-of-3 Beta(2,2) draws."""
    from scipy import stats

    flow = FlowSpec(flow_use_beta_schedule=True, flow_beta_schedule_alpha=alpha, flow_beta_schedule_beta=beta)
    draw = lambda: F.sample_sigmas(4000, flow, image_seq_len=256, generator=torch.Generator().manual_seed(1))  # noqa: E731
    sigmas = draw()
    assert stats.kstest(sigmas.double().numpy(), stats.beta(alpha, beta).cdf).pvalue > 0.01
    assert stats.kstest(sigmas.double().numpy(), stats.beta(beta, alpha).cdf).pvalue < 0.01 or alpha == beta
    torch.testing.assert_close(draw(), sigmas)
    if (alpha, beta) == (2.0, 2.0):
        u = torch.rand(4000, 3, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(sigmas, u.median(dim=1).values.clamp(1e-5, 1.0))


def test_loss_is_mean_per_sample_then_batch_against_noise_minus_latents():
    lat, noise = torch.randn(3, 10, 4), torch.randn(3, 10, 4)
    pred = noise - lat
    assert F.flow_loss(pred, noise, lat).item() == 0.0
    pred = pred + torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    per = F.flow_loss(pred, noise, lat, reduce=False)
    torch.testing.assert_close(per, torch.tensor([1.0, 4.0, 9.0]))
    assert F.flow_loss(pred, noise, lat).item() == pytest.approx(14 / 3)
    hub = F.flow_loss(pred, noise, lat, "huber", 0.1, reduce=False)
    assert torch.all(hub < per) and torch.all(hub > 0)


def test_noisy_latents_interpolate_data_and_noise():
    x, n = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    out = F.noisy_latents(x, n, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1], n[1])


def test_guidance_modes():
    assert torch.equal(F.guidance_values(3, FlowSpec(flux_guidance_value=3.5)), torch.full((3,), 3.5))
    g = F.guidance_values(1000, FlowSpec(flux_guidance_mode="random-range", flux_guidance_min=1, flux_guidance_max=4),
                          torch.Generator().manual_seed(0))
    assert g.min() >= 1 and g.max() <= 4 and g.std() > 0.5


def test_joint_attention_mask_is_ones_over_image_tokens():
    m = F.joint_attention_mask(torch.tensor([[1, 1, 0]]), 4)
    assert m.shape == (1, 1, 1, 7)
    assert m.flatten().tolist() == [True, True, False, True, True, True, True]


def test_sigma_schedule_is_the_sigma_functions_with_their_sources_bound():
    """FluxLossFn's SigmaSchedule: flow options, scheduler config and the fast flag resolved once."""
    cfg = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    flow = FlowSpec(flow_schedule_auto_shift=True)
    schedule = F.SigmaSchedule(flow, cfg)
    a = schedule.sample(64, 1024, torch.Generator().manual_seed(3))
    b = F.sample_sigmas(64, flow, image_seq_len=1024, scheduler_config=cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(schedule.eval_grid(8, 4096), F.eval_sigmas(8, flow, image_seq_len=4096, scheduler_config=cfg))
    assert schedule.shift(4096) == pytest.approx(math.exp(1.15))
    fast = F.SigmaSchedule(flow, cfg, fast=True)
    assert fast.shift(4096) is None and torch.equal(fast.eval_grid(8, 4096), F.SCHNELL_SIGMAS)
