"""URI -> pyarrow filesystem: local paths, ``file://`` and ``s3://bucket/prefix`` with an endpoint.

Every cache, checkpoint and output path goes through :func:`resolve`, so code elsewhere never
branches on local vs S3. Credentials come from the environment / the AWS default chain and are never
logged. pyarrow's S3 client ignores ``AWS_ENDPOINT_URL``, so the endpoint (StorageSpec, explicit
argument, or that variable as a last resort) is always passed to it explicitly.
"""
from __future__ import annotations

import functools
import json
import os
import posixpath
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlparse

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from flux_ray.spec import StorageSpec

DEFAULT_REGION = "us-east-1"
S3_MAX_ATTEMPTS = 6
"""AWS SDK standard retries (throttling, 5xx, connection errors) for every S3 request pyarrow makes."""


class FileEntry(NamedTuple):
    uri: str
    rel_path: str
    """Path relative to the listed URI, '/'-separated."""
    size: int
    mtime_ns: int


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _env_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _env_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def s3_settings(storage: StorageSpec | None = None, endpoint_url: str | None = None,
                region: str | None = None) -> tuple[str | None, str]:
    """(endpoint, region): explicit arguments win over the StorageSpec, which wins over the env."""
    endpoint = endpoint_url or (storage.aws_endpoint_url if storage else None) or _env_endpoint()
    region = region or (storage.aws_region_name if storage else None) or _env_region()
    return endpoint, region


@functools.lru_cache(maxsize=16)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": region, "allow_bucket_creation": True,
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = urlparse(endpoint).scheme or "https"
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=1)
def _local_filesystem() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


def resolve(uri: str, storage: StorageSpec | None = None, *, endpoint_url: str | None = None,
            region: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it): an absolute local path, or ``bucket/key`` on S3."""
    if is_s3(uri):
        path = uri[len("s3://"):].strip("/")
        if not path:
            raise ValueError(f"{uri!r}: an s3:// URI needs a bucket name")
        return _s3_filesystem(*s3_settings(storage, endpoint_url, region)), path
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri!r}: unsupported scheme (use a local path, file:// or s3://)")
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    return _local_filesystem(), os.path.abspath(os.path.expanduser(local))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (remote) or the OS separator (local)."""
    if "://" in uri:
        tail = [p.strip("/") for p in parts if p.strip("/")]
        return "/".join([uri.rstrip("/"), *tail])
    return os.path.join(uri, *parts)


def _to_uri(uri: str, path: str) -> str:
    """Rebuild a URI of the same kind as ``uri`` for a filesystem path."""
    return "s3://" + path if is_s3(uri) else path


def exists(uri: str, storage: StorageSpec | None = None) -> bool:
    fs, path = resolve(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, storage: StorageSpec | None = None) -> bytes:
    fs, path = resolve(uri, storage)
    with fs.open_input_stream(path) as f:
        return f.read()


def _read_umask() -> int:
    mask = os.umask(0)  # read once at import, before any worker threads exist
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_bytes_atomic(uri: str, data: bytes, storage: StorageSpec | None = None) -> None:
    """Readers see the old object or the new one, never a partial write.

    Local: a temp file in the same directory, fsync, then os.replace. S3: an object becomes
    visible only when its PUT (or multipart upload) completes, which is atomic already.
    """
    fs, path = resolve(uri, storage)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    _replace_local(path, fill)


def _replace_local(path: str, fill) -> None:
    """``fill(tmp)`` makes a temp file beside ``path``; it is fsynced, given open()'s mode and moved over
    ``path`` with os.replace. On any error the temp file is removed and ``path`` is untouched."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def put_file_atomic(local_path: str | os.PathLike, uri: str, storage: StorageSpec | None = None) -> None:
    """Move a local file to ``uri`` (the local file is consumed); readers see the old object or the new one.

    Local: moved beside its destination (a rename on one filesystem, else a copy), fsync, then os.replace; no
    bytes pass through Python. S3: uploaded in one PUT (or multipart upload), then the local file removed.
    """
    fs, path = resolve(uri, storage)
    if is_s3(uri):
        with open(local_path, "rb") as src, fs.open_output_stream(path) as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        os.unlink(local_path)
        return
    _replace_local(path, lambda tmp: shutil.move(os.fspath(local_path), tmp))


def read_json(uri: str, storage: StorageSpec | None = None) -> Any:
    return json.loads(read_bytes(uri, storage))


def write_json_atomic(uri: str, obj: Any, storage: StorageSpec | None = None) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True).encode(), storage)


def list_files(uri: str, storage: StorageSpec | None = None,
               suffixes: tuple[str, ...] | list[str] | frozenset[str] | None = None) -> list[FileEntry]:
    """Every file under ``uri`` (recursive), sorted by URI; suffixes are matched case-insensitively.

    A missing directory lists as empty; a URI naming a single file lists that file.
    """
    fs, path = resolve(uri, storage)
    top = fs.get_file_info(path)
    if top.type == pafs.FileType.NotFound:
        return []
    if top.type == pafs.FileType.File:
        infos = [top]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or (wanted and not info.path.lower().endswith(wanted)):
            continue
        rel = posixpath.basename(info.path) if info.path == path else \
            posixpath.relpath(info.path.replace(os.sep, "/"), path.replace(os.sep, "/"))
        out.append(FileEntry(_to_uri(uri, info.path), rel, int(info.size or 0), int(info.mtime_ns or 0)))
    return sorted(out)


def delete(uri: str, storage: StorageSpec | None = None) -> None:
    """Delete a file or a directory tree; missing is fine. A bare bucket is emptied, not removed."""
    fs, path = resolve(uri, storage)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    elif kind == pafs.FileType.Directory:
        if is_s3(uri) and "/" not in path:
            fs.delete_dir_contents(path, missing_dir_ok=True)
        else:
            fs.delete_dir(path)


def ensure_bucket(uri: str, storage: StorageSpec | None = None) -> None:
    """Create the bucket of an s3:// URI when it is missing; a no-op for local paths."""
    if not is_s3(uri):
        return
    from botocore.exceptions import ClientError

    bucket = uri[len("s3://"):].split("/", 1)[0]
    endpoint, region = s3_settings(storage)
    client = boto3_client(endpoint, region)
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != DEFAULT_REGION:
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as e:  # a concurrent creator won the race
        if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def copy_dir(src_uri: str, dst_uri: str, storage: StorageSpec | None = None) -> None:
    """Copy a directory tree between any two URIs (local <-> S3, S3 -> S3, local -> local)."""
    src_fs, src = resolve(src_uri, storage)
    dst_fs, dst = resolve(dst_uri, storage)
    if not is_s3(dst_uri):
        os.makedirs(dst, exist_ok=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def boto3_client(storage_or_endpoint: StorageSpec | str | None = None, region: str | None = None):
    """A cached boto3 S3 client for the given StorageSpec or endpoint URL (None: AWS / env)."""
    if storage_or_endpoint is None or isinstance(storage_or_endpoint, str):
        endpoint, region = s3_settings(None, storage_or_endpoint, region)
    else:
        endpoint, region = s3_settings(storage_or_endpoint, None, region)
    return _boto3_client(endpoint, region)


@functools.lru_cache(maxsize=16)
def _boto3_client(endpoint: str | None, region: str):
    import boto3
    from botocore.config import Config

    # Custom endpoints (MinIO, moto, R2) rarely resolve virtual-host bucket names.
    style = "path" if endpoint else "auto"
    config = Config(s3={"addressing_style": style}, retries={"max_attempts": 5, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)
