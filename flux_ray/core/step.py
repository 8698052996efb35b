"""One Flux flow-matching training step and the eval loss: the code the trainer and the benchmark run."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from flux_ray.core import flow as F


@dataclass
class FluxBatch:
    """A same-bucket batch from the cache, already on the device."""
    latents: torch.Tensor          # (B, 16, h, w), normalised VAE latents
    prompt_embeds: torch.Tensor    # (B, L, D) T5
    pooled: torch.Tensor           # (B, Dp) CLIP pooled
    text_mask: torch.Tensor | None = None  # (B, L) T5 attention mask

    def to(self, device, dtype=None) -> FluxBatch:
        mv = lambda t: None if t is None else t.to(device, dtype if t.is_floating_point() and dtype else t.dtype)  # noqa: E731
        return FluxBatch(mv(self.latents), mv(self.prompt_embeds), mv(self.pooled), mv(self.text_mask))


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def attention_context(backend: str, device: torch.device):
    """An explicit SDPA backend on CUDA (the default cuDNN pick crashed Flux steps on H200)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return contextlib.nullcontext() if backend == "auto" else sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])])
    name = "flash" if backend == "auto" else backend
    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


class FluxLossFn:
    """Computes the flow-matching loss of a transformer on a FluxBatch."""

    def __init__(self, transformer, flow_spec, *, scheduler_config: dict | None, fast_schedule: bool,
                 masked_attention: bool = False, autocast_dtype: torch.dtype | None = None,
                 attention_backend: str = "auto"):
        self.transformer = transformer
        self.flow = flow_spec
        self.scheduler_config = scheduler_config or {}
        self.fast_schedule = fast_schedule
        self.masked = masked_attention
        self.autocast_dtype = autocast_dtype
        self.attention_backend = attention_backend
        base = getattr(transformer, "module", transformer)
        self.guidance_embeds = bool(getattr(base.config, "guidance_embeds", False))

    def predict(self, batch: FluxBatch, noisy_packed: torch.Tensor, sigmas: torch.Tensor,
                guidance: torch.Tensor | None) -> torch.Tensor:
        b, _, h, w = batch.latents.shape
        device = batch.latents.device
        kwargs = {}
        if self.masked and batch.text_mask is not None:
            kwargs["joint_attention_kwargs"] = {
                "attention_mask": F.joint_attention_mask(batch.text_mask, noisy_packed.shape[1])}
        if self.guidance_embeds:
            kwargs["guidance"] = guidance.to(device)
        ctx = torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with ctx, attention_context(self.attention_backend, device):
            return self.transformer(hidden_states=noisy_packed, encoder_hidden_states=batch.prompt_embeds,
                                    pooled_projections=batch.pooled, timestep=sigmas.to(noisy_packed.dtype),
                                    img_ids=F.latent_image_ids(h, w, device=device),
                                    txt_ids=F.text_ids(batch.prompt_embeds.shape[1], device=device),
                                    return_dict=False, **kwargs)[0]

    def __call__(self, batch: FluxBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training loss with freshly sampled noise, sigmas and guidance."""
        b, _, h, w = batch.latents.shape
        seq = (h // 2) * (w // 2)
        latents = F.pack_latents(batch.latents)
        sigmas = F.sample_sigmas(b, self.flow, image_seq_len=seq, scheduler_config=self.scheduler_config,
                                 fast_schedule=self.fast_schedule, generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        guidance = F.guidance_values(b, self.flow, generator)
        pred = self.predict(batch, F.noisy_latents(latents, noise, sigmas), sigmas, guidance)
        return F.flow_loss(pred, noise, latents, self.flow.loss_type, self.flow.huber_c)

    @torch.no_grad()
    def eval_loss(self, batch: FluxBatch, noise_seeds: list[int], num_sigmas: int) -> torch.Tensor:
        """Per-sample loss averaged over a fixed sigma grid with fixed per-sample noise (deterministic)."""
        b, _, h, w = batch.latents.shape
        latents = F.pack_latents(batch.latents)
        sigma_grid = F.eval_sigmas(num_sigmas, self.flow, image_seq_len=(h // 2) * (w // 2),
                                   scheduler_config=self.scheduler_config, fast_schedule=self.fast_schedule)
        noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s))
                             for s in noise_seeds]).to(latents.device, latents.dtype)
        guidance = torch.full((b,), float(self.flow.flux_guidance_value))
        total = torch.zeros(b, device=latents.device)
        for sigma in sigma_grid.tolist():
            sigmas = torch.full((b,), sigma, device=latents.device)
            pred = self.predict(batch, F.noisy_latents(latents, noise, sigmas), sigmas, guidance)
            total += F.flow_loss(pred, noise, latents, self.flow.loss_type, self.flow.huber_c, reduce=False)
        return total / len(sigma_grid)
