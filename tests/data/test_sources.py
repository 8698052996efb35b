import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux_ray import storage
from flux_ray.data.demo import write_demo_data
from flux_ray.data.sources import (caption_from_filename, caption_id, captions_for, list_images, load_captions,
                                   read_bytes)
from flux_ray.spec import DatasetSpec


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "imgs"
    for rel in ["b/blue_sky_003.png", "a_red-car.JPG", "c/d/lone.webp", "plain.jpeg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"img:" + rel.encode())
    (root / "a_red-car.txt").write_text("a red car, parked\nsecond line ignored\n")
    (root / "b" / "blue_sky_003.txt").write_text("  blue sky  ")
    (root / "plain.txt").write_text("\n")  # empty caption -> file name fallback
    (root / "notes.txt").write_text("not an image")
    (root / "._a_red-car.JPG").write_bytes(b"macOS resource fork")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"hidden")
    return root


def local(root, **kw) -> DatasetSpec:
    return DatasetSpec(id="ds", instance_data_dir=str(root), **kw)


def test_list_local_sorted_filtered(image_dir):
    refs = list_images(local(image_dir))
    assert [r.rel_path for r in refs] == ["a_red-car.JPG", "b/blue_sky_003.png", "c/d/lone.webp", "plain.jpeg"]
    assert refs[0].uri == str(image_dir / "a_red-car.JPG") and refs[0].dataset_id == "ds"
    assert refs[0].size == len(b"img:a_red-car.JPG") and refs[0].mtime_ns > 0
    assert read_bytes(refs[1], local(image_dir)) == b"img:b/blue_sky_003.png"
    with pytest.raises(FileNotFoundError):
        list_images(local(image_dir / "missing"))


def test_textfile_with_fallback_and_prepend(image_dir):
    ds = local(image_dir, caption_strategy="textfile")
    refs = list_images(ds)
    got = load_captions(refs, ds)
    assert [got.by_uri[r.uri] for r in refs] == ["a red car, parked", "blue sky", "lone", "plain"]
    assert got.fallback_uris == [refs[2].uri, refs[3].uri]
    ds = local(image_dir, caption_strategy="textfile", instance_prompt="sks", prepend_instance_prompt=True)
    assert captions_for(refs, ds)[refs[0].uri] == "sks a red car, parked"
    with pytest.raises(ValueError, match="needs instance_prompt"):
        captions_for(refs, local(image_dir, prepend_instance_prompt=True))


def test_filename_and_instanceprompt(image_dir):
    refs = list_images(local(image_dir))
    by_name = captions_for(refs, local(image_dir, caption_strategy="filename"))
    assert [by_name[r.uri] for r in refs] == ["a red car", "blue sky", "lone", "plain"]
    assert caption_from_filename("x/0001.png") == "0001"  # a purely numeric name is kept
    ds = local(image_dir, caption_strategy="instanceprompt", instance_prompt="photo of sks",
               prepend_instance_prompt=True)
    assert set(captions_for(refs, ds).values()) == {"photo of sks"}


def test_parquet_manifest_by_rel_path_or_base_name(image_dir, tmp_path):
    table = pa.table({"file": ["a_red-car.JPG", "blue_sky_003.png", "c/d/lone.webp", "other.png"],
                      "text": ["manifest car", "manifest sky", "  manifest   lone ", "unused"]})
    pq.write_table(table, tmp_path / "captions.parquet")
    ds = local(image_dir, caption_strategy="parquet",
               parquet={"path": str(tmp_path / "captions.parquet"), "filename_column": "file",
                        "caption_column": "text"})
    refs = list_images(ds)
    got = load_captions(refs, ds)
    assert [got.by_uri[r.uri] for r in refs] == ["manifest car", "manifest sky", "manifest lone", "plain"]
    assert got.fallback_uris == [refs[3].uri]
    bad = ds.model_copy(update={"parquet": ds.parquet.model_copy(update={"caption_column": "nope"})})
    with pytest.raises(ValueError, match="no column"):
        captions_for(refs, bad)


def test_textfile_lines_are_several_captions_unless_split_is_disabled(image_dir):
    """SimpleTuner: each non-empty line of a caption file is one caption; disable_multiline_split keeps one."""
    refs = list_images(local(image_dir))
    got = load_captions(refs, local(image_dir, caption_strategy="textfile", instance_prompt="sks",
                                    prepend_instance_prompt=True))
    assert got.all_by_uri[refs[0].uri] == ["sks a red car, parked", "sks second line ignored"]
    assert got.all_by_uri[refs[1].uri] == ["sks blue sky"]
    whole = load_captions(refs, local(image_dir, caption_strategy="textfile", disable_multiline_split=True))
    assert whole.all_by_uri[refs[0].uri] == ["a red car, parked second line ignored"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_jsonl_json_csv_manifests_with_several_captions(image_dir, tmp_path, fmt):
    """SimpleTuner's parquet: block reads JSON lines / JSON too (and here CSV): several caption columns, list
    cells and a fallback column give an image several captions; duplicates count once."""
    import csv
    import json

    rows = [{"file": "a_red-car.JPG", "short": "car", "long": "a red car", "tags": "t1"},
            {"file": "0042", "short": "numbered", "long": "", "tags": "t2"},  # CSV must keep the name a string
            {"file": "c/d/lone.webp", "short": "", "long": None, "tags": "lone tag"},
            {"file": "plain.jpeg", "short": "same", "long": "same", "tags": None}]
    path = tmp_path / f"m.{fmt}"
    if fmt == "jsonl":
        rows[0]["long"] = ["a red car", "a parked car"]  # a list cell: several captions
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader(), w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    ds = local(image_dir, caption_strategy="parquet",
               parquet={"path": str(path), "filename_column": "file", "caption_column": ["short", "long"],
                        "fallback_caption_column": "tags"})
    refs = list_images(ds)
    got = load_captions(refs, ds)
    first = ["car", "a red car"] + (["a parked car"] if fmt == "jsonl" else [])
    assert [got.all_by_uri[r.uri] for r in refs] == [first, ["blue sky"], ["lone tag"], ["same"]]
    assert got.fallback_uris == [refs[1].uri]
    with pytest.raises(ValueError, match="read by its extension"):
        local(image_dir, caption_strategy="parquet", parquet={"path": str(tmp_path / "m.txt")})


def test_caption_id_is_stable_content_hash():
    assert caption_id("a red car") == caption_id("a red car") != caption_id("a red car.")
    assert len(caption_id("x")) == 24 and int(caption_id("x"), 16) >= 0


def test_s3_listing_and_captions_against_moto(s3_server, tmp_path):
    write_demo_data(tmp_path / "demo", n=6)
    bucket = s3_server.create_bucket("sources-test")
    storage.copy_dir(str(tmp_path / "demo"), bucket + "/train/set1", s3_server.storage)
    client = storage.boto3_client(s3_server.storage)
    client.put_object(Bucket="sources-test", Key="train/set1/dir/", Body=b"")  # a "folder" marker
    ds = DatasetSpec(id="s3ds", type="s3", aws_bucket_name="sources-test", aws_data_prefix="train/set1/",
                     aws_endpoint_url=s3_server.endpoint, caption_strategy="textfile")
    refs = list_images(ds)
    local_refs = list_images(local(tmp_path / "demo"))
    assert [r.rel_path for r in refs] == [r.rel_path for r in local_refs] and len(refs) == 6
    assert refs[0].uri == "s3://sources-test/train/set1/" + refs[0].rel_path
    assert [r.size for r in refs] == [r.size for r in local_refs] and refs[0].mtime_ns > 0
    assert read_bytes(refs[0], ds) == read_bytes(local_refs[0], local(tmp_path / "demo"))
    remote_caps, local_caps = captions_for(refs, ds), captions_for(local_refs, local(tmp_path / "demo"))
    assert [remote_caps[r.uri] for r in refs] == [local_caps[r.uri] for r in local_refs]
    assert len(set(local_caps.values())) < 6  # the demo repeats captions on purpose
    os.remove(local_refs[0].uri[:-4] + ".txt")
    storage.delete(refs[0].uri[:-4] + ".txt", s3_server.storage)
    assert load_captions(refs, ds).fallback_uris == [refs[0].uri]
    storage.delete(refs[0].uri, s3_server.storage)
    with pytest.raises(FileNotFoundError):  # same contract as a missing local file
        read_bytes(refs[0], ds)


def test_parquet_manifest_on_s3_with_list_captions(s3_server, tmp_path):
    write_demo_data(tmp_path / "demo", n=2)
    bucket = s3_server.create_bucket("sources-parquet")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"filename": ["000_orange_triangle.png", "001_green_square.jpg"],
                             "caption": [["tri", "second"], None]}), buf)
    storage.write_bytes_atomic(bucket + "/m.parquet", buf.getvalue().to_pybytes(), s3_server.storage)
    ds = local(tmp_path / "demo", caption_strategy="parquet", parquet={"path": bucket + "/m.parquet"})
    refs = list_images(ds)
    got = load_captions(refs, ds, s3_server.storage)
    assert [got.by_uri[r.uri] for r in refs] == ["tri", "001 green square"] and got.fallback_uris == [refs[1].uri]


def test_trigger_word_goes_into_every_caption_once(image_dir):
    from flux_ray.core.trigger_word import apply_trigger_word

    refs = list_images(local(image_dir))
    got = captions_for(refs, local(image_dir, caption_strategy="textfile", trigger_word="ohwx"))
    assert [got[r.uri] for r in refs] == ["ohwx, a red car, parked", "ohwx, blue sky", "ohwx, lone", "ohwx, plain"]
    got = captions_for(refs, local(image_dir, caption_strategy="instanceprompt", instance_prompt="a photo of [trigger]",
                                   trigger_word="ohwx"))
    assert set(got.values()) == {"a photo of ohwx"}
    # several captions of one image: each gets the word; two that differ only by it are one choice
    (image_dir / "a_red-car.txt").write_text("a red car, parked\nohwx, a red car, parked\n[trigger] on a road\n")
    every = load_captions(refs, local(image_dir, caption_strategy="textfile", trigger_word="ohwx")).all_by_uri
    assert every[refs[0].uri] == ["ohwx, a red car, parked", "ohwx on a road"]
    assert apply_trigger_word("ohwx dog on grass", "ohwx") == "ohwx dog on grass"  # already there: kept once
    assert apply_trigger_word("ohwxy dog", "ohwx") == "ohwx, ohwxy dog"  # a longer word is not the trigger
    assert apply_trigger_word("a dog", None) == "a dog"
