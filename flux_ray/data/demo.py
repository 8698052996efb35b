"""A small generated image set with captions, for the demo job and tests.

Each image is a coloured shape on a two-tone gradient; the caption names the colour, shape and
background, so even a tiny LoRA has something to learn. Every fourth image repeats the previous
caption at another size, so the text-embedding cache sees duplicate captions.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "stripes")
SIZES = [(96, 96), (128, 128), (256, 256), (192, 128), (256, 160), (128, 192), (160, 256), (240, 96)]


def _background(size: tuple[int, int], rgb: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    ramp = np.linspace(0.85, 1.15, w if rng.random() < 0.5 else h)
    ramp = ramp[None, :, None] if ramp.size == w else ramp[:, None, None]
    pixels = np.clip(np.asarray(rgb, np.float32)[None, None, :] * ramp + 10, 0, 255)
    return Image.fromarray(np.broadcast_to(pixels, (h, w, 3)).astype(np.uint8), "RGB")


def _draw(img: Image.Image, shape: str, rgb: tuple[int, int, int], rng: np.random.Generator) -> None:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    r = int(min(w, h) * rng.uniform(0.25, 0.4))
    cx, cy = int(rng.integers(r, w - r + 1)), int(rng.integers(r, h - r + 1))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    else:
        step = max(4, min(w, h) // 8)
        for x in range(0, w, 2 * step):
            draw.rectangle([x, 0, x + step - 1, h], fill=rgb)


def _image_specs(n: int, rng: np.random.Generator) -> list[tuple[str, str, str, tuple[int, int]]]:
    specs = []
    for i in range(n):
        size = SIZES[i % len(SIZES)]
        if i % 4 == 3:  # same caption as the previous image, different size
            colour, shape, bg, _ = specs[-1]
        else:
            colour = str(rng.choice(list(COLOURS)))
            shape = str(rng.choice(SHAPES))
            bg = str(rng.choice(list(BACKGROUNDS)))
        specs.append((colour, shape, bg, size))
    return specs


def caption_text(colour: str, shape: str, background: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    thing = f"{colour} stripes" if shape == "stripes" else f"{article} {colour} {shape}"
    return f"{thing} on a {background} background"


def write_demo_data(directory: str | os.PathLike, n: int = 32, seed: int = 0) -> int:
    """Write ``n`` images (PNG and JPEG) with ``<stem>.txt`` captions; returns n.

    The folder appears complete or not at all (built in a temp folder, then renamed). An existing
    non-empty folder is never touched: FileExistsError.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    target = os.path.abspath(os.fspath(directory))
    if os.path.isdir(target) and os.listdir(target) or os.path.isfile(target):
        raise FileExistsError(f"{target!r} exists and is not empty; not writing demo data there")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    rng = np.random.default_rng(seed)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.tmp-")
    try:
        for i, (colour, shape, bg, size) in enumerate(_image_specs(n, rng)):
            img = _background(size, BACKGROUNDS[bg], rng)
            _draw(img, shape, COLOURS[colour], rng)
            stem = f"{i:03d}_{colour}_{shape}"
            if i % 2:
                img.save(os.path.join(tmp, stem + ".jpg"), "JPEG", quality=92)
            else:
                img.save(os.path.join(tmp, stem + ".png"), "PNG")
            with open(os.path.join(tmp, stem + ".txt"), "w", encoding="utf-8") as f:
                f.write(caption_text(colour, shape, bg) + "\n")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # an empty existing folder is replaced atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return n
