"""Loss masks (a ``conditioning_type: mask`` dataset linked by ``conditioning_data``): one mask image per training
image, matched by file name, cropped exactly as its image was and stored at latent resolution. Torch-free: the
mask rows are made by Ray Data CPU tasks (data/cache.py ``cache_masks``).

A mask is read as grey: white (255) trains, black (0) is left out of the loss, grey weighs in between. It is
scaled to its image's size first (so a mask drawn at another resolution still lines up), then resized and
cropped with the image's own plan (same bucket, same crop box, the same random-crop draw), then reduced to the
latent grid by area averaging. A mask with nothing in it, or an image without a mask, is a skip row with a
reason (``empty_mask``, ``no_mask``), counted in the cache summary like a bad image and left out of training.
"""
from __future__ import annotations

import posixpath

import numpy as np
from PIL import Image

from flux_ray.data.buckets import dataset_bucket, pre_crop_scale, resize_and_crop_plan
from flux_ray.data.decode import SkipImage, crop_rng, decode_image, hash_int

EMPTY_MASK, NO_MASK = "empty_mask", "no_mask"


def _stem(rel_path: str) -> str:
    return posixpath.splitext(rel_path)[0]


def match_by_name(image_rel_paths: list[str], mask_refs: list) -> dict[str, object]:
    """image rel_path -> its mask (or reference) ref: the same path without extension (``a/b.jpg`` <- ``a/b.png``),
    else the same base name anywhere in the conditioning dataset when that name is unique there; images without
    one are left out."""
    by_stem = {_stem(r.rel_path): r for r in mask_refs}
    by_base: dict[str, list] = {}
    for r in mask_refs:
        by_base.setdefault(posixpath.basename(_stem(r.rel_path)), []).append(r)
    out = {}
    for rel in image_rel_paths:
        ref = by_stem.get(_stem(rel))
        if ref is None:
            same = by_base.get(posixpath.basename(_stem(rel)), [])
            ref = same[0] if len(same) == 1 else None
        if ref is not None:
            out[rel] = ref
    return out


match_masks = match_by_name


def crop_like_image(img: Image.Image, image_rel_path: str, image_ds, seed: int, orig_w: int, orig_h: int,
                    resample: Image.Resampling) -> Image.Image:
    """A companion of an image (its mask, its strict reference) scaled to the image's size, then resized and
    cropped with the image's own plan: the same bucket, box and random-crop draw (seeded by the image's path)."""
    if img.size != (orig_w, orig_h):
        img = img.resize((orig_w, orig_h), resample=resample)
    bucket_w, bucket_h = dataset_bucket(orig_w, orig_h, image_ds)
    resize_w, resize_h, box = resize_and_crop_plan(orig_w, orig_h, bucket_w, bucket_h, image_ds.crop_style,
                                                   crop_rng(seed, image_rel_path),
                                                   scale=pre_crop_scale(orig_w, orig_h, image_ds))
    if (resize_w, resize_h) != (orig_w, orig_h):
        img = img.resize((resize_w, resize_h), resample=resample)
    return img.crop(box)


def prepare_mask(data: bytes, image_rel_path: str, image_ds, seed: int, orig_w: int, orig_h: int,
                 latent_w: int, latent_h: int) -> np.ndarray:
    """Mask bytes -> uint8 (latent_h, latent_w), aligned with the image's crop; raises SkipImage."""
    img = crop_like_image(decode_image(data, image_rel_path).convert("L"), image_rel_path, image_ds, seed,
                          orig_w, orig_h, Image.Resampling.BILINEAR)
    img = img.resize((latent_w, latent_h), resample=Image.Resampling.BOX)
    mask = np.asarray(img, dtype=np.uint8)
    if not mask.any():
        raise SkipImage(EMPTY_MASK, image_rel_path, "the mask is black everywhere at latent resolution")
    return mask


def mask_row(row: dict, image_ds, mask_ds, storage_spec=None, seed: int = 0) -> dict:
    """Ray Data task: one image row (``sample_id``, ``rel_path``, sizes, ``mask_*`` ref fields) -> a mask row."""
    from flux_ray.data import sources

    out = {"mask_id": row["mask_id"], "sample_id": row["sample_id"], "rel_path": row["rel_path"],
           "mask_rel_path": row.get("mask_rel_path") or "", "skip_reason": "", "mask_h": 0, "mask_w": 0,
           "loss_mask": b""}
    if not row.get("mask_uri"):
        out["skip_reason"] = NO_MASK
        return out
    try:
        ref = sources.ImageRef(mask_ds.id, row["mask_uri"], row["mask_rel_path"], row["mask_size"],
                               row["mask_mtime_ns"])
        data = sources.read_bytes(ref, mask_ds, storage_spec)
        # the image's own crop draw: DecodeAndCrop seeds it with seed ^ hash_int(sample_id) and the image's path
        mask = prepare_mask(data, row["rel_path"], image_ds, seed ^ hash_int(row["sample_id"]), row["orig_w"],
                            row["orig_h"], row["latent_w"], row["latent_h"])
    except SkipImage as e:
        out["skip_reason"] = e.reason
        return out
    except OSError as e:
        out["skip_reason"] = f"read_error:{type(e).__name__}"
        return out
    out.update(mask_h=mask.shape[0], mask_w=mask.shape[1], loss_mask=mask.tobytes())
    return out
