"""One FLUX.2 flow-matching training step's loss, as diffusers' FLUX.2 DreamBooth LoRA scripts compute it.

``train_dreambooth_lora_flux2{,_klein}.py``: x_t = (1 - sigma) x_0 + sigma * noise on the normalised,
patchified latents; the transformer sees packed tokens, ``timestep = sigma`` (it multiplies by 1000
itself), guidance only when its config has guidance embeddings ([dev]; [klein] gets None); the
target is noise - x_0 and the loss the per-sample mean squared error, averaged over the batch.
The scripts unpack the prediction back to (B, C, H, W) before the loss; a per-sample mean does not
depend on element order, so the loss is taken on packed tokens against the packed target.
"""
from __future__ import annotations

import torch

from flux_ray.core import flow as F
from flux_ray.core.flux2 import latents as L
from flux_ray.core.flux2.text import text_ids as make_text_ids


def uses_guidance(transformer) -> bool:
    base = getattr(transformer, "module", transformer)
    return bool(getattr(base.config, "guidance_embeds", False))


def predict(transformer, noisy: torch.Tensor, prompt_embeds: torch.Tensor, sigmas: torch.Tensor,
            guidance: torch.Tensor | None = None, img_ids: torch.Tensor | None = None,
            txt_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Velocity prediction for noisy latents (B, C, h, w), returned packed (B, h*w, C)."""
    b, _, h, w = noisy.shape
    if uses_guidance(transformer):
        if guidance is None:
            raise ValueError("this FLUX.2 transformer has guidance embeddings ([dev]): "
                             "pass a guidance value per sample")
        guidance = guidance.to(noisy.device, torch.float32)
    else:
        guidance = None  # [klein]: no guidance embedder, the pipeline passes None
    img_ids = L.latent_ids(b, h, w, noisy.device) if img_ids is None else img_ids
    txt_ids = make_text_ids(b, prompt_embeds.shape[1], noisy.device) if txt_ids is None else txt_ids
    packed = L.pack(noisy)
    out = transformer(hidden_states=packed, encoder_hidden_states=prompt_embeds, timestep=sigmas.to(noisy.device),
                      guidance=guidance, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
    return out[:, : packed.shape[1]]


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity noise - x_0."""
    return noise - latents


def flux2_loss(transformer, latents: torch.Tensor, prompt_embeds: torch.Tensor, *, sigmas: torch.Tensor,
               noise: torch.Tensor, guidance: torch.Tensor | None = None, loss_type: str = "mse",
               huber_c: float = 0.1, reduce: bool = True) -> torch.Tensor:
    """Loss of one step on normalised latents (B, 128, h, w) with given noise and sigmas (B,)."""
    noisy = F.noisy_latents(latents, noise, sigmas)
    pred = predict(transformer, noisy, prompt_embeds, sigmas, guidance)
    return F.flow_loss(pred, L.pack(noise), L.pack(latents), loss_type, huber_c, reduce=reduce)
