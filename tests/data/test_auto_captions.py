"""caption_strategy auto (a tiny random captioner on a Ray Data actor pool) and zip / tar datasets."""
from __future__ import annotations

import io
import os
import tarfile
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux_ray import storage
from flux_ray.data.auto_captions import manifest_uri, read_manifest
from flux_ray.data.cache import list_dataset
from flux_ray.data.captioner import Captioner, load_for_caption
from flux_ray.data.sources import caption_from_filename, list_images
from flux_ray.spec import CaptionerSpec, DatasetSpec, load_spec

pytestmark = pytest.mark.slow


def _images(d: str, n: int) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.endswith(".png"))[:n]


def _spec(tiny_model_dir, tmp_path, dataset: dict, **sections):
    data = {"model": {"pretrained_model_name_or_path": tiny_model_dir}, "datasets": [dataset],
            "cache": {"uri": str(tmp_path / "cache")}, "output": {"uri": str(tmp_path / "out")}, **sections}
    return load_spec(data=data)


def test_captioner_callable_captions_each_loaded_image(tiny_captioner_dir, demo_data_dir):
    ds = DatasetSpec(id="d", instance_data_dir=demo_data_dir)
    refs = list_images(ds)[:3]
    rows = [load_for_caption({**r.__dict__}, ds) for r in refs]
    rows.append(load_for_caption({**refs[0].__dict__, "uri": demo_data_dir + "/missing.png"}, ds))
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    out = Captioner(CaptionerSpec(model_name=tiny_captioner_dir, query_str="", max_new_tokens=6, batch_size=2))(batch)
    assert list(out["rel_path"]) == [r.rel_path for r in refs] + [refs[0].rel_path]
    assert all(isinstance(c, str) and c.strip() for c in out["caption"][:3])
    assert out["caption"][3] == "" and out["error"][3].startswith("read_error")
    # max_new_tokens bounds the caption; query_str is given with each image (BLIP continues it)
    short = Captioner(CaptionerSpec(model_name=tiny_captioner_dir, query_str="", max_new_tokens=2))(batch)
    assert all(len(s.split()) < len(c.split()) or len(s) < len(c) for s, c in zip(short["caption"][:3], out["caption"]))
    asked = Captioner(CaptionerSpec(model_name=tiny_captioner_dir, query_str="q", max_new_tokens=6))(batch)
    assert list(asked["caption"][:3]) != list(out["caption"][:3])


def test_auto_captions_are_computed_once_kept_editable_and_get_the_trigger_word(
        ray_session, tiny_model_dir, tiny_captioner_dir, demo_data_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = _images(demo_data_dir, 4)
    for n in names:  # images only, no .txt ...
        (folder / n).write_bytes(open(os.path.join(demo_data_dir, n), "rb").read())
    # ... but one written by the user, two lines = two captions (each gets the trigger word)
    (folder / (names[0][:-4] + ".txt")).write_text("my own caption\na second one\n")
    manifest = tmp_path / "captions.parquet"
    ds = {"id": "photos", "instance_data_dir": str(folder), "caption_strategy": "auto", "trigger_word": "ohwx",
          "captioner": {"model_name": tiny_captioner_dir, "query_str": "", "max_new_tokens": 5,
                        "output_parquet": str(manifest), "num_actors": 1, "batch_size": 2}}
    spec = _spec(tiny_model_dir, tmp_path, ds)
    first = list_dataset(spec, spec.datasets[0])
    assert first.auto_captioned == 3 and first.caption_manifest == str(manifest)
    rows = read_manifest(str(manifest), None)
    assert sorted(rows) == names[1:]  # the user's .txt caption is not recaptioned
    by_name = {r.rel_path: first.captions[r.uri] for r in first.refs}
    assert by_name[names[0]] == ["ohwx, my own caption", "ohwx, a second one"]
    assert all(by_name[n] == [f"ohwx, {rows[n]}"] and rows[n] for n in names[1:])  # one auto caption per image
    table = pq.read_table(manifest)
    assert table.column_names == ["filename", "caption", "model_name"]
    assert set(table["model_name"].to_pylist()) == {tiny_captioner_dir}

    # an edited caption is used, and nothing is captioned again
    edited = table.to_pylist()
    edited[0]["caption"] = "a hand-fixed caption"
    pq.write_table(pa.Table.from_pylist(edited), manifest)
    second = list_dataset(spec, spec.datasets[0])
    assert second.auto_captioned == 0
    assert {r.rel_path: second.captions[r.uri] for r in second.refs}[edited[0]["filename"]] == \
        ["ohwx, a hand-fixed caption"]

    # a new image is the only one captioned; the default manifest lives in the cache
    (folder / "new.png").write_bytes(open(os.path.join(demo_data_dir, _images(demo_data_dir, 5)[4]), "rb").read())
    third = list_dataset(spec, spec.datasets[0])
    assert third.auto_captioned == 1 and sorted(read_manifest(str(manifest), None)) == sorted(names[1:] + ["new.png"])
    default = spec.datasets[0].model_copy(update={"captioner": CaptionerSpec(model_name=tiny_captioner_dir)})
    assert manifest_uri(default, spec.cache.uri).startswith(str(tmp_path / "cache" / "captions" / "photos-"))
    other_model = default.model_copy(update={"captioner": CaptionerSpec(model_name="org/other")})
    assert manifest_uri(other_model, spec.cache.uri) != manifest_uri(default, spec.cache.uri)


def _zip_of(demo_data_dir, names, path, captions: bool):
    with zipfile.ZipFile(path, "w") as zf:
        for n in names:
            zf.write(os.path.join(demo_data_dir, n), f"set/{n}")
            if captions:
                zf.writestr(f"set/{n[:-4]}.txt", f"caption of {n}")
        zf.writestr("../evil.png", b"outside")  # never written outside the folder
        zf.writestr("__MACOSX/set/._x.png", b"resource fork")
        zf.writestr("readme.md", b"not kept")


def test_zip_dataset_is_extracted_once_by_a_ray_worker(ray_session, tiny_model_dir, demo_data_dir, tmp_path):
    names = _images(demo_data_dir, 3)
    archive = tmp_path / "photos.zip"
    _zip_of(demo_data_dir, names, archive, captions=True)
    spec = _spec(tiny_model_dir, tmp_path, {"id": "z", "instance_data_dir": str(archive)})
    listing = list_dataset(spec, spec.datasets[0])
    assert [r.rel_path for r in listing.refs] == [f"set/{n}" for n in names]
    assert [listing.captions[r.uri] for r in listing.refs] == [[f"caption of {n}"] for n in names]
    dest = listing.source.instance_data_dir
    assert dest.startswith(str(tmp_path / "cache" / "extracted" / "z-"))
    marker = storage.read_json(os.path.join(dest, "_extracted.json"))
    assert marker["images"] == 3 and marker["files"] == 6 and os.getpid() not in marker["worker_pids"]
    assert not (tmp_path / "cache" / "extracted" / "evil.png").exists()
    assert sorted(os.listdir(dest)) == ["_extracted.json", "set"]
    mtimes = [r.mtime_ns for r in listing.refs]
    again = list_dataset(spec, spec.datasets[0])
    assert [r.mtime_ns for r in again.refs] == mtimes  # not extracted again

    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("notes.txt", "no images")
    spec = _spec(tiny_model_dir, tmp_path, {"id": "e", "instance_data_dir": str(empty)})
    with pytest.raises(ValueError, match="holds no images"):
        list_dataset(spec, spec.datasets[0])


def test_tar_dataset_on_s3_is_extracted_into_an_s3_cache(ray_session, s3_server, tiny_model_dir, demo_data_dir,
                                                         tmp_path):
    names = _images(demo_data_dir, 3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for n in names:
            tf.add(os.path.join(demo_data_dir, n), arcname=n)
        info = tarfile.TarInfo(f"{names[0][:-4]}.txt")
        info.size = len(b"first caption")
        tf.addfile(info, io.BytesIO(b"first caption"))
    bucket = s3_server.create_bucket("archives")
    storage.boto3_client(s3_server.storage).put_object(Bucket="archives", Key="in/photos.tar.gz", Body=buf.getvalue())
    ds = {"id": "t", "type": "s3", "aws_bucket_name": "archives", "aws_data_prefix": "in/photos.tar.gz",
          "aws_endpoint_url": s3_server.endpoint}
    spec = _spec(tiny_model_dir, tmp_path, ds, storage={"aws_endpoint_url": s3_server.endpoint},
                 cache={"uri": f"{bucket}/cache"})
    listing = list_dataset(spec, spec.datasets[0])
    assert [r.rel_path for r in listing.refs] == names
    assert all(r.uri.startswith("s3://archives/cache/extracted/t-") for r in listing.refs)
    captions = [listing.captions[r.uri] for r in listing.refs]
    assert captions == [["first caption"]] + [[caption_from_filename(n)] for n in names[1:]]  # textfile, file name

# The end-to-end run (a zip without captions -> auto captions -> cache -> training -> delivery) is
# tests/test_delivery.py's module fixture: one job for both halves of issue 22.
