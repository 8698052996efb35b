"""Cache identity and layout: content-addressed keys, manifests, committed shards. No Ray.

Layout under ``cache.uri``::

    latents/<dataset_key>/manifest.json      committed shards + caption index, version
    latents/<dataset_key>/shards/part-*.parquet
    latents/<dataset_key>/index-v<N>.parquet  sample_id -> caption_id (rewritten each run)
    text/<text_key>/manifest.json
    text/<text_key>/shards/part-*.parquet    caption_id -> T5 + CLIP embeddings

Readers only open files a manifest lists, and a manifest is written (atomically) after its files,
so a killed job never exposes a half-written shard.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

CACHE_FORMAT_VERSION = 1
PREPROCESS_KEYS = ("resolution", "resolution_type", "minimum_image_size", "maximum_image_size",
                   "target_downsample_size", "crop", "crop_style", "crop_aspect")
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


def empty_manifest(kind: str, key: str, meta: dict) -> dict:
    return {"format": CACHE_FORMAT_VERSION, "kind": kind, "key": key, "version": 0, "shards": [], "index": None,
            **meta}
