import io
import pickle

import numpy as np
import pytest
from PIL import Image

from flux_ray.data.decode import SkipImage, decode_image, prepare_image
from flux_ray.spec import DatasetSpec


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def dataset(**kw) -> DatasetSpec:
    return DatasetSpec(id="d", instance_data_dir="unused", **{"resolution": 128, **kw})


def test_truncated_jpeg_and_non_image_are_unreadable():
    jpeg = encode(Image.new("RGB", (200, 150), (10, 200, 30)), "JPEG")
    for data, name in [(jpeg[: len(jpeg) // 2], "cut.jpg"), (b"just some text\n" * 20, "note.png"), (b"", "e.png")]:
        with pytest.raises(SkipImage) as info:
            decode_image(data, name)
        assert info.value.reason == "unreadable" and name in str(info.value)


def test_cmyk_jpeg_to_rgb():
    img = decode_image(encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), "cmyk.jpg")
    assert img.mode == "RGB" and img.size == (40, 30)
    r, g, b = img.getpixel((20, 15))
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full -> red


def test_16_bit_png_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    arr = np.asarray(decode_image(data, "deep.png"))
    assert arr.shape == (32, 64, 3) and arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255
    assert 120 <= arr[0, 32, 0] <= 135  # mid-grey stays mid-grey


def test_palette_with_transparency_and_rgba_composite_on_white():
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (10, 0, 20, 20))
    out = decode_image(encode(pal, "PNG", transparency=0), "pal.png")
    assert out.getpixel((2, 2)) == (255, 255, 255) and out.getpixel((15, 5)) == (255, 0, 0)
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 128), (0, 0, 10, 20))
    out = decode_image(encode(rgba, "PNG"), "rgba.png")
    assert out.getpixel((15, 5)) == (255, 255, 255)
    assert out.getpixel((5, 5))[2] == 255 and 120 <= out.getpixel((5, 5))[0] <= 135


def test_exif_orientation_6_swaps_width_and_height():
    img = Image.new("RGB", (60, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 30, 40))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95), "rot.jpg")
    assert out.size == (40, 60)
    assert out.getpixel((20, 5))[2] > 200  # the blue left half is now on top


def test_size_and_aspect_limits():
    tiny = encode(Image.new("RGB", (12, 12)), "PNG")
    with pytest.raises(SkipImage, match="too_small"):
        prepare_image(tiny, "tiny.png", dataset(), seed=0)
    small = encode(Image.new("RGB", (100, 80)), "PNG")
    with pytest.raises(SkipImage) as info:
        prepare_image(small, "small.png", dataset(minimum_image_size=90, resolution_type="pixel"), seed=0)
    assert info.value.reason == "too_small"
    prepare_image(small, "small.png", dataset(minimum_image_size=89), seed=0)  # 8000 px >= 89^2 area
    wide = encode(Image.new("RGB", (500, 50)), "PNG")
    with pytest.raises(SkipImage) as info:
        prepare_image(wide, "wide.png", dataset(), seed=0)
    assert info.value.reason == "extreme_aspect" and "wide.png" in str(info.value)
    again = pickle.loads(pickle.dumps(info.value))  # crosses Ray process boundaries
    assert again.reason == "extreme_aspect" and str(again) == str(info.value)


def test_prepare_image_pixels_bucket_and_seeded_random_crop():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)), "PNG")
    ds = dataset(crop=True, crop_style="random", resolution_type="pixel")
    a = prepare_image(data, "noise.png", ds, seed=3)
    assert (a.bucket_w, a.bucket_h, a.orig_w, a.orig_h) == (192, 128, 500, 300)
    assert a.pixels_chw.shape == (3, 128, 192) and a.pixels_chw.dtype == np.float32
    assert a.pixels_chw.min() >= -1.0 and a.pixels_chw.max() <= 1.0
    b = prepare_image(data, "noise.png", ds, seed=3)
    assert a.crop_box == b.crop_box and np.array_equal(a.pixels_chw, b.pixels_chw)
    boxes = {prepare_image(data, "noise.png", ds, seed=s).crop_box for s in range(-3, 3)}
    assert len(boxes) > 1  # native-resolution crops move with the seed
    native = np.asarray(Image.open(io.BytesIO(data)).crop(a.crop_box), np.float32).transpose(2, 0, 1)
    assert np.allclose(a.pixels_chw, native / 127.5 - 1.0)  # crop=True, no downsample: native pixels


def test_prepare_image_resizes_to_cover_when_not_cropping():
    img = Image.new("RGB", (400, 200), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 200, 200))
    out = prepare_image(encode(img, "PNG"), "half.png", dataset(resolution=128), seed=0)
    assert (out.bucket_w, out.bucket_h) == (192, 64)  # 2:1 at 128^2 pixels
    assert out.pixels_chw[:, :, :80].max() < -0.9 and out.pixels_chw[:, :, -80:].min() > 0.9


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_guard_is_too_large(monkeypatch):
    data = encode(Image.new("RGB", (40, 40)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(SkipImage) as info:
        decode_image(data, "bomb.png")
    assert info.value.reason == "too_large"
