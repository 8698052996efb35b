"""Bytes -> RGB PIL image -> bucket-sized float pixels in [-1, 1] (CHW), or a SkipImage reason."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from flux_ray.data.buckets import MAX_ASPECT, dataset_bucket, pre_crop_scale, resize_and_crop_plan

if TYPE_CHECKING:
    from flux_ray.spec import DatasetSpec

MIN_SIDE = 16
"""Images with a side under 16 px are skipped even without ``minimum_image_size``."""
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class SkipImage(Exception):
    """An input image that cannot be trained on; ``reason`` is a short code for counting."""

    def __init__(self, reason: str, name: str, detail: str = ""):
        self.reason, self.name = reason, name
        self.detail = detail
        super().__init__(f"{name}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # survive pickling across Ray workers
        return SkipImage, (self.reason, self.name, self.detail)


@dataclass(frozen=True)
class PreparedImage:
    pixels_u8: np.ndarray
    """uint8 RGB, shape (3, bucket_h, bucket_w): 4x fewer bytes than floats through Ray's object store."""
    bucket_w: int
    bucket_h: int
    orig_w: int
    """Size after EXIF orientation, before any resize."""
    orig_h: int
    crop_box: tuple[int, int, int, int]
    """(left, top, right, bottom) in the resized image."""

    @property
    def pixels_chw(self) -> np.ndarray:
        """float32 in [-1, 1], the VAE's input (``normalize_pixels`` of ``pixels_u8``)."""
        return normalize_pixels(self.pixels_u8)


def normalize_pixels(u8: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], as diffusers' VaeImageProcessor (x / 127.5 - 1)."""
    return u8.astype(np.float32) / 127.5 - 1.0


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _WIDE_INT_MODES:  # 16/32-bit grey: scale to 8 bits instead of clipping at 255
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8), "L")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode fully (first frame), apply EXIF orientation, convert to RGB; raise SkipImage.

    Images over PIL's ``Image.MAX_IMAGE_PIXELS`` (decompression-bomb guard, ~89 MP) are skipped
    as ``too_large``; raise that global in the process if such images are expected.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{img.width}x{img.height} is over PIL's MAX_IMAGE_PIXELS")
        img.load()  # decode now: truncated data fails here, not later in a worker
    except Image.DecompressionBombError as e:
        raise SkipImage("too_large", name, str(e)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for bad files
        raise SkipImage("unreadable", name, f"{type(e).__name__}: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a corrupt EXIF block must not cost the image; keep it unrotated
        pass
    try:
        return _to_rgb(img)
    except Exception as e:
        raise SkipImage("unreadable", name, f"cannot convert mode {img.mode}: {e}") from None


def check_size(width: int, height: int, name: str, ds: DatasetSpec) -> None:
    """SkipImage when the image is below the dataset minimum or beyond the aspect cap.

    ``minimum_image_size`` is the short side for ``pixel`` and ``size^2`` pixels of area for
    ``pixel_area`` (SimpleTuner converts pixel_area sizes to megapixels the same way).
    """
    short, long_ = min(width, height), max(width, height)
    if short < MIN_SIDE:
        raise SkipImage("too_small", name, f"{width}x{height}, a side is under {MIN_SIDE}px")
    minimum = ds.minimum_image_size
    if minimum is not None:
        small = short < minimum if ds.resolution_type == "pixel" else width * height < minimum * minimum
        if small:
            raise SkipImage("too_small", name, f"{width}x{height} < minimum_image_size {minimum}")
    if long_ / short > MAX_ASPECT:
        raise SkipImage("extreme_aspect", name, f"{width}x{height} is beyond {MAX_ASPECT:g}:1")


def crop_rng(seed: int, name: str) -> np.random.Generator:
    """Per-image generator: the same (seed, name) always gives the same random crop."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, digest])  # numpy wants non-negative


def prepare_image(data: bytes, name: str, ds: DatasetSpec, seed: int) -> PreparedImage:
    """Decode, check, resize (LANCZOS) and crop one image to its bucket."""
    img = decode_image(data, name)
    orig_w, orig_h = img.size
    check_size(orig_w, orig_h, name, ds)
    bucket_w, bucket_h = dataset_bucket(orig_w, orig_h, ds)
    resize_w, resize_h, box = resize_and_crop_plan(
        orig_w, orig_h, bucket_w, bucket_h, ds.crop_style, crop_rng(seed, name),
        scale=pre_crop_scale(orig_w, orig_h, ds))
    if (resize_w, resize_h) != (orig_w, orig_h):
        img = img.resize((resize_w, resize_h), resample=Image.Resampling.LANCZOS)
    img = img.crop(box)
    pixels = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
    return PreparedImage(pixels, bucket_w, bucket_h, orig_w, orig_h, box)


class DecodeAndCrop:
    """Reads an image (local or S3), decodes, buckets and crops it; bad files become skip rows."""

    def __init__(self, dataset_spec, storage_spec=None, seed: int = 0):
        self.ds = dataset_spec
        self.storage = storage_spec
        self.seed = seed

    def __call__(self, row: dict) -> dict:
        from flux_ray.data import sources

        out = dict(row, skip_reason="", pixels=np.zeros(0, np.uint8), bucket_w=0, bucket_h=0, orig_w=0,
                   orig_h=0, crop_box=[0, 0, 0, 0])
        try:
            ref = sources.ImageRef(**{k: row[k] for k in ("dataset_id", "uri", "rel_path", "size", "mtime_ns")})
            data = sources.read_bytes(ref, self.ds, self.storage)
            prep = prepare_image(data, row["rel_path"], self.ds, seed=self.seed ^ hash_int(row["sample_id"]))
        except SkipImage as e:
            out["skip_reason"] = e.reason
            return out
        except OSError as e:  # unreadable source: count it, never crash the job
            out["skip_reason"] = f"read_error:{type(e).__name__}"
            return out
        out.update(pixels=prep.pixels_u8.ravel(), bucket_w=prep.bucket_w, bucket_h=prep.bucket_h,
                   orig_w=prep.orig_w, orig_h=prep.orig_h, crop_box=list(prep.crop_box))
        return out


def hash_int(text: str) -> int:
    return int(text[:8], 16)


def decode_row(row: dict, dataset_spec, storage_spec=None, seed: int = 0) -> dict:
    """``DecodeAndCrop`` as a function, for Ray Data CPU tasks (they reuse worker processes; this module
    imports no torch, so a task worker starts in a fraction of a second)."""
    return DecodeAndCrop(dataset_spec, storage_spec, seed)(row)

