"""Image listing (local folders, S3 prefixes) and captions by SimpleTuner's ``caption_strategy``."""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from flux_ray import storage as _storage
from flux_ray.core.trigger_word import apply_trigger_word

if TYPE_CHECKING:
    from flux_ray.spec import DatasetSpec, StorageSpec

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
SIDECAR_READ_THREADS = 16


@dataclass(frozen=True)
class ImageRef:
    """One source image; (uri, size, mtime_ns) identifies its content for cache keys."""
    dataset_id: str
    uri: str
    """Absolute local path or s3://bucket/key."""
    rel_path: str
    """Path under the dataset root, '/'-separated; captions and manifests match on it."""
    size: int
    mtime_ns: int


def _is_image(name: str) -> bool:
    # Hidden files include macOS "._x.jpg" resource forks, which look like images but are not.
    base = posixpath.basename(name)
    return not base.startswith(".") and posixpath.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _s3_client(ds: DatasetSpec, storage: StorageSpec | None):
    endpoint, region = _storage.s3_settings(storage, ds.aws_endpoint_url, ds.aws_region_name)
    return _storage.boto3_client(endpoint, region)


def list_images(ds: DatasetSpec, storage: StorageSpec | None = None) -> list[ImageRef]:
    """Every image of the dataset, sorted by rel_path (deterministic across machines)."""
    if ds.type == "local":
        root = os.path.abspath(os.path.expanduser(ds.instance_data_dir))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset {ds.id}: instance_data_dir {root!r} is not a directory")
        refs = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in filenames:
                if _is_image(fname):
                    path = os.path.join(dirpath, fname)
                    st = os.stat(path)
                    rel = os.path.relpath(path, root).replace(os.sep, "/")
                    refs.append(ImageRef(ds.id, path, rel, st.st_size, st.st_mtime_ns))
    else:
        refs = _list_s3(ds, storage)
    return sorted(refs, key=lambda r: r.rel_path)


def _list_s3(ds: DatasetSpec, storage: StorageSpec | None) -> list[ImageRef]:
    client = _s3_client(ds, storage)
    prefix = ds.aws_data_prefix
    refs = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=ds.aws_bucket_name, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/") or not _is_image(key):
                continue
            rel = key[len(prefix):].lstrip("/")
            mtime_ns = int(obj["LastModified"].timestamp() * 1e9)
            refs.append(ImageRef(ds.id, f"s3://{ds.aws_bucket_name}/{key}", rel, int(obj["Size"]), mtime_ns))
    return refs


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def read_bytes(ref: ImageRef, ds: DatasetSpec, storage: StorageSpec | None = None) -> bytes:
    """The raw bytes of an image; a missing file or object raises FileNotFoundError."""
    return _read_uri(ref.uri, ds, storage)


def _read_uri(uri: str, ds: DatasetSpec, storage: StorageSpec | None) -> bytes:
    if uri.startswith("s3://"):
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(uri)
        try:
            return _s3_client(ds, storage).get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:  # same contract as a local file: missing -> FileNotFoundError
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{uri}: no such object") from None
            raise
    with open(uri, "rb") as f:
        return f.read()


def _read_optional_text(uri: str, ds: DatasetSpec, storage: StorageSpec | None) -> str | None:
    """The text of a sidecar file, or None when it does not exist."""
    try:
        return _read_uri(uri, ds, storage).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def caption_from_filename(rel_path: str) -> str:
    """SimpleTuner-style: the stem, '_' and '-' as spaces, a trailing '_003'-style counter dropped."""
    stem = posixpath.splitext(posixpath.basename(rel_path))[0]
    text = re.sub(r"[_\-]+", " ", stem)
    trimmed = re.sub(r"\s+\d+$", "", text)
    return " ".join((trimmed if trimmed.strip() else text).split())


def _first_line(text: str) -> str:
    """Multi-line caption files are not supported: the first non-empty line is the caption."""
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def caption_id(text: str) -> str:
    """Content address of a caption: 24 hex chars of sha256(UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@dataclass
class Captions:
    by_uri: dict[str, str]
    fallback_uris: list[str] = field(default_factory=list)
    """Images whose caption file / manifest row was missing or empty: captioned by file name."""


def _manifest(ds: DatasetSpec, storage: StorageSpec | None) -> dict[str, str]:
    """Parquet manifest rows keyed by both the filename column as written and its base name."""
    import pyarrow.parquet as pq

    m = ds.parquet
    fs, path = _storage.resolve(m.path, storage, endpoint_url=ds.aws_endpoint_url, region=ds.aws_region_name)
    columns = [m.filename_column, m.caption_column]
    missing = [c for c in columns if c not in pq.read_schema(path, filesystem=fs).names]
    if missing:
        raise ValueError(f"dataset {ds.id}: parquet manifest {m.path!r} has no column(s) {missing}")
    table = pq.read_table(path, filesystem=fs, columns=columns)
    out: dict[str, str] = {}
    for fname, caption in zip(table[m.filename_column].to_pylist(), table[m.caption_column].to_pylist()):
        if isinstance(caption, list):  # SimpleTuner allows several captions; use the first
            caption = next((c for c in caption if c), None)
        if fname is None or not caption or not str(caption).strip():
            continue
        key = str(fname).replace("\\", "/")
        out[key.removeprefix("./")] = out[posixpath.basename(key)] = " ".join(str(caption).split())
    return out


def _read_sidecars(refs: list[ImageRef], ds: DatasetSpec, storage: StorageSpec | None) -> dict[str, str | None]:
    """{image uri: text of <stem>.txt or None}; read concurrently (one S3 GET each)."""
    def read(ref: ImageRef) -> str | None:
        return _read_optional_text(posixpath.splitext(ref.uri)[0] + ".txt", ds, storage)

    with ThreadPoolExecutor(max_workers=SIDECAR_READ_THREADS) as pool:
        return dict(zip([r.uri for r in refs], pool.map(read, refs)))


AutoCaptioner = Callable[[list[ImageRef]], dict[str, str]]
"""Captions images (``caption_strategy: auto``): refs without a ``.txt`` -> {rel_path: caption}."""


def load_captions(refs: list[ImageRef], ds: DatasetSpec, storage: StorageSpec | None = None,
                  auto_captioner: AutoCaptioner | None = None) -> Captions:
    """Captions per image URI by ``ds.caption_strategy``; see :func:`captions_for`."""
    if ds.prepend_instance_prompt and not ds.instance_prompt:
        raise ValueError(f"dataset {ds.id}: prepend_instance_prompt needs instance_prompt")
    if ds.caption_strategy == "auto" and auto_captioner is None:
        raise ValueError(f"dataset {ds.id}: caption_strategy auto needs the cache job's captioner")
    manifest = _manifest(ds, storage) if ds.caption_strategy == "parquet" else {}
    sidecars = _read_sidecars(refs, ds, storage) if ds.caption_strategy in ("textfile", "auto") else {}
    auto: dict[str, str] = {}
    if ds.caption_strategy == "auto":
        auto = auto_captioner([r for r in refs if not _first_line(sidecars[r.uri] or "")])
    result = Captions({})
    for ref in refs:
        if ds.caption_strategy == "instanceprompt":
            result.by_uri[ref.uri] = apply_trigger_word(ds.instance_prompt, ds.trigger_word)
            continue
        if ds.caption_strategy == "filename":
            text = caption_from_filename(ref.rel_path)
        elif ds.caption_strategy in ("textfile", "auto"):
            text = _first_line(sidecars[ref.uri] or "") or " ".join(auto.get(ref.rel_path, "").split())
        else:  # parquet
            text = manifest.get(ref.rel_path) or manifest.get(posixpath.basename(ref.rel_path), "")
        if not text:
            result.fallback_uris.append(ref.uri)
            text = caption_from_filename(ref.rel_path)
        if ds.prepend_instance_prompt:
            text = f"{ds.instance_prompt} {text}"
        result.by_uri[ref.uri] = apply_trigger_word(text, ds.trigger_word)
    if result.fallback_uris:
        log.warning("dataset %s: %d of %d images have no %s caption; using their file names",
                    ds.id, len(result.fallback_uris), len(refs), ds.caption_strategy)
    return result


def captions_for(refs: list[ImageRef], ds: DatasetSpec, storage: StorageSpec | None = None,
                 auto_captioner: AutoCaptioner | None = None) -> dict[str, str]:
    """{image uri: caption} by SimpleTuner's caption strategies.

    ``filename``: the file stem (see :func:`caption_from_filename`). ``textfile``: the first
    non-empty line of ``<stem>.txt`` beside the image. ``instanceprompt``: ``ds.instance_prompt``.
    ``parquet``: the manifest row whose filename column equals the image's rel_path or base name.
    ``auto``: textfile where a ``.txt`` exists, else ``auto_captioner``'s caption (data/auto_captions.py).
    A missing or empty textfile / manifest caption falls back to the file name (counted and logged,
    see :func:`load_captions`). ``prepend_instance_prompt`` puts ``instance_prompt + " "`` first
    (not for ``instanceprompt``, which is the instance prompt already). ``trigger_word`` goes in last
    (:func:`apply_trigger_word`).
    """
    return load_captions(refs, ds, storage, auto_captioner).by_uri
