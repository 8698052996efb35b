"""Datasets given as a ``.zip`` / ``.tar`` (``.tar.gz``, ``.tgz``), local or on S3: extracted once by a Ray Data
task (not the driver) into ``<cache.uri>/extracted/<dataset id>-<hash of the archive's identity>/``, which is then
listed and read like a folder (images and their ``.txt`` captions side by side).

The hash covers the archive's URI, size and modification time (S3: its ETag), so a changed archive is extracted
again to a new folder; ``_extracted.json`` is written last, so a killed extraction is redone, never half-read.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
import tempfile
import zipfile

from flux_ray import storage
from flux_ray.data import sources
from flux_ray.data.cache_layout import digest

MARKER = "_extracted.json"
KEPT_SUFFIXES = tuple(sources.IMAGE_EXTENSIONS) + (".txt",)


def archive_uri(ds) -> str:
    return ds.instance_data_dir if ds.type == "local" else f"s3://{ds.aws_bucket_name}/{ds.aws_data_prefix}"


def _archive_identity(ds, st) -> dict:
    uri = archive_uri(ds)
    if ds.type == "local":
        try:
            info = os.stat(uri)
        except FileNotFoundError:
            raise FileNotFoundError(f"dataset {ds.id}: archive {uri!r} does not exist") from None
        return {"uri": uri, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    from botocore.exceptions import ClientError

    try:
        head = sources._s3_client(ds, st).head_object(Bucket=ds.aws_bucket_name, Key=ds.aws_data_prefix)
    except ClientError as e:
        raise FileNotFoundError(f"dataset {ds.id}: archive {uri!r} cannot be read "
                                f"({e.response.get('Error', {}).get('Code')})") from None
    return {"uri": uri, "size": head["ContentLength"], "etag": head["ETag"]}


def member_path(name: str) -> str | None:
    """The member's path to extract to, or None: only images and .txt files, never outside the folder
    (absolute or ``..`` names), never macOS's ``__MACOSX/`` and ``._*`` companions or hidden files."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return None
    return "/".join(parts) if parts[-1].lower().endswith(KEPT_SUFFIXES) else None


def _members(local_path: str):
    """(name, bytes) of each regular file of a zip or tar archive, streamed."""
    if zipfile.is_zipfile(local_path):
        with zipfile.ZipFile(local_path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, zf.read(info)
        return
    try:
        tf = tarfile.open(local_path, mode="r:*")
    except tarfile.TarError as e:
        raise ValueError(f"{local_path}: not a zip or tar archive ({e})") from None
    with tf:
        for info in tf:
            if info.isfile():
                yield info.name, tf.extractfile(info).read()


def extract_archive(batch: dict, dataset_spec, storage_spec, dest: str) -> dict:
    """Ray Data stage (one task per archive): fetch the archive (S3: to a local temp file), write its images and
    captions under ``dest`` and emit one row per written file."""
    written: list[str] = []
    for uri in batch["archive"]:
        tmp = tempfile.mkdtemp(prefix="flux_ray-archive-")
        try:
            local = uri
            if uri.startswith("s3://"):
                local = os.path.join(tmp, posixpath.basename(uri))
                sources._s3_client(dataset_spec, storage_spec).download_file(
                    dataset_spec.aws_bucket_name, dataset_spec.aws_data_prefix, local)
            for name, data in _members(local):
                rel = member_path(name)
                if rel is not None:
                    storage.write_bytes_atomic(storage.join(dest, rel), data, storage_spec)
                    written.append(rel)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"rel_path": written, "pid": [os.getpid()] * len(written)}


def extracted_dataset(ds, spec):
    """``ds`` as a folder: the archive extracted (once, by a Ray task) under the cache. A folder dataset is
    returned as it is. The copy reads S3 with ``storage``'s endpoint (the cache's), not the dataset's."""
    if not ds.archive_suffix:
        return ds
    import ray

    st = spec.storage
    identity = _archive_identity(ds, st)
    dest = storage.join(spec.cache.uri, "extracted", f"{ds.id}-{digest(identity)}")
    marker = storage.join(dest, MARKER)
    if not storage.exists(marker, st):
        storage.ensure_bucket(dest, st)
        rows = ray.data.from_items([{"archive": identity["uri"]}]).map_batches(
            extract_archive, batch_size=1, num_cpus=1,
            fn_kwargs={"dataset_spec": ds, "storage_spec": st, "dest": dest}).take_all()
        images = sum(1 for r in rows if not r["rel_path"].lower().endswith(".txt"))
        if not images:
            raise ValueError(f"dataset {ds.id}: archive {identity['uri']!r} holds no images "
                             f"({', '.join(sorted(sources.IMAGE_EXTENSIONS))})")
        storage.write_json_atomic(marker, {**identity, "files": len(rows), "images": images,
                                           "worker_pids": sorted({int(r["pid"]) for r in rows})}, st)
    if storage.is_s3(dest):
        bucket, _, prefix = dest[len("s3://"):].partition("/")
        return ds.model_copy(update={"type": "s3", "instance_data_dir": None, "aws_bucket_name": bucket,
                                     "aws_data_prefix": prefix.rstrip("/") + "/", "aws_endpoint_url": None,
                                     "aws_region_name": None})
    return ds.model_copy(update={"type": "local", "instance_data_dir": dest})
