"""Flux flow-matching math: packing, image ids, sigma sampling and shifts, loss. Pure torch.

Each function mirrors a diffusers reference (tests compare them): ``FluxPipeline._pack_latents``,
``_unpack_latents``, ``_prepare_latent_image_ids``, ``calculate_shift`` and the scheduler's
``time_shift``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SCHNELL_SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25])
SCHNELL_PROBS = torch.tensor([0.7, 0.1, 0.1, 0.1])


def pack_latents(latents_bchw: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches as tokens."""
    b, c, h, w = latents_bchw.shape
    x = latents_bchw.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent grid of latent_h x latent_w."""
    b, _, d = packed.shape
    c = d // 4
    x = packed.view(b, latent_h // 2, latent_w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, latent_h, latent_w)


def latent_image_ids(latent_h: int, latent_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids: (0, row, col) per packed token."""
    ids = torch.zeros(latent_h // 2, latent_w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(latent_h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(latent_w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def reference_image_ids(latent_h: int, latent_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Kontext's reference-image ids: ``latent_image_ids`` of the reference's grid with the first coordinate 1
    (``FluxKontextPipeline.prepare_latents``: ``image_ids[..., 0] = 1``), telling them from the target's (0)."""
    ids = latent_image_ids(latent_h, latent_w, device=device, dtype=dtype)
    ids[:, 0] = 1
    return ids


def with_reference_tokens(noisy_packed: torch.Tensor, img_ids: torch.Tensor,
                          reference_bchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kontext's transformer input: the target's (noisy) tokens, then the packed clean reference latents, and
    their ids in the same order (``FluxKontextPipeline.__call__``: ``torch.cat([latents, image_latents], dim=1)``
    and ``torch.cat([latent_ids, image_ids], dim=0)``). The prediction's first ``noisy_packed.shape[1]`` tokens
    are the target's."""
    _, _, rh, rw = reference_bchw.shape
    reference = pack_latents(reference_bchw).to(noisy_packed.dtype)
    ids = reference_image_ids(rh, rw, device=img_ids.device, dtype=img_ids.dtype)
    return torch.cat([noisy_packed, reference], dim=1), torch.cat([img_ids, ids], dim=0)


def text_ids(seq_len: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for resolution-dependent shifting: linear in the packed image sequence length."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static shift: s*sigma / (1 + (s-1)*sigma); equals the scheduler's exponential time shift at mu=ln s."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def effective_shift(flow, image_seq_len: int, scheduler_config: dict | None) -> float | None:
    """The shift the spec asks for at this sequence length (None: no shift)."""
    if flow.flow_schedule_auto_shift:
        cfg = scheduler_config or {}
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return math.exp(mu)
    return flow.flow_schedule_shift


def sample_beta(n: int, alpha: float, beta: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """n draws from Beta(alpha, beta), reproducible from ``generator``.

    Integer parameters use the order statistic (the alpha-th smallest of alpha+beta-1 uniforms is exactly
    Beta(alpha, beta); Beta(2,2) is the median of 3, as before). Other values draw from
    ``torch.distributions.Beta`` (as SimpleTuner does) under a CPU seed taken from ``generator``, since torch's
    gamma sampler takes no generator."""
    if float(alpha).is_integer() and float(beta).is_integer() and alpha + beta <= 64:
        k, m = int(alpha), int(alpha + beta - 1)
        return torch.rand(n, m, generator=generator).sort(dim=1).values[:, k - 1]
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(beta))).sample((n,))


def sample_sigmas(batch_size: int, flow, *, image_seq_len: int, scheduler_config: dict | None = None,
                  fast_schedule: bool = False, generator: torch.Generator | None = None,
                  device=None) -> torch.Tensor:
    """Training sigmas in (0, 1]: logit-normal (default), uniform or Beta(alpha, beta), then shifted."""
    if fast_schedule:
        idx = torch.multinomial(SCHNELL_PROBS, batch_size, replacement=True, generator=generator)
        return SCHNELL_SIGMAS[idx].to(device)
    if flow.flow_use_uniform_schedule:
        sigmas = torch.rand(batch_size, generator=generator)
    elif flow.flow_use_beta_schedule:
        sigmas = sample_beta(batch_size, flow.flow_beta_schedule_alpha, flow.flow_beta_schedule_beta, generator)
    else:
        sigmas = torch.sigmoid(flow.flow_sigmoid_scale * torch.randn(batch_size, generator=generator))
    shift = effective_shift(flow, image_seq_len, scheduler_config)
    if shift is not None:
        sigmas = shift_sigmas(sigmas, shift)
    return sigmas.clamp(1e-5, 1.0).to(device)


def eval_sigmas(num: int, flow, *, image_seq_len: int, scheduler_config: dict | None = None,
                fast_schedule: bool = False) -> torch.Tensor:
    """A fixed grid of sigmas for eval loss: the inference schedule's sigmas for this size."""
    if fast_schedule:
        return SCHNELL_SIGMAS.clone()
    sigmas = torch.linspace(1.0, 1.0 / num, num)
    shift = effective_shift(flow, image_seq_len, scheduler_config)
    return shift_sigmas(sigmas, shift) if shift is not None else sigmas


@dataclass(frozen=True)
class SigmaSchedule:
    """The sigma schedule, resolved once from its three sources: the spec's ``flow`` options (shift, auto
    shift, distribution), the model folder's scheduler config (auto shift's sequence lengths and shifts)
    and whether the fast (schnell) schedule applies (``JobSpec.fast_schedule``). Each call then takes
    only what varies per batch."""
    flow: Any
    """The spec's FlowSpec."""
    scheduler_config: dict = field(default_factory=dict)
    fast: bool = False

    def shift(self, image_seq_len: int) -> float | None:
        return None if self.fast else effective_shift(self.flow, image_seq_len, self.scheduler_config)

    def sample(self, batch_size: int, image_seq_len: int, generator: torch.Generator | None = None,
               device=None) -> torch.Tensor:
        """Training sigmas (:func:`sample_sigmas`)."""
        return sample_sigmas(batch_size, self.flow, image_seq_len=image_seq_len,
                             scheduler_config=self.scheduler_config, fast_schedule=self.fast, generator=generator,
                             device=device)

    def eval_grid(self, num: int, image_seq_len: int) -> torch.Tensor:
        """The eval loss's fixed sigmas (:func:`eval_sigmas`)."""
        return eval_sigmas(num, self.flow, image_seq_len=image_seq_len, scheduler_config=self.scheduler_config,
                           fast_schedule=self.fast)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x_0 + sigma * noise (rectified flow)."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise


def flow_loss(pred: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor, loss_type: str = "mse",
              huber_c: float = 0.1, reduce: bool = True, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Loss against the velocity target noise - latents: mean per sample, then over the batch."""
    return velocity_loss(pred, noise - latents, loss_type, huber_c, reduce, weight)


def velocity_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "mse", huber_c: float = 0.1,
                  reduce: bool = True, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise MSE / pseudo-Huber of ``pred`` against ``target``, times ``weight`` (a packed loss mask,
    broadcast), mean per sample over all elements, then over the batch (SimpleTuner multiplies the per-pixel
    loss by the mask and takes the plain mean, so a half mask halves a sample's loss)."""
    diff = pred.float() - target.float()
    if loss_type == "huber":
        per = huber_c * (torch.sqrt(diff.pow(2) + huber_c**2) - huber_c)
    else:
        per = diff.pow(2)
    if weight is not None:
        per = per * weight.to(per.dtype)
    per_sample = per.reshape(per.shape[0], -1).mean(dim=1)
    return per_sample.mean() if reduce else per_sample


def guidance_values(batch_size: int, flow, generator: torch.Generator | None = None) -> torch.Tensor:
    """Distilled-guidance input per sample: constant or uniform in [min, max]."""
    if flow.flux_guidance_mode == "random-range":
        u = torch.rand(batch_size, generator=generator)
        return flow.flux_guidance_min + u * (flow.flux_guidance_max - flow.flux_guidance_min)
    return torch.full((batch_size,), float(flow.flux_guidance_value))


def normalize_latents(raw: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """VAE latents -> the transformer's latent space (Flux: (x - shift) * scale)."""
    return (raw - shift_factor) * scaling_factor


def joint_attention_mask(text_mask: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """(B, L_txt) T5 mask -> (B, 1, 1, L_txt + N_img) boolean mask, ones over image tokens."""
    b = text_mask.shape[0]
    ones = torch.ones(b, num_image_tokens, dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask.bool(), ones], dim=1)[:, None, None, :]
