"""Loss masks: matched by file name, cropped with their image's plan, cached at latent resolution beside the
latents; empty and missing masks reported like bad images; a masked run trains differently."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux_ray.data.decode import prepare_image
from flux_ray.data.masks import EMPTY_MASK, NO_MASK, match_masks, prepare_mask
from flux_ray.data.sources import ImageRef
from flux_ray.spec import DatasetSpec


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("crop_style", ["center", "random"])
def test_a_mask_is_cropped_exactly_as_its_image(crop_style):
    """A mask drawn at half the image's size, with the image's own pattern: after the image's resize and crop
    and the reduction to the latent grid it matches the image's pixels reduced the same way."""
    ds = DatasetSpec(id="d", instance_data_dir="/x", resolution=64, resolution_type="pixel", crop=True,
                     crop_style=crop_style, crop_aspect="square")
    yy, xx = np.mgrid[0:120, 0:200]
    pattern = (((xx // 25 + yy // 20) % 2) * 255).astype(np.uint8)
    image = prepare_image(_png(np.stack([pattern] * 3, -1)), "a/img.png", ds, seed=7)
    small = np.asarray(Image.fromarray(pattern).resize((100, 60), Image.Resampling.NEAREST))
    mask = prepare_mask(_png(small), "a/img.png", ds, 7, 200, 120, image.bucket_w // 8, image.bucket_h // 8)
    expected = np.asarray(Image.fromarray(image.pixels_u8[0]).resize(mask.shape[::-1], Image.Resampling.BOX))
    assert mask.shape == (8, 8)
    assert np.abs(mask.astype(int) - expected.astype(int)).mean() < 20  # the same squares, resampled twice
    shifted = np.roll(expected, 1, axis=1)  # a crop one latent pixel off would not match
    assert np.abs(mask.astype(int) - shifted.astype(int)).mean() > 60


def test_an_all_black_mask_is_a_skip():
    ds = DatasetSpec(id="d", instance_data_dir="/x", resolution=64)
    from flux_ray.data.decode import SkipImage

    with pytest.raises(SkipImage) as e:
        prepare_mask(_png(np.zeros((64, 64), np.uint8)), "img.png", ds, 0, 64, 64, 8, 8)
    assert e.value.reason == EMPTY_MASK


def test_masks_match_by_path_then_by_unique_base_name():
    def ref(rel):
        return ImageRef("m", "/m/" + rel, rel, 1, 1)

    refs = [ref("a/x.png"), ref("y.jpg"), ref("p/z.png"), ref("q/z.png")]
    got = match_masks(["a/x.jpg", "b/y.png", "c/z.jpg", "w.png"], refs)
    assert {k: v.rel_path for k, v in got.items()} == {"a/x.jpg": "a/x.png", "b/y.png": "y.jpg"}


@pytest.fixture(scope="module")
def mask_dir(demo_data_dir, tmp_path_factory) -> Path:
    """A mask per demo image, left half white; one all black (empty), one image without a mask."""
    root = tmp_path_factory.mktemp("masks")
    images = sorted(p for p in Path(demo_data_dir).iterdir() if p.suffix in (".png", ".jpg"))
    for i, p in enumerate(images[:-1]):
        w, h = Image.open(p).size
        arr = np.zeros((h, w), np.uint8)
        if i != 0:
            arr[:, : w // 2] = 255
        Image.fromarray(arr).save(root / (p.stem + ".png"))
    return root


def _masked_spec(demo_spec, tiny_model_dir, demo_data_dir, out, mask_dir, overrides=()):
    images = dict(id="demo", instance_data_dir=demo_data_dir, caption_strategy="textfile", resolution=128,
                  resolution_type="pixel_area", conditioning_data="demo-masks")
    masks = dict(id="demo-masks", instance_data_dir=str(mask_dir), dataset_type="conditioning",
                 conditioning_type="mask")
    return demo_spec(tiny_model_dir, demo_data_dir, out, overrides=list(overrides), datasets=[images, masks],
                     eval={"eval_steps_interval": None, "validation_step_interval": None, "eval_split_fraction": 0})


def test_masks_are_cached_reported_and_weigh_the_training_loss(ray_session, tiny_model_dir, demo_data_dir,
                                                               demo_spec, mask_dir, tmp_path):
    from flux_ray.data.cache import run_cache
    from flux_ray.train.build import build_loop_parts
    from flux_ray.train.loop import train_loop

    spec = _masked_spec(demo_spec, tiny_model_dir, demo_data_dir, tmp_path, mask_dir,
                        ["train.max_train_steps=4", "train.log_every=1"])
    summary = run_cache(spec).datasets["demo"]
    assert summary["skipped"].get(EMPTY_MASK) == 1 and summary["skipped"].get(NO_MASK) == 1
    assert summary["masks"]["with_mask"] == summary["usable"]
    again = run_cache(spec).datasets["demo"]
    assert again["masks"]["made_this_run"] == 0 and again["usable"] == summary["usable"]  # nothing redone

    parts = build_loop_parts(spec, torch.device("cpu"), 0, 1)
    assert len(parts.train_samples) == summary["usable"]
    sample = parts.train_samples[0]
    batch = parts.reader.batch([sample])
    mask = batch.loss_mask[0, 0]
    assert mask.shape == batch.latents.shape[2:]
    w = mask.shape[1]
    assert mask[:, : w // 2 - 1].min() > 0.9 and mask[:, w // 2 + 1:].max() < 0.1  # the left half, at latent size

    plain = demo_spec(tiny_model_dir, demo_data_dir, tmp_path / "plain", overrides=["train.max_train_steps=4",
                                                                                   "train.log_every=1"],
                      datasets=[dict(id="demo", instance_data_dir=demo_data_dir, caption_strategy="textfile",
                                     resolution=128, resolution_type="pixel_area")],
                      eval={"eval_steps_interval": None, "validation_step_interval": None, "eval_split_fraction": 0})
    unmasked = build_loop_parts(plain, torch.device("cpu"), 0, 1)
    half = parts.loss_fn(parts.reader.batch([sample]), torch.Generator().manual_seed(1)).item()
    [same] = [s for s in unmasked.train_samples if s.sample_id == sample.sample_id]
    assert not same.mask_id
    full = unmasked.loss_fn(unmasked.reader.batch([same]), torch.Generator().manual_seed(1)).item()
    assert 0.2 * full < half < 0.8 * full  # the same sample, noise and LoRA: the mask keeps about half the loss

    runs = []
    for p in (parts, unmasked):
        runs.append([])
        train_loop(p, lambda m, c, out=runs[-1]: out.append(m["train_loss"]))
    assert len(runs[0]) == len(runs[1]) == 4
    assert sum(runs[0]) < 0.8 * sum(runs[1])  # the masked run's losses count about half the pixels
