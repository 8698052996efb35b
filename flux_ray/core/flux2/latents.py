"""FLUX.2 latents: VAE encode, 2x2 pixel-shuffle patchify, batch-norm normalisation, packing, ids.

Each function mirrors a ``Flux2Pipeline`` static method or the steps of ``_encode_vae_image`` (tests
compare them). The transformer's latent space is the VAE latent (B, 32, H/8, W/8) pixel-shuffled to
(B, 128, H/16, W/16) and normalised per channel by the VAE's batch-norm running statistics; tokens
are then the H/16 x W/16 positions in row-major order with (t, h, w, l) = (0, row, col, 0) ids.
FLUX.1's (x - shift) * scale has no counterpart here: the batch norm replaces it.
"""
from __future__ import annotations

import torch


def patchify(latents_bchw: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2); channel order c*4 + 2*dy + dx (``_patchify_latents``)."""
    b, c, h, w = latents_bchw.shape
    x = latents_bchw.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of ``patchify`` (``_unpatchify_latents``)."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def bn_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (1, 4C, 1, 1) fp32: the VAE batch norm's running mean and sqrt(var + eps)."""
    mean = vae.bn.running_mean.detach().float().view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.detach().float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


def normalize(patchified: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (patchified - mean.to(patchified)) / std.to(patchified)


def denormalize(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return latents * std.to(latents) + mean.to(latents)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W) -> normalised transformer latents (B, 4C, H/16, W/16).

    The distribution's mode, as the pipeline's ``_encode_vae_image`` (argmax) and diffusers'
    FLUX.2 LoRA scripts use; returned in the VAE's dtype.
    """
    raw = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    mean, std = bn_stats(vae)
    return normalize(patchify(raw), mean, std)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised transformer latents -> images in [-1, 1] (the end of the pipelines' ``__call__``)."""
    mean, std = bn_stats(vae)
    return vae.decode(unpatchify(denormalize(latents, mean, std)).to(vae.dtype), return_dict=False)[0]


def pack(latents_bchw: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): one token per position (``_pack_latents``)."""
    b, c, h, w = latents_bchw.shape
    return latents_bchw.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) for row-major tokens (``_unpack_latents_with_ids`` with ``latent_ids``)."""
    b, _, c = packed.shape
    return packed.permute(0, 2, 1).reshape(b, c, height, width)


def latent_ids(batch_size: int, height: int, width: int, device=None) -> torch.Tensor:
    """(B, H*W, 4) ids (t, h, w, l) = (0, row, col, 0) (``_prepare_latent_ids``)."""
    ids = torch.zeros(height, width, 4, dtype=torch.long, device=device)
    ids[..., 1] = torch.arange(height, device=device)[:, None]
    ids[..., 2] = torch.arange(width, device=device)[None, :]
    return ids.reshape(1, height * width, 4).expand(batch_size, -1, -1)


def latent_shape(latent_channels: int, height: int, width: int, vae_scale_factor: int = 8) -> tuple[int, int, int]:
    """Cached latent shape (4C, H/16, W/16) for an image of height x width pixels."""
    f = vae_scale_factor * 2
    if height % f or width % f:
        raise ValueError(f"FLUX.2 image sizes must be multiples of {f} px, got {width}x{height}")
    return latent_channels * 4, height // f, width // f
