"""Aspect buckets and resize/crop plans (pure functions; Flux sides are multiples of 64).

The bucket rule follows SimpleTuner's ``MultiaspectImage`` without its special cases:

* the aspect ratio ``a = w / h`` is rounded to 2 decimals (SimpleTuner's ``aspect_bucket_rounding``)
  and clamped to ``[1/MAX_ASPECT, MAX_ASPECT]``. Unlike SimpleTuner the rounding is applied to
  long/short, so a transposed image always gets the transposed bucket;
* ``pixel_area``: ``w' = sqrt(res^2 * a)``, ``h' = sqrt(res^2 / a)``, each rounded to the nearest
  multiple of the alignment (at least one alignment), so a bucket holds about ``res^2`` pixels;
* ``pixel``: the short side is ``res`` and the long side ``res * a``, both rounded the same way;
* ``crop_aspect: square`` (only with ``crop: true``) gives ``(res, res)``. ``closest`` / ``random``
  need SimpleTuner's ``crop_aspect_buckets`` list, which the spec does not have: they act as
  ``preserve``.

A bucket always matches the image's aspect closely, so the image is scaled to *cover* it and the
few extra pixels on one axis are cropped (``crop_style`` chooses where). With ``crop: true`` the crop
is taken at native resolution as in SimpleTuner, after an optional downsample of images larger than
``maximum_image_size`` to ``target_downsample_size`` (both read as edge lengths for ``pixel`` and as
``size^2`` areas for ``pixel_area``); an image too small for its bucket is scaled up to cover it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from flux_ray.spec import DatasetSpec

ALIGNMENT = 64
MAX_ASPECT = 4.0
"""Images wider or taller than 4:1 are skipped (decode), and buckets never exceed it."""
ASPECT_ROUNDING = 2

CropBox = tuple[int, int, int, int]


def round_to_multiple(value: float, multiple: int = ALIGNMENT) -> int:
    """Nearest multiple of ``multiple``, never below ``multiple`` (SimpleTuner's rounding)."""
    return max(multiple, int(round(value / multiple)) * multiple)


def aspect_of(width: int, height: int) -> float:
    """w / h with long/short rounded like SimpleTuner and clamped to ``MAX_ASPECT``."""
    ratio = min(round(max(width, height) / min(width, height), ASPECT_ROUNDING), MAX_ASPECT)
    return ratio if width >= height else 1.0 / ratio


def bucket_for(width: int, height: int, resolution: int,
               resolution_type: Literal["pixel", "pixel_area"] = "pixel_area", alignment: int = ALIGNMENT,
               crop_aspect: str = "preserve") -> tuple[int, int]:
    """(bucket_w, bucket_h) for an image of ``width x height`` (see the module docstring)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if crop_aspect == "square":
        side = round_to_multiple(resolution, alignment)
        return side, side
    ratio = aspect_of(max(width, height), min(width, height))  # landscape bucket, transposed below
    if resolution_type == "pixel_area":
        area = float(resolution) ** 2
        long_side, short_side = math.sqrt(area * ratio), math.sqrt(area / ratio)
    elif resolution_type == "pixel":
        long_side, short_side = resolution * ratio, resolution
    else:
        raise ValueError(f"unknown resolution_type {resolution_type!r}")
    long_side, short_side = round_to_multiple(long_side, alignment), round_to_multiple(short_side, alignment)
    return (long_side, short_side) if width >= height else (short_side, long_side)


def dataset_bucket(width: int, height: int, ds: DatasetSpec) -> tuple[int, int]:
    """The bucket of an image in dataset ``ds``; ``crop_aspect`` applies only with ``crop: true``."""
    crop_aspect = ds.crop_aspect if ds.crop else "preserve"
    return bucket_for(width, height, ds.resolution, ds.resolution_type, ALIGNMENT, crop_aspect)


def pre_crop_scale(width: int, height: int, ds: DatasetSpec) -> float | None:
    """Resize factor before the crop; None means "scale to cover the bucket".

    Without ``crop`` the image is scaled to cover its bucket. With ``crop`` it stays at native
    size (1.0) unless it exceeds ``maximum_image_size`` and ``target_downsample_size`` is set.
    """
    if not ds.crop:
        return None
    big, target = ds.maximum_image_size, ds.target_downsample_size
    if big is None or target is None:
        return 1.0
    if ds.resolution_type == "pixel":
        if max(width, height) <= big:
            return 1.0
        return min(1.0, target / min(width, height))
    if width * height <= big * big:
        return 1.0
    return min(1.0, math.sqrt(target * target / (width * height)))


def resize_and_crop_plan(orig_w: int, orig_h: int, bucket_w: int, bucket_h: int,
                         crop_style: Literal["center", "random", "corner"] = "center",
                         rng: np.random.Generator | None = None, *,
                         scale: float | None = None) -> tuple[int, int, CropBox]:
    """(resize_w, resize_h, (left, top, right, bottom)) taking ``orig`` to a ``bucket`` crop.

    The image is resized by ``scale`` (default and minimum: the factor that covers the bucket),
    then a bucket-sized box is cut at the center, the top-left corner, or a position drawn from
    ``rng``. The box always lies inside the resized image.
    """
    cover = max(bucket_w / orig_w, bucket_h / orig_h)
    factor = cover if scale is None else max(scale, cover)
    resize_w = max(bucket_w, int(round(orig_w * factor)))
    resize_h = max(bucket_h, int(round(orig_h * factor)))
    spare_w, spare_h = resize_w - bucket_w, resize_h - bucket_h
    if crop_style == "center":
        left, top = spare_w // 2, spare_h // 2
    elif crop_style == "corner":
        left, top = 0, 0
    elif crop_style == "random":
        if rng is None:
            raise ValueError("crop_style random needs a numpy Generator")
        left, top = int(rng.integers(0, spare_w + 1)), int(rng.integers(0, spare_h + 1))
    else:
        raise ValueError(f"unknown crop_style {crop_style!r}")
    return resize_w, resize_h, (left, top, left + bucket_w, top + bucket_h)
