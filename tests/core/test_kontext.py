"""FLUX.1 Kontext: reference latents packed and given ids exactly as FluxKontextPipeline does, appended after the
target's tokens; the loss sees the target's tokens only; the tiny Kontext model loads in FluxKontextPipeline."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from flux_ray.core import flow as F
from flux_ray.core.lora import add_lora
from flux_ray.core.model import build_transformer_from_config
from flux_ray.core.step import FluxBatch, FluxLossFn
from flux_ray.core.tiny import FLUX_SCHEDULER, TINY_TRANSFORMER
from flux_ray.spec import FlowSpec, LoraSpec


@pytest.fixture(scope="module")
def kontext_pipe():
    from flux_ray.core.tiny import build_tiny_pipeline

    return build_tiny_pipeline(kontext=True)


def test_reference_tokens_and_ids_match_the_kontext_pipeline(kontext_pipe):
    """with_reference_tokens == FluxKontextPipeline.prepare_latents's packing and ids, concatenated as its
    __call__ does (target first, reference ids with first coordinate 1)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 16, 6, 10, generator=g)  # a reference of another size than the target
    latents, image_latents, latent_ids, image_ids = kontext_pipe.prepare_latents(
        ref, 2, 16, 8 * 8, 8 * 12, torch.float32, torch.device("cpu"), g)
    ours, ids = F.with_reference_tokens(latents, F.latent_image_ids(8, 12), ref)
    assert torch.equal(ours, torch.cat([latents, image_latents], dim=1))
    assert torch.equal(ids, torch.cat([latent_ids, image_ids], dim=0))
    assert torch.equal(F.reference_image_ids(6, 10)[:, 0], torch.ones(15)) and image_ids[:, 0].eq(1).all()


def _loss_fn():
    model = build_transformer_from_config(TINY_TRANSFORMER, "cpu", torch.float32, seed=0)
    params = add_lora(model, LoraSpec(lora_rank=4, flux_lora_target="all"))
    with torch.no_grad():
        for p in params:
            p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model, FluxLossFn(model, FlowSpec(), scheduler_config=dict(FLUX_SCHEDULER), fast_schedule=False)


def test_the_prediction_is_the_pipelines_cut_to_the_target_tokens():
    model, fn = _loss_fn()
    g = torch.Generator().manual_seed(2)
    batch = FluxBatch(torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g),
                      torch.randn(2, 32, generator=g), reference_latents=torch.randn(2, 16, 8, 8, generator=g))
    noisy, sigmas, guidance = torch.randn(2, 16, 64, generator=g), torch.tensor([0.3, 0.8]), torch.tensor([3.5, 3.5])
    pred = fn.predict(batch, noisy, sigmas, guidance)
    with torch.no_grad():  # FluxKontextPipeline's denoising call, written out
        full = model(hidden_states=torch.cat([noisy, F.pack_latents(batch.reference_latents)], 1),
                     encoder_hidden_states=batch.prompt_embeds, pooled_projections=batch.pooled, timestep=sigmas,
                     guidance=guidance, img_ids=torch.cat([F.latent_image_ids(8, 8), F.reference_image_ids(8, 8)]),
                     txt_ids=F.text_ids(7), return_dict=False)[0]
    assert pred.shape == noisy.shape and torch.allclose(pred, full[:, :16], atol=1e-6)
    plain = fn.predict(dataclasses.replace(batch, reference_latents=None), noisy, sigmas, guidance)
    assert not torch.allclose(pred, plain, atol=1e-3)  # the reference tokens are attended to


def test_references_change_the_loss_and_its_gradient_but_not_the_noise():
    _, fn = _loss_fn()
    g = torch.Generator().manual_seed(3)
    batch = FluxBatch(torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g),
                      torch.randn(1, 32, generator=g))
    with_ref = dataclasses.replace(batch, reference_latents=torch.randn(1, 16, 8, 8, generator=g))
    other_ref = dataclasses.replace(batch, reference_latents=torch.randn(1, 16, 8, 8, generator=g))
    losses = [fn(b, torch.Generator().manual_seed(4)).item() for b in (batch, with_ref, other_ref)]
    assert len({round(x, 6) for x in losses}) == 3
    assert fn(with_ref, torch.Generator().manual_seed(4)).item() == pytest.approx(losses[1], abs=1e-7)


def test_the_tiny_kontext_model_generates_with_a_reference(tmp_path):
    """model_flavour kontext + make_tiny_if_missing writes a FluxKontextPipeline folder that loads through
    from_pretrained and edits a reference image (a different reference gives a different image)."""
    import json

    from diffusers import FluxKontextPipeline

    from flux_ray.core.model import ensure_base_model
    from flux_ray.spec import ModelSpec

    path = ensure_base_model(ModelSpec(model_flavour="kontext", pretrained_model_name_or_path=str(tmp_path / "k"),
                                       make_tiny_if_missing=True))
    assert json.loads((tmp_path / "k" / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    pipe = FluxKontextPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)

    def run(color):
        return pipe(prompt="a cat", image=Image.new("RGB", (64, 64), color), height=64, width=64, num_inference_steps=2,
                    _auto_resize=False, max_area=64 * 64, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]

    a, b = run("red"), run("blue")
    assert a.shape == (64, 64, 3) and abs(a - b).max() > 1e-4
