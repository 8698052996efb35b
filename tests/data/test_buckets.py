import numpy as np
import pytest

from flux_ray.data.buckets import bucket_for, dataset_bucket, pre_crop_scale, resize_and_crop_plan
from flux_ray.spec import DatasetSpec

# (w, h) -> pixel_area@1024, pixel_area@512, pixel@1024, pixel@512
TABLE = [
    ((1024, 1024), (1024, 1024), (512, 512), (1024, 1024), (512, 512)),
    ((1000, 999), (1024, 1024), (512, 512), (1024, 1024), (512, 512)),
    ((1920, 1080), (1344, 768), (704, 384), (1792, 1024), (896, 512)),
    ((1080, 1920), (768, 1344), (384, 704), (1024, 1792), (512, 896)),
    ((4000, 3000), (1152, 896), (576, 448), (1344, 1024), (704, 512)),
    ((3000, 4000), (896, 1152), (448, 576), (1024, 1344), (512, 704)),
    ((800, 600), (1152, 896), (576, 448), (1344, 1024), (704, 512)),
    ((1500, 1000), (1280, 832), (640, 448), (1536, 1024), (768, 512)),
    ((2000, 1000), (1472, 704), (704, 384), (2048, 1024), (1024, 512)),
    ((2048, 512), (2048, 512), (1024, 256), (4096, 1024), (2048, 512)),
    ((5000, 1000), (2048, 512), (1024, 256), (4096, 1024), (2048, 512)),  # clamped to 4:1
    ((100, 150), (832, 1280), (448, 640), (1024, 1536), (512, 768)),
]


@pytest.mark.parametrize("size,area1024,area512,pixel1024,pixel512", TABLE)
def test_bucket_table(size, area1024, area512, pixel1024, pixel512):
    assert bucket_for(*size, 1024, "pixel_area") == area1024
    assert bucket_for(*size, 512, "pixel_area") == area512
    assert bucket_for(*size, 1024, "pixel") == pixel1024
    assert bucket_for(*size, 512, "pixel") == pixel512
    for bucket in (area1024, area512, pixel1024, pixel512):
        assert bucket[0] % 64 == 0 and bucket[1] % 64 == 0
    assert bucket_for(size[1], size[0], 1024, "pixel_area") == area1024[::-1]  # transpose-symmetric


def test_square_crop_aspect_and_dataset_bucket():
    assert bucket_for(1920, 1080, 1000, "pixel_area", crop_aspect="square") == (1024, 1024)
    ds = DatasetSpec(id="d", instance_data_dir="x", resolution=512, crop_aspect="square", crop=True)
    assert dataset_bucket(1920, 1080, ds) == (512, 512)
    assert dataset_bucket(1920, 1080, ds.model_copy(update={"crop_aspect": "preserve"})) == (704, 384)


@pytest.mark.parametrize("style", ["center", "random", "corner"])
@pytest.mark.parametrize("orig", [(1920, 1080), (1080, 1920), (97, 300), (4000, 3000), (512, 512)])
def test_crop_plan_covers_bucket_and_stays_inside(style, orig):
    rng = np.random.default_rng(0)
    bucket = bucket_for(*orig, 512, "pixel_area")
    for _ in range(5):
        rw, rh, (left, top, right, bottom) = resize_and_crop_plan(*orig, *bucket, style, rng)
        assert (right - left, bottom - top) == bucket
        assert 0 <= left and 0 <= top and right <= rw and bottom <= rh
        assert rw >= bucket[0] and rh >= bucket[1]
        assert abs(rw / rh - orig[0] / orig[1]) < 0.02 * orig[0] / orig[1]  # aspect kept when resizing
        assert min(rw - bucket[0], rh - bucket[1]) <= 1  # scaled to cover: one axis fits exactly


def test_crop_styles_place_the_box():
    assert resize_and_crop_plan(1000, 500, 512, 512, "center")[2] == (256, 0, 768, 512)
    assert resize_and_crop_plan(1000, 500, 512, 512, "corner")[2] == (0, 0, 512, 512)
    a = resize_and_crop_plan(1000, 500, 512, 512, "random", np.random.default_rng(7))
    b = resize_and_crop_plan(1000, 500, 512, 512, "random", np.random.default_rng(7))
    assert a == b
    with pytest.raises(ValueError, match="Generator"):
        resize_and_crop_plan(1000, 500, 512, 512, "random")


def test_crop_mode_native_scale_and_downsample():
    ds = DatasetSpec(id="d", instance_data_dir="x", resolution=512, resolution_type="pixel", crop=True)
    assert pre_crop_scale(4000, 3000, ds.model_copy(update={"crop": False})) is None
    assert pre_crop_scale(4000, 3000, ds) == 1.0  # crop at native resolution
    big = ds.model_copy(update={"maximum_image_size": 2048, "target_downsample_size": 1024})
    assert pre_crop_scale(4000, 3000, big) == pytest.approx(1024 / 3000)
    assert pre_crop_scale(1600, 1200, big) == 1.0  # not beyond the maximum
    rw, rh, box = resize_and_crop_plan(4000, 3000, 704, 512, "center", scale=pre_crop_scale(4000, 3000, big))
    assert (rw, rh) == (1365, 1024) and box == (330, 256, 1034, 768)
    area = big.model_copy(update={"resolution_type": "pixel_area"})
    assert pre_crop_scale(4000, 3000, area) == pytest.approx((1024 * 1024 / 12e6) ** 0.5)
