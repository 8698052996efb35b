"""The cache's on-disk format, in one place: paths, columns, byte codecs, version; and its content keys. No Ray.

The writer (data/cache.py with data/encoders.py) and the reader (data/loader.py) both import it from here.

Layout under ``cache.uri``::

    latents/<dataset_key>/manifest.json                  committed shards + caption index, version
    latents/<dataset_key>/shards/<run>/<id>.parquet      one row per sample (LATENT_COLUMNS)
    latents/<dataset_key>/index-v<N>.parquet             sample_id -> caption_id, caption_ids (rewritten each commit)
    text/<text_key>/manifest.json
    text/<text_key>/shards/<run>/<id>.parquet            one row per caption (TEXT_COLUMNS)
    masks/<mask_key>/manifest.json                       loss masks of one image dataset (conditioning_type: mask)
    masks/<mask_key>/shards/<run>/<id>.parquet           mask_id -> uint8 mask at latent resolution
    masks/<mask_key>/index-v<N>.parquet                  sample_id -> mask_id (rewritten each commit)
    references/<reference_key>/...                       Kontext reference latents of one image dataset (same
                                                         layout: reference_id -> VAE mean/std; index
                                                         sample_id -> reference_id)
    <shard>.parquet.rows.parquet                         the shard's small columns (ids, buckets, sizes), one GET

``<run>`` is ``run-<12 hex>``, one per cache run, and ``<id>`` 16 hex digits (:func:`shard_file`).

Columns: a latent row holds the decode stage's ids, bucket and crop columns (data/decode.py) plus
``latent_mean`` / ``latent_std`` (bytes, [C, h, w] in the latent dtype) and ``latent_h`` / ``latent_w``;
a text row holds ``caption_id``, ``caption``, ``prompt_embeds`` (bytes, [seq_len, embed_dim]), ``pooled``
(bytes, [pooled_dim]), ``text_mask`` (int8 bytes, [seq_len]) and ``seq_len`` / ``embed_dim`` / ``pooled_dim``;
a mask row holds ``loss_mask`` (MASK_BLOBS). The blob columns (BLOB_COLUMNS) are :func:`tensor_to_bytes` of
the tensor, read back with :func:`bytes_to_tensor`; everything else also goes to the ``.rows.parquet`` side file.

Format 2: every shard is written with one row per Parquet row group, so a reader fetches exactly the
rows it needs with range reads (``ParquetFile.read_row_groups``, coalesced by pyarrow's pre_buffer), and
its small columns also go to a side file so indexing a shard costs one request, not one per row.
Format 1 caches (whole-shard reads) are refused by the reader (:func:`check_format`).

Loss masks are a cache of their own beside the latents (not a latent column): a dataset without masks keeps its
key and its cache, and a mask row is keyed by its image's sample id *and* the mask file's identity, so editing a
mask re-encodes only that mask. The mask key hashes the image dataset's key and the mask dataset's source.

Readers only open files a manifest lists, and a manifest is written (atomically) after its files,
so a killed job never exposes a half-written shard.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass

import numpy as np
import torch

CACHE_FORMAT_VERSION = 2
ROWS_PER_ROW_GROUP = 1
"""Range-read granularity: a latent row is 256 KiB (512 px) to 1 MiB (1024 px), a T5 row 4 MiB."""
SHARD_TARGET_BYTES = 16 * 2**20
"""A shard holds at most this many bytes (and at least one row): cache.min_rows_per_file rows of 4 MiB T5
embeddings would make 1 GiB objects, and a range read costs more on stores that serve a range by reading the
object (moto: 7 ms for a row of a 16 MiB object, 140 ms of a 64 MiB one; bench/RESULTS.md, ingest)."""
ROWS_SUFFIX = ".rows.parquet"
MANIFEST_FILE = "manifest.json"
LATENT_BLOBS = ("latent_mean", "latent_std")
LATENT_COLUMNS = LATENT_BLOBS + ("latent_h", "latent_w")
"""What the VAE stage adds to a decoded row (see the module docstring for the decode stage's columns)."""
TEXT_BLOBS = ("prompt_embeds", "pooled", "text_mask")
TEXT_COLUMNS = ("caption_id", "caption") + TEXT_BLOBS + ("seq_len", "embed_dim", "pooled_dim")
MASK_BLOBS = ("loss_mask",)
BLOB_COLUMNS = LATENT_BLOBS + TEXT_BLOBS + MASK_BLOBS
TORCH_TO_NP_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.float16, torch.float32: torch.float32}
PREPROCESS_KEYS = ("resolution", "resolution_type", "minimum_image_size", "maximum_image_size",
                   "target_downsample_size", "crop", "crop_style", "crop_aspect")
INDEX_CAPTION_IDS = "caption_ids"
"""Index column: every caption id of a sample (several captions per image); ``caption_id`` is the first. An index
written before it existed lacks it, and the reader then uses ``caption_id`` alone."""
SOURCE_KEYS = ("type", "instance_data_dir", "aws_bucket_name", "aws_data_prefix", "aws_endpoint_url")


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def vae_identity(model_spec, vae_config: dict) -> dict:
    return {"path": model_spec.pretrained_vae_model_name_or_path or model_spec.base_path,
            "revision": model_spec.revision, "config": digest(vae_config)}


def text_identity(model_spec) -> dict:
    return {"path": model_spec.base_path, "revision": model_spec.revision, "t5_max_length": model_spec.t5_max_length}


def dataset_key(ds, model_spec, vae_config: dict, latent_dtype: str) -> str:
    """Hash of source, preprocessing, VAE identity and dtype: change any and a new cache is made."""
    return digest({"v": CACHE_FORMAT_VERSION, "source": {k: getattr(ds, k) for k in SOURCE_KEYS},
                   "preprocess": {k: getattr(ds, k) for k in PREPROCESS_KEYS},
                   "vae": vae_identity(model_spec, vae_config), "dtype": latent_dtype})


def text_key(model_spec, embed_dtype: str) -> str:
    return digest({"v": CACHE_FORMAT_VERSION, "text": text_identity(model_spec), "dtype": embed_dtype})


def mask_key(image_key: str, mask_ds) -> str:
    """Hash of the image dataset's cache key (its crops and latent sizes) and the mask dataset's source."""
    source = {k: getattr(mask_ds, k) for k in SOURCE_KEYS}
    return digest({"v": CACHE_FORMAT_VERSION, "image": image_key, "masks": source})


def mask_id(image_sample_id: str, mask_ref) -> str:
    """A mask row is its image's sample and the mask file's identity (path, size, mtime); None: no mask file."""
    mask = sample_id(mask_ref) if mask_ref is not None else "none"
    return hashlib.sha256(f"{image_sample_id}\0{mask}".encode()).hexdigest()[:24]


def reference_key(image_key: str, reference_ds) -> str:
    """Hash of the image dataset's cache key, the reference dataset's source and its conditioning_type (strict
    crops with the image's plan, loose on its own). Datasets without references keep their keys and caches."""
    source = {k: getattr(reference_ds, k) for k in SOURCE_KEYS}
    return digest({"v": CACHE_FORMAT_VERSION, "image": image_key, "references": source,
                   "type": reference_ds.conditioning_type})


def reference_id(image_sample_id: str, reference_ref) -> str:
    """A reference row is its image's sample and the reference file's identity (as ``mask_id``)."""
    return mask_id(image_sample_id, reference_ref)


def sample_id(ref) -> str:
    """A sample is its source file's identity (path, size, mtime) within a dataset key."""
    return hashlib.sha256(f"{ref.rel_path}\0{ref.size}\0{ref.mtime_ns}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class CachePaths:
    root: str

    def latents(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/latents/{key}"

    def text(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/text/{key}"

    def masks(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/masks/{key}"

    def references(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/references/{key}"


def empty_manifest(kind: str, key: str, meta: dict) -> dict:
    return {"format": CACHE_FORMAT_VERSION, "kind": kind, "key": key, "version": 0, "shards": [], "index": None,
            **meta}


def new_run_id() -> str:
    """One cache run's folder under ``shards/``: shards of concurrent runs never collide."""
    return f"run-{uuid.uuid4().hex[:12]}"


def shard_file(run: str) -> str:
    """A new shard's path relative to its cache root: ``shards/<run>/<16 hex>.parquet``."""
    return f"shards/{run}/{uuid.uuid4().hex[:16]}.parquet"


def index_file(version: int) -> str:
    """The caption index a manifest of this version names."""
    return f"index-v{version}.parquet"


def rows_file(shard_path: str) -> str:
    """The side file holding a shard's non-blob columns."""
    return shard_path + ROWS_SUFFIX


def check_format(manifest: dict, manifest_uri: str) -> None:
    """Refuse a cache written in another on-disk format: it would be misread."""
    found = manifest.get("format")
    if found != CACHE_FORMAT_VERSION:
        raise ValueError(f"{manifest_uri}: cache format {found}, this flux_ray reads format {CACHE_FORMAT_VERSION} "
                         "(row-group-per-row shards with .rows.parquet side files); run `flux-ray cache` to write a "
                         "new cache (the keys differ, so nothing old is overwritten) and delete the old folder")


def tensor_to_bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    """Raw little-endian bytes of ``t`` cast to dtype (bf16 stored via its 16-bit pattern)."""
    t = t.detach().to("cpu", dtype).contiguous()
    return t.view(TORCH_TO_NP_VIEW[dtype]).numpy().tobytes()


def bytes_to_tensor(data, dtype: torch.dtype, shape) -> torch.Tensor:
    """Inverse of :func:`tensor_to_bytes` (a copy: the tensor owns its memory)."""
    view = TORCH_TO_NP_VIEW[dtype]
    arr = np.frombuffer(data, dtype=torch.empty(0, dtype=view).numpy().dtype).reshape(shape)
    return torch.from_numpy(arr.copy()).view(dtype)


def nbytes(dtype: torch.dtype, *shape: int) -> int:
    return int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
