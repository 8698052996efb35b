"""A synthetic cache written through the cache writer's own functions (benches and reader tests).

Rows have the shapes and dtypes the encoders store (latent mean + std, T5 + CLIP embeddings and the T5
mask), filled with seeded random values, so readers can be tested and measured at any size without
encoding images.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import torch

from flux_ray import storage
from flux_ray.core.model import DTYPES
from flux_ray.data.cache import _commit, write_shard
from flux_ray.data.cache_layout import CachePaths, dataset_key, empty_manifest, tensor_to_bytes, text_key
from flux_ray.data.sources import caption_id

VAE_CONFIG = {"shift_factor": 0.1159, "scaling_factor": 0.3611}


def _sid(i: int) -> str:
    return hashlib.sha256(f"synthetic-{i}".encode()).hexdigest()[:24]


def _embedding(gen, rng, shape, dtype, random_bytes: bool) -> bytes:
    if random_bytes:
        return rng.bytes(int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size())
    return tensor_to_bytes(torch.randn(*shape, generator=gen), dtype)


def _entries(written: dict) -> list[dict]:
    return [dict(zip(written, values)) for values in zip(*written.values())]


def write_synthetic_cache(spec, n_images: int, buckets: list[tuple[int, int]], n_captions: int,
                          rows_per_file: int = 256, pooled_dim: int = 768, embed_dim: int = 4096,
                          random_bytes: bool = False) -> dict:
    """Cache ``n_images`` of the spec's first dataset (round-robin over ``buckets`` in pixels) and
    ``n_captions`` captions (+ the empty one; image i has caption i % n_captions). Returns byte counts.

    ``random_bytes``: T5 rows are random bytes, not random normals (as incompressible, 10x faster to make;
    the values may be NaN, which a bench does not mind and a test comparing tensors would)."""
    st, ds = spec.storage, spec.enabled_datasets()[0]
    lat_dtype, txt_dtype = DTYPES[spec.cache.latent_dtype], DTYPES[spec.cache.text_embed_dtype]
    gen = torch.Generator().manual_seed(0)
    paths = CachePaths(spec.cache.uri)
    lkey = dataset_key(ds, spec.model, VAE_CONFIG, spec.cache.latent_dtype)
    luri = paths.latents(lkey)
    storage.ensure_bucket(luri, st)
    manifest = empty_manifest("latents", lkey, {"dataset_id": ds.id, "dtype": spec.cache.latent_dtype, **VAE_CONFIG})
    entries = []
    for start in range(0, n_images, rows_per_file):
        rows = range(start, min(n_images, start + rows_per_file))
        means, stds, bw, bh, lh, lw = [], [], [], [], [], []
        for i in rows:
            w, h = buckets[i % len(buckets)]
            mean = torch.randn(16, h // 8, w // 8, generator=gen)
            means.append(tensor_to_bytes(mean, lat_dtype))
            stds.append(tensor_to_bytes(mean.abs() * 0.1, lat_dtype))
            bw.append(w), bh.append(h), lh.append(h // 8), lw.append(w // 8)
        table = pa.table({"sample_id": [_sid(i) for i in rows], "rel_path": [f"img{i:06d}.png" for i in rows],
                          "skip_reason": [""] * len(rows), "bucket_w": bw, "bucket_h": bh,
                          "latent_mean": pa.array(means, pa.binary()), "latent_std": pa.array(stds, pa.binary()),
                          "latent_h": np.array(lh, np.int32), "latent_w": np.array(lw, np.int32)})
        entries += _entries(write_shard(table, luri, st, "run-synthetic"))
    captions = [f"caption {c}" for c in range(n_captions)]
    index = pa.table({"sample_id": [_sid(i) for i in range(n_images)],
                      "rel_path": [f"img{i:06d}.png" for i in range(n_images)],
                      "caption": [captions[i % n_captions] for i in range(n_images)]})
    index = index.append_column("caption_id", pa.array([caption_id(c) for c in index["caption"].to_pylist()]))
    _commit(luri, st, manifest, entries, index)
    tkey = text_key(spec.model, spec.cache.text_embed_dtype)
    turi = paths.text(tkey)
    seq = spec.model.t5_max_length
    tmanifest = empty_manifest("text", tkey, {"dtype": spec.cache.text_embed_dtype, "t5_max_length": seq})
    rng = np.random.default_rng(0)
    all_caps = sorted({caption_id(c): c for c in ["", *captions]}.items())
    tentries = []
    for start in range(0, len(all_caps), rows_per_file):
        chunk = all_caps[start:start + rows_per_file]
        n = len(chunk)
        table = pa.table({
            "caption_id": [c for c, _ in chunk], "caption": [t for _, t in chunk],
            "prompt_embeds": pa.array([_embedding(gen, rng, (seq, embed_dim), txt_dtype, random_bytes)
                                       for _ in chunk], pa.binary()),
            "pooled": pa.array([tensor_to_bytes(torch.randn(pooled_dim, generator=gen), txt_dtype) for _ in chunk],
                               pa.binary()),
            "text_mask": pa.array([np.ones(seq, np.int8).tobytes() for _ in chunk], pa.binary()),
            "seq_len": np.full(n, seq, np.int32), "embed_dim": np.full(n, embed_dim, np.int32),
            "pooled_dim": np.full(n, pooled_dim, np.int32)})
        tentries += _entries(write_shard(table, turi, st, "run-synthetic"))
        del table
    _commit(turi, st, tmanifest, tentries)
    return {"latent_bytes": sum(e["bytes"] for e in entries), "text_bytes": sum(e["bytes"] for e in tentries),
            "latent_uri": luri, "text_uri": turi}
