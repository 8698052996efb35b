"""FLUX.2 latent math against the pipelines' own static helpers and VAE encode."""
from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from flux_ray.core.flux2 import latents as L


@pytest.mark.parametrize("h, w", [(8, 8), (4, 12), (16, 6)])
def test_patchify_pack_and_ids_match_diffusers(h, w):
    x = torch.randn(2, 8, 2 * h, 2 * w)
    p = L.patchify(x)
    assert torch.equal(p, Flux2Pipeline._patchify_latents(x))
    assert torch.equal(L.unpatchify(p), Flux2Pipeline._unpatchify_latents(p))
    assert torch.equal(L.unpatchify(p), x)
    packed = L.pack(p)
    assert torch.equal(packed, Flux2Pipeline._pack_latents(p))
    ids = L.latent_ids(2, h, w)
    assert torch.equal(ids, Flux2Pipeline._prepare_latent_ids(p))
    assert torch.equal(L.unpack(packed, h, w), Flux2Pipeline._unpack_latents_with_ids(packed, ids))
    assert torch.equal(L.unpack(packed, h, w), Flux2KleinPipeline._unpack_latents_with_ids(packed, ids, h, w))


def test_encode_images_equals_pipeline_encode_vae_image(tiny_flux2_pipes):
    pipe = tiny_flux2_pipes["klein-4b"]
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = L.encode_images(pipe.vae, pixels)
    with torch.no_grad():
        ref = pipe._encode_vae_image(pixels, generator=None)
    assert ours.shape == (2, 32, 4, 6) == (2, *L.latent_shape(8, 64, 96))
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    # the batch-norm statistics act: without them the latents differ
    with torch.no_grad():
        raw = L.patchify(pipe.vae.encode(pixels).latent_dist.mode())
    assert not torch.allclose(ours, raw, atol=1e-3)


def test_decode_latents_is_the_pipelines_final_step(tiny_flux2_pipes):
    pipe = tiny_flux2_pipes["klein-4b"]
    z = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = L.decode_latents(pipe.vae, z)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    with torch.no_grad():  # the lines after the denoising loop of Flux2KleinPipeline.__call__
        ref = pipe.vae.decode(pipe._unpatchify_latents(z * std + mean), return_dict=False)[0]
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_latent_shape_refuses_sizes_off_the_16px_grid():
    assert L.latent_shape(32, 1024, 768) == (128, 64, 48)
    with pytest.raises(ValueError, match="multiples of 16"):
        L.latent_shape(32, 1000, 768)
