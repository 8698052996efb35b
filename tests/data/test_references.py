"""Kontext reference datasets: matched by file name, cropped with their image's plan (reference_strict) or on
their own (reference_loose), VAE-cached in their own cache beside the latents, missing and bad references reported
like bad images; a Kontext run trains differently with its references, validates through FluxKontextPipeline and
exports a LoRA that FluxKontextPipeline loads."""
from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux_ray.data.decode import prepare_image
from flux_ray.data.references import NO_REFERENCE, prepare_strict_reference
from flux_ray.spec import DatasetSpec

CPU = torch.device("cpu")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("crop_style", ["center", "random"])
def test_a_strict_reference_is_cropped_exactly_as_its_image(crop_style):
    """The image itself, given as its reference at half size, comes out as the image's own crop."""
    ds = DatasetSpec(id="d", instance_data_dir="/x", resolution=64, resolution_type="pixel", crop=True,
                     crop_style=crop_style, crop_aspect="square")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:200]
    arr = np.stack([((xx // 25 + yy // 20) % 2) * 255, xx, rng.integers(0, 255, (120, 200))], -1).astype(np.uint8)
    image = prepare_image(_png(arr), "a/img.png", ds, seed=7)
    half = np.asarray(Image.fromarray(arr).resize((100, 60), Image.Resampling.LANCZOS))
    ref = prepare_strict_reference(_png(half), "a/img.png", ds, 7, 200, 120)
    assert ref.shape == image.pixels_u8.shape == (3, 64, 64)
    assert np.abs(ref[:2].astype(int) - image.pixels_u8[:2].astype(int)).mean() < 25
    shifted = np.roll(image.pixels_u8[:2], 8, axis=2)
    assert np.abs(ref[:2].astype(int) - shifted.astype(int)).mean() > 40


@pytest.fixture(scope="module")
def kontext_model_dir(tmp_path_factory) -> str:
    from flux_ray.core.tiny import write_tiny_flux

    return str(write_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-kontext", kontext=True))


@pytest.fixture(scope="module")
def reference_dir(demo_data_dir, tmp_path_factory) -> Path:
    """A reference per demo image (the image flipped), one unreadable, one image without a reference."""
    root = tmp_path_factory.mktemp("references")
    images = sorted(p for p in Path(demo_data_dir).iterdir() if p.suffix in (".png", ".jpg"))
    for i, p in enumerate(images[:-1]):
        if i == 0:
            (root / (p.stem + ".png")).write_bytes(b"not an image")
        else:
            Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / (p.stem + ".png"))
    return root


def _kontext_spec(demo_spec, model_dir, data_dir, out, reference_dir, conditioning_type="reference_strict",
                  overrides=(), **eval_options):
    images = dict(id="demo", instance_data_dir=data_dir, caption_strategy="textfile", resolution=128,
                  resolution_type="pixel_area", conditioning_data="demo-refs")
    refs = dict(id="demo-refs", instance_data_dir=str(reference_dir), dataset_type="conditioning",
                conditioning_type=conditioning_type)
    ev = {"eval_steps_interval": None, "validation_step_interval": None, "eval_split_fraction": 0, **eval_options}
    return demo_spec(model_dir, data_dir, out, overrides=["model.model_flavour=kontext", *overrides],
                     datasets=[images, refs], eval=ev)


def test_references_are_cached_reported_and_change_the_training(ray_session, kontext_model_dir, demo_data_dir,
                                                                 demo_spec, reference_dir, tmp_path):
    from flux_ray.data.cache import run_cache
    from flux_ray.train.build import build_loop_parts
    from flux_ray.train.loop import train_loop

    steps = ["train.max_train_steps=3", "train.log_every=1", "train.train_batch_size=2"]
    spec = _kontext_spec(demo_spec, kontext_model_dir, demo_data_dir, tmp_path, reference_dir, overrides=steps)
    summary = run_cache(spec).datasets["demo"]
    assert summary["skipped"].get(NO_REFERENCE) == 1 and summary["skipped"].get("reference_unreadable") == 1
    assert summary["references"]["with_reference"] == summary["usable"] == summary["images_seen"] - 2
    assert list(Path(spec.cache.uri, "references").iterdir())  # its own cache, beside latents/
    again = run_cache(spec).datasets["demo"]
    assert again["references"]["made_this_run"] == 0 and again["usable"] == summary["usable"]

    parts = build_loop_parts(spec, CPU, 0, 1)
    assert len(parts.train_samples) == summary["usable"]
    batch = parts.reader.batch(parts.train_samples[:1], torch.Generator().manual_seed(0))
    assert batch.reference_latents.shape == batch.latents.shape  # strict: the image's own grid
    assert not torch.allclose(batch.reference_latents, batch.latents, atol=1e-2)
    with_ref = parts.loss_fn(batch, torch.Generator().manual_seed(1)).item()
    without = parts.loss_fn(dataclasses.replace(batch, reference_latents=None), torch.Generator().manual_seed(1))
    assert abs(with_ref - without.item()) > 1e-4

    plain = demo_spec(kontext_model_dir, demo_data_dir, tmp_path / "plain", overrides=["model.model_flavour=dev",
                                                                                      *steps],
                      datasets=[dict(id="demo", instance_data_dir=demo_data_dir, caption_strategy="textfile",
                                     resolution=128, resolution_type="pixel_area")],
                      eval={"eval_steps_interval": None, "validation_step_interval": None, "eval_split_fraction": 0})
    unreferenced = build_loop_parts(plain, CPU, 0, 1)
    unreferenced.train_samples[:] = [s for s in unreferenced.train_samples
                                     if s.sample_id in {t.sample_id for t in parts.train_samples}]
    runs = []
    for p in (parts, unreferenced):
        runs.append([])
        train_loop(p, lambda m, c, out=runs[-1]: out.append(m["train_loss"]))
    assert len(runs[0]) == len(runs[1]) == 3
    assert all(abs(a - b) > 1e-5 for a, b in zip(*runs))  # the same samples and noise; the references differ


def test_loose_references_have_their_own_bucket(ray_session, kontext_model_dir, demo_data_dir, demo_spec,
                                                reference_dir, tmp_path):
    """A reference of another aspect keeps its aspect under reference_loose (cropped to its image's under strict)."""
    from flux_ray.data.cache import run_cache
    from flux_ray.train.build import build_loop_parts

    refs = tmp_path / "wide"
    refs.mkdir()
    for p in Path(reference_dir).glob("*.png"):
        if p.stat().st_size > 100:
            Image.open(p).resize((256, 64)).save(refs / p.name)
    spec = _kontext_spec(demo_spec, kontext_model_dir, demo_data_dir, tmp_path, refs, "reference_loose",
                         overrides=["train.train_batch_size=1"])
    run_cache(spec)
    parts = build_loop_parts(spec, CPU, 0, 1)
    batch = parts.reader.batch(parts.train_samples[:1])
    rh, rw = batch.reference_latents.shape[2:]
    assert rw / rh > 2 and batch.latents.shape[2:] != (rh, rw)
    assert torch.isfinite(parts.loss_fn(batch, torch.Generator().manual_seed(0)))


def test_kontext_validation_and_the_exported_lora_load_in_the_kontext_pipeline(
        ray_session, kontext_model_dir, demo_data_dir, demo_spec, reference_dir, tmp_path):
    from diffusers import FluxKontextPipeline
    from safetensors.torch import save_file

    from flux_ray.data.cache import run_cache
    from flux_ray.train.build import build_loop_parts
    from flux_ray.train.checkpoint import LORA_FILE
    from flux_ray.train.driver import export_final_lora
    from flux_ray.train.loop import train_loop

    reference = str(sorted(Path(reference_dir).glob("*.png"))[-1])
    spec = _kontext_spec(demo_spec, kontext_model_dir, demo_data_dir, tmp_path, reference_dir,
                         overrides=["train.max_train_steps=2", "train.log_every=1", "train.learning_rate=1e-2"],
                         validation_step_interval=2, validation_prompt="a red circle", validation_resolution="64x64",
                         validation_num_inference_steps=2, validation_reference_image=reference)
    run_cache(spec)
    parts = build_loop_parts(spec, CPU, 0, 1)
    assert parts.validate.pipe is None  # built at the first validation
    reports = []
    train_loop(parts, lambda m, c: reports.append(m))
    assert type(parts.validate.pipe).__name__ == "FluxKontextPipeline"
    grid = Path(spec.run_uri, "validation", "step-000002.png")
    assert grid.exists() and Image.open(grid).size == (64, 64)

    ckpt = spec.run_uri + "/ckpt"
    os.makedirs(ckpt, exist_ok=True)
    save_file(parts.state_io.gather()[0], f"{ckpt}/{LORA_FILE}")
    path = export_final_lora(spec, ckpt, reports[-1])
    pipe = FluxKontextPipeline.from_pretrained(kontext_model_dir)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe(prompt="a red circle", image=Image.open(reference).convert("RGB").resize((64, 64)), height=64,
                    width=64, max_area=64 * 64, _auto_resize=False, num_inference_steps=2, max_sequence_length=32,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    before = render()
    pipe.load_lora_weights(os.path.dirname(path) if os.path.isfile(path) else path)
    after = render()
    assert (after - before).abs().max() > 1e-4


def test_kontext_validation_from_cached_embeddings_equals_the_pipeline_with_encoders(
        kontext_model_dir, demo_data_dir, demo_spec, reference_dir, tmp_path, images_rendered_with_encoders):
    """Kontext validation with the prompts encoded once (encoders freed) renders the reference edit exactly as a
    FluxKontextPipeline holding the encoders does, true CFG included."""
    from flux_ray.core import model as M
    from flux_ray.core.validation import Validator

    reference = str(sorted(Path(reference_dir).glob("*.png"))[-1])
    spec = _kontext_spec(demo_spec, kontext_model_dir, demo_data_dir, tmp_path, reference_dir,
                         validation_step_interval=2, validation_prompt="a red circle", validation_resolution="64x64",
                         validation_num_inference_steps=2, validation_reference_image=reference,
                         validation_guidance_real=3.0, validation_negative_prompt="blurry")
    tr = M.load_transformer(spec.model, torch.float32)
    validator = Validator(spec, tr, CPU, write=False)
    [(name, img)] = validator.render()
    assert name == "validation-64x64" and type(validator.pipe).__name__ == "FluxKontextPipeline"
    assert validator.pipe.text_encoder is None and validator.pipe.text_encoder_2 is None
    assert np.array_equal(np.asarray(img), images_rendered_with_encoders(spec, tr)[0])
