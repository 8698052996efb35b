"""Kontext reference images (a ``conditioning_type: reference_strict`` or ``reference_loose`` dataset linked by
``conditioning_data``): one reference per training image, matched by file name (``masks.match_by_name``),
decoded by Ray Data CPU tasks and VAE-encoded by the cache's VAE actors into a cache of their own
(data/cache_references.py). Torch-free.

- ``reference_strict``: the reference is scaled to its image's size, then resized and cropped with the image's own
  plan (same bucket, same crop box, the same random-crop draw), so its latents lie on the image's grid.
- ``reference_loose``: the reference is bucketed and cropped on its own (the image dataset's resolution options,
  the reference's own aspect), as SimpleTuner's loose mode.

An image without a reference (``no_reference``) or with a bad one (``reference_<reason>``: unreadable, too small
...) is a skip row, counted in the cache summary like a bad image and left out of training.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from flux_ray.data.decode import SkipImage, decode_image, hash_int, prepare_image
from flux_ray.data.masks import crop_like_image, match_by_name

NO_REFERENCE = "no_reference"
match_references = match_by_name


def prepare_strict_reference(data: bytes, image_rel_path: str, image_ds, seed: int, orig_w: int,
                             orig_h: int) -> np.ndarray:
    """Reference bytes -> uint8 RGB (3, bucket_h, bucket_w) cropped exactly as its image was; raises SkipImage."""
    img = crop_like_image(decode_image(data, image_rel_path), image_rel_path, image_ds, seed, orig_w, orig_h,
                          Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def reference_row(row: dict, image_ds, reference_ds, storage_spec=None, seed: int = 0) -> dict:
    """Ray Data task: one image row (``sample_id``, ``rel_path``, sizes, ``reference_*`` ref fields) -> a row of
    reference pixels for the VAE stage (``sample_id``, ``skip_reason``, ``bucket_w/h``, ``pixels``)."""
    from flux_ray.data import sources

    out = {"reference_id": row["reference_id"], "sample_id": row["sample_id"], "rel_path": row["rel_path"],
           "reference_rel_path": row.get("reference_rel_path") or "", "skip_reason": "",
           "pixels": np.zeros(0, np.uint8), "bucket_w": 0, "bucket_h": 0}
    if not row.get("reference_uri"):
        out["skip_reason"] = NO_REFERENCE
        return out
    try:
        ref = sources.ImageRef(reference_ds.id, row["reference_uri"], row["reference_rel_path"],
                               row["reference_size"], row["reference_mtime_ns"])
        data = sources.read_bytes(ref, reference_ds, storage_spec)
        if reference_ds.conditioning_type == "reference_strict":
            # the image's own crop draw: DecodeAndCrop seeds it with seed ^ hash_int(sample_id) and the image's path
            pixels = prepare_strict_reference(data, row["rel_path"], image_ds, seed ^ hash_int(row["sample_id"]),
                                              row["orig_w"], row["orig_h"])
        else:
            pixels = prepare_image(data, row["reference_rel_path"], image_ds,
                                   seed=seed ^ hash_int(row["reference_id"])).pixels_u8
    except SkipImage as e:
        out["skip_reason"] = f"reference_{e.reason}"
        return out
    except OSError as e:
        out["skip_reason"] = f"reference_read_error:{type(e).__name__}"
        return out
    out.update(pixels=pixels.ravel(), bucket_w=pixels.shape[2], bucket_h=pixels.shape[1])
    return out
