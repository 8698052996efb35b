import os

import pyarrow.fs as pafs
import pytest

from flux_ray import storage
from flux_ray.spec import StorageSpec


def test_resolve_local_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ["rel/dir", str(tmp_path / "rel/dir"), f"file://{tmp_path}/rel/dir"]:
        fs, path = storage.resolve(uri)
        assert isinstance(fs, pafs.LocalFileSystem)
        assert path == str(tmp_path / "rel" / "dir")
    with pytest.raises(ValueError, match="unsupported scheme"):
        storage.resolve("gs://bucket/x")


def test_join():
    assert storage.join("s3://b/pre/", "a", "/b.json") == "s3://b/pre/a/b.json"
    assert storage.join("/tmp/x", "a", "b.json") == "/tmp/x/a/b.json"


def test_local_round_trip_and_atomic_write(tmp_path):
    uri = str(tmp_path / "deep" / "dir" / "state.json")
    assert not storage.exists(uri)
    storage.write_json_atomic(uri, {"step": 1})
    storage.write_json_atomic(uri, {"step": 2})
    assert storage.read_json(uri) == {"step": 2}
    assert os.listdir(tmp_path / "deep" / "dir") == ["state.json"]  # no temp files left
    with pytest.raises(TypeError):  # a failed write keeps the old file and removes its temp file
        storage.write_bytes_atomic(uri, "not bytes")  # type: ignore[arg-type]
    assert storage.read_json(uri) == {"step": 2}
    assert os.listdir(tmp_path / "deep" / "dir") == ["state.json"]


def test_put_file_atomic_moves_a_local_file_into_place(tmp_path, s3_server):
    """Local: the file is moved (its bytes and a umask mode arrive, the source is gone, no temp file is left),
    replacing the old one; a failed move keeps the old file. S3: uploaded, then the local file removed."""
    src, uri = tmp_path / "made.bin", str(tmp_path / "out" / "lora.safetensors")
    storage.write_bytes_atomic(uri, b"old")
    src.write_bytes(b"new" * 1000)
    storage.put_file_atomic(src, uri)
    assert storage.read_bytes(uri) == b"new" * 1000 and not src.exists()
    assert os.listdir(tmp_path / "out") == ["lora.safetensors"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(uri).st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(FileNotFoundError):  # nothing to move: the old file stays, no temp file is left
        storage.put_file_atomic(tmp_path / "missing.bin", uri)
    assert storage.read_bytes(uri) == b"new" * 1000 and os.listdir(tmp_path / "out") == ["lora.safetensors"]
    root = s3_server.create_bucket("put-file")
    src.write_bytes(b"up")
    storage.put_file_atomic(src, root + "/lora/x.bin", s3_server.storage)
    assert storage.read_bytes(root + "/lora/x.bin", s3_server.storage) == b"up" and not src.exists()


def test_local_list_and_delete(tmp_path):
    for rel in ["b/2.PNG", "a.txt", "b/c/3.jpg", "1.png"]:
        storage.write_bytes_atomic(str(tmp_path / rel), b"x" * len(rel))
    entries = storage.list_files(str(tmp_path))
    assert [e.rel_path for e in entries] == ["1.png", "a.txt", "b/2.PNG", "b/c/3.jpg"]
    assert entries[0].uri == str(tmp_path / "1.png") and entries[0].size == 5 and entries[0].mtime_ns > 0
    pngs = storage.list_files(str(tmp_path), suffixes=[".png"])
    assert [e.rel_path for e in pngs] == ["1.png", "b/2.PNG"]
    assert storage.list_files(str(tmp_path / "missing")) == []
    storage.delete(str(tmp_path / "b"))
    storage.delete(str(tmp_path / "a.txt"))
    storage.delete(str(tmp_path / "never-existed"))
    assert [e.rel_path for e in storage.list_files(str(tmp_path))] == ["1.png"]


def test_s3_round_trip_list_delete(s3_server):
    root = s3_server.create_bucket("storage-test") + "/run"
    spec = s3_server.storage
    storage.write_bytes_atomic(root + "/a/x.bin", b"hello", spec)
    storage.write_json_atomic(root + "/meta.json", {"ok": True}, spec)
    assert storage.read_bytes(root + "/a/x.bin", spec) == b"hello"
    assert storage.read_json(root + "/meta.json", spec) == {"ok": True}
    assert storage.exists(root + "/a", spec) and not storage.exists(root + "/nope", spec)
    entries = storage.list_files(root, spec)
    assert [(e.uri, e.rel_path, e.size) for e in entries] == [
        (root + "/a/x.bin", "a/x.bin", 5), (root + "/meta.json", "meta.json", 16)]
    storage.delete(root + "/a", spec)
    assert [e.rel_path for e in storage.list_files(root, spec)] == ["meta.json"]


def test_s3_explicit_endpoint_beats_storage_spec(s3_server):
    root = s3_server.create_bucket("storage-override")
    wrong = StorageSpec(aws_endpoint_url="http://127.0.0.1:9", aws_region_name="us-east-1")
    fs, path = storage.resolve(root + "/k", wrong, endpoint_url=s3_server.endpoint)
    with fs.open_output_stream(path) as f:
        f.write(b"v")
    assert storage.read_bytes(root + "/k", s3_server.storage) == b"v"


def test_copy_dir_local_s3_local(s3_server, tmp_path):
    src = tmp_path / "src"
    storage.write_bytes_atomic(str(src / "one.txt"), b"1")
    storage.write_bytes_atomic(str(src / "sub" / "two.txt"), b"22")
    remote = s3_server.create_bucket("storage-copy") + "/copied"
    storage.copy_dir(str(src), remote, s3_server.storage)
    storage.copy_dir(remote, str(tmp_path / "back"), s3_server.storage)
    back = storage.list_files(str(tmp_path / "back"))
    assert [(e.rel_path, e.size) for e in back] == [("one.txt", 1), ("sub/two.txt", 2)]


def test_ensure_bucket_is_idempotent_and_boto3_sees_it(s3_server):
    storage.ensure_bucket("s3://storage-ensure/some/prefix", s3_server.storage)
    storage.ensure_bucket("s3://storage-ensure", s3_server.storage)
    storage.ensure_bucket("/local/path/is/a/no-op")
    names = [b["Name"] for b in storage.boto3_client(s3_server.storage).list_buckets()["Buckets"]]
    assert "storage-ensure" in names
