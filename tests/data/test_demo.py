import os

import pytest

from flux_ray.data.decode import prepare_image
from flux_ray.data.demo import write_demo_data
from flux_ray.data.sources import captions_for, list_images, read_bytes
from flux_ray.spec import DatasetSpec


def test_demo_data_is_deterministic_captioned_and_trainable(tmp_path):
    assert write_demo_data(tmp_path / "a", n=12, seed=1) == 12
    write_demo_data(tmp_path / "b", n=12, seed=1)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no temp folder left behind
    names = sorted(os.listdir(tmp_path / "a"))
    assert len(names) == 24 and names == sorted(os.listdir(tmp_path / "b"))
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    ds = DatasetSpec(id="demo", instance_data_dir=str(tmp_path / "a"), resolution=128)
    refs = list_images(ds)
    captions = captions_for(refs, ds)
    assert len(set(captions.values())) < len(refs)  # repeated on purpose
    buckets = {(p.bucket_w, p.bucket_h) for p in
               (prepare_image(read_bytes(r, ds), r.rel_path, ds, seed=0) for r in refs)}
    assert len(buckets) >= 3  # square, landscape and portrait


def test_demo_refuses_non_empty_folder_but_fills_an_empty_one(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_demo_data(tmp_path / "full", n=2)
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert write_demo_data(tmp_path / "empty", n=2) == 2
    assert len(os.listdir(tmp_path / "empty")) == 4
