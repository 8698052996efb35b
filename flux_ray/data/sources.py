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
from flux_ray.spec import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from flux_ray.spec import DatasetSpec, StorageSpec

log = logging.getLogger(__name__)

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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def caption_lines(text: str, disable_multiline_split: bool = False) -> list[str]:
    """A caption file's captions: each non-empty line (SimpleTuner's default), or the whole file as one."""
    if disable_multiline_split:
        return [_one_line(text)] if text.strip() else []
    return [_one_line(line) for line in text.splitlines() if line.strip()]


def caption_id(text: str) -> str:
    """Content address of a caption: 24 hex chars of sha256(UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@dataclass
class Captions:
    all_by_uri: dict[str, list[str]]
    """Every caption of each image (at least one), in source order; training draws one per epoch."""
    fallback_uris: list[str] = field(default_factory=list)
    """Images whose caption file / manifest row was missing or empty: captioned by file name."""

    @property
    def by_uri(self) -> dict[str, str]:
        """The first caption of each image."""
        return {uri: texts[0] for uri, texts in self.all_by_uri.items()}


def _manifest_rows(ds: DatasetSpec, storage: StorageSpec | None, columns: list[str]) -> list[dict]:
    """The manifest's rows (``columns`` only), read by its extension: parquet; JSON lines or a JSON list of
    objects (parsed row by row, so a column may hold a string in one row and a list in the next, as pandas
    allows in SimpleTuner); CSV with a header row (every value text, so a file name like 0001 stays one)."""
    import csv
    import io
    import json

    import pyarrow.parquet as pq

    m = ds.parquet
    fs, path = _storage.resolve(m.path, storage, endpoint_url=ds.aws_endpoint_url, region=ds.aws_region_name)
    if m.format == "parquet":
        names = pq.read_schema(path, filesystem=fs).names
        rows = None
    else:
        with fs.open_input_file(path) as f:
            text = f.read().decode("utf-8-sig")
        if m.format == "jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif m.format == "json":
            rows = json.loads(text)
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"dataset {ds.id}: caption manifest {m.path!r} must hold objects (one per image)")
        names = list(dict.fromkeys(k for r in rows for k in r))
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"dataset {ds.id}: caption manifest {m.path!r} has no column(s) {missing} (it has {names})")
    if rows is None:
        return pq.read_table(path, filesystem=fs, columns=columns).to_pylist()
    return [{c: r.get(c) for c in columns} for r in rows]


def _cell_captions(value) -> list[str]:
    """A manifest cell's captions: a string, or a list of them (SimpleTuner allows several)."""
    values = value if isinstance(value, list) else [value]
    return [_one_line(str(v)) for v in values if v is not None and str(v).strip()]


def _manifest(ds: DatasetSpec, storage: StorageSpec | None) -> dict[str, list[str]]:
    """Manifest rows keyed by both the filename column as written and its base name: every non-empty value of
    the caption column(s), else of fallback_caption_column."""
    m = ds.parquet
    columns = [m.filename_column, *m.caption_columns] + ([m.fallback_caption_column] if m.fallback_caption_column
                                                         else [])
    out: dict[str, list[str]] = {}
    for row in _manifest_rows(ds, storage, columns):
        texts = [t for c in m.caption_columns for t in _cell_captions(row[c])]
        if not texts and m.fallback_caption_column:
            texts = _cell_captions(row[m.fallback_caption_column])
        if row[m.filename_column] is None or not texts:
            continue
        key = str(row[m.filename_column]).replace("\\", "/")
        out[key.removeprefix("./")] = out[posixpath.basename(key)] = texts
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
        auto = auto_captioner([r for r in refs
                               if not caption_lines(sidecars[r.uri] or "", ds.disable_multiline_split)])
    result = Captions({})
    for ref in refs:
        if ds.caption_strategy == "instanceprompt":
            result.all_by_uri[ref.uri] = [apply_trigger_word(ds.instance_prompt, ds.trigger_word)]
            continue
        if ds.caption_strategy == "filename":
            texts = [caption_from_filename(ref.rel_path)]
        elif ds.caption_strategy in ("textfile", "auto"):
            texts = (caption_lines(sidecars[ref.uri] or "", ds.disable_multiline_split)
                     or [_one_line(auto.get(ref.rel_path, ""))])
        else:  # parquet
            texts = manifest.get(ref.rel_path) or manifest.get(posixpath.basename(ref.rel_path), [])
        texts = [t for t in texts if t]
        if not texts:
            result.fallback_uris.append(ref.uri)
            texts = [caption_from_filename(ref.rel_path)]
        if ds.prepend_instance_prompt:
            texts = [f"{ds.instance_prompt} {t}" for t in texts]
        # every caption gets the trigger word; a repeated caption (before or after it) is one choice
        result.all_by_uri[ref.uri] = list(dict.fromkeys(apply_trigger_word(t, ds.trigger_word) for t in texts))
    if result.fallback_uris:
        log.warning("dataset %s: %d of %d images have no %s caption; using their file names",
                    ds.id, len(result.fallback_uris), len(refs), ds.caption_strategy)
    return result


def captions_for(refs: list[ImageRef], ds: DatasetSpec, storage: StorageSpec | None = None,
                 auto_captioner: AutoCaptioner | None = None) -> dict[str, str]:
    """{image uri: first caption} by SimpleTuner's caption strategies (:func:`load_captions` has them all).

    ``filename``: the file stem (see :func:`caption_from_filename`). ``textfile``: each non-empty line of
    ``<stem>.txt`` beside the image is one caption (the whole file with ``disable_multiline_split``).
    ``instanceprompt``: ``ds.instance_prompt``. ``parquet``: the manifest row (parquet, JSON lines, JSON or CSV)
    whose filename column equals the image's rel_path or base name; each non-empty caption column value, or list
    item, is one caption. ``auto``: textfile where a ``.txt`` with a caption exists, else ``auto_captioner``'s
    one caption (data/auto_captions.py). A missing or empty textfile / manifest caption falls back to the file
    name (counted and logged, see :func:`load_captions`). ``prepend_instance_prompt`` puts
    ``instance_prompt + " "`` first (not for ``instanceprompt``, which is the instance prompt already).
    ``trigger_word`` goes into every caption last (:func:`apply_trigger_word`).
    """
    return load_captions(refs, ds, storage, auto_captioner).by_uri
