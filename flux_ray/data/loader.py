"""Worker-side cache reader: committed Parquet -> same-bucket batches, by a global batch plan.

The plan (which samples form which same-bucket batch, in which order) depends only on the cache
index, the seed and the epoch, so every rank derives the same plan and takes every world_size-th
batch: all ranks run the same number of steps per epoch and no rank waits at an epoch end.
"""
from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass

import pyarrow.parquet as pq
import torch

from flux_ray import storage
from flux_ray.core.flow import normalize_latents
from flux_ray.core.model import DTYPES
from flux_ray.core.step import FluxBatch
from flux_ray.data.cache_layout import CachePaths, dataset_key, text_key
from flux_ray.data.encoders import bytes_to_tensor
from flux_ray.data.sources import caption_id

EMPTY_CAPTION_ID = caption_id("")


@dataclass(frozen=True)
class Sample:
    sample_id: str
    dataset_id: str
    bucket: tuple[int, int]
    caption_id: str
    shard: str            # full URI of the latent shard
    row: int
    repeats: int = 0
    is_regularisation: bool = False
    order_key: str = ""   # hash of dataset + relative path: stable across re-encodes (plans, eval split, seeds)


def _read(uri: str, st, columns=None):
    fs, path = storage.resolve(uri, st)
    return pq.read_table(path, filesystem=fs, columns=columns)


class CacheReader:
    """Index of one job's cache and an LRU of decoded shards."""

    def __init__(self, spec, vae_config: dict, max_open_shards: int = 16):
        self.spec, self.st = spec, spec.storage
        paths = CachePaths(spec.cache.uri)
        self.latent_dtype = DTYPES[spec.cache.latent_dtype]
        self.text_dtype = DTYPES[spec.cache.text_embed_dtype]
        self.samples: dict[str, list[Sample]] = {}
        self.latent_norm: dict[str, tuple[float, float]] = {}
        for ds in spec.enabled_datasets():
            uri = paths.latents(dataset_key(ds, spec.model, vae_config, spec.cache.latent_dtype))
            mpath = storage.join(uri, "manifest.json")
            if not storage.exists(mpath, self.st):
                raise FileNotFoundError(f"dataset {ds.id!r} has no cache at {uri}: run `flux-ray cache` first")
            manifest = storage.read_json(mpath, self.st)
            self.latent_norm[ds.id] = (manifest["shift_factor"], manifest["scaling_factor"])
            self.samples[ds.id] = self._index_dataset(ds, uri, manifest)
        turi = paths.text(text_key(spec.model, spec.cache.text_embed_dtype))
        self.text_manifest = storage.read_json(storage.join(turi, "manifest.json"), self.st)
        self.text_rows: dict[str, tuple[str, int]] = {}
        for shard in self.text_manifest["shards"]:
            suri = storage.join(turi, shard["file"])
            for i, cid in enumerate(_read(suri, self.st, ["caption_id"]).column("caption_id").to_pylist()):
                self.text_rows[cid] = (suri, i)
        self._shards: OrderedDict[str, dict] = OrderedDict()
        self._max_open = max_open_shards

    def _index_dataset(self, ds, uri: str, manifest: dict) -> list[Sample]:
        index = _read(storage.join(uri, manifest["index"]), self.st, ["sample_id", "caption_id", "rel_path"]).to_pylist()
        captions = {r["sample_id"]: r["caption_id"] for r in index}
        keys = {r["sample_id"]: hashlib.sha256(f"{ds.id}\0{r['rel_path']}".encode()).hexdigest()[:24] for r in index}
        out = []
        for shard in manifest["shards"]:
            suri = storage.join(uri, shard["file"])
            cols = _read(suri, self.st, ["sample_id", "skip_reason", "bucket_w", "bucket_h"]).to_pylist()
            for i, r in enumerate(cols):
                if r["skip_reason"] or r["sample_id"] not in captions:
                    continue
                out.append(Sample(r["sample_id"], ds.id, (r["bucket_w"], r["bucket_h"]), captions[r["sample_id"]],
                                  suri, i, ds.repeats, ds.is_regularisation_data, keys[r["sample_id"]]))
        return sorted(out, key=lambda s: s.order_key)

    def split(self, eval_fraction: float) -> tuple[list[Sample], list[Sample]]:
        """(train, eval) samples: eval datasets, or a deterministic hashed fraction of training images."""
        train = [s for ds in self.spec.enabled_datasets("image") for s in self.samples[ds.id]]
        evals = [s for ds in self.spec.enabled_datasets("eval") for s in self.samples[ds.id]]
        if not evals and eval_fraction > 0:
            evals = [s for s in train if int(s.order_key[:8], 16) / 0xFFFFFFFF < eval_fraction]
            held = {s.sample_id for s in evals}
            train = [s for s in train if s.sample_id not in held]
        return train, evals

    def _table(self, uri: str) -> dict:
        if uri in self._shards:
            self._shards.move_to_end(uri)
            return self._shards[uri]
        tbl = _read(uri, self.st).to_pydict()
        self._shards[uri] = tbl
        while len(self._shards) > self._max_open:
            self._shards.popitem(last=False)
        return tbl

    def text(self, cid: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        uri, i = self.text_rows[cid]
        t = self._table(uri)
        seq, dim, pdim = t["seq_len"][i], t["embed_dim"][i], t["pooled_dim"][i]
        emb = bytes_to_tensor(t["prompt_embeds"][i], self.text_dtype, (seq, dim))
        pooled = bytes_to_tensor(t["pooled"][i], self.text_dtype, (pdim,))
        mask = torch.frombuffer(bytearray(t["text_mask"][i]), dtype=torch.int8).clone()
        return emb, pooled, mask

    def latents(self, s: Sample, generator: torch.Generator | None) -> torch.Tensor:
        """A fresh sample mean + std * eps from the stored distribution, normalised for the transformer."""
        t = self._table(s.shard)
        shape = (16, t["latent_h"][s.row], t["latent_w"][s.row])
        mean = bytes_to_tensor(t["latent_mean"][s.row], self.latent_dtype, shape).float()
        std = bytes_to_tensor(t["latent_std"][s.row], self.latent_dtype, shape).float()
        raw = mean if generator is None else mean + std * torch.randn(shape, generator=generator)
        return normalize_latents(raw, *self.latent_norm[s.dataset_id])

    def batch(self, samples: list[Sample], generator: torch.Generator | None = None,
              caption_dropout: dict[str, float] | None = None, rng: random.Random | None = None) -> FluxBatch:
        lat, emb, pooled, mask = [], [], [], []
        for s in samples:
            lat.append(self.latents(s, generator))
            cid = s.caption_id
            p = (caption_dropout or {}).get(s.dataset_id, 0.0)
            if p and rng is not None and rng.random() < p:
                cid = EMPTY_CAPTION_ID
            e, pl, m = self.text(cid)
            emb.append(e.float()), pooled.append(pl.float()), mask.append(m)
        return FluxBatch(torch.stack(lat), torch.stack(emb), torch.stack(pooled), torch.stack(mask))


def batch_plan(samples: list[Sample], batch_size: int, world_size: int, seed: int, epoch: int) -> list[list[Sample]]:
    """Global same-bucket batches for an epoch, a multiple of world_size long.

    Each sample appears 1 + repeats times; a bucket's last partial batch is filled by wrapping
    around that bucket; the batch list is padded by wrapping to a multiple of world_size.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    by_bucket: dict[tuple[int, int], list[Sample]] = {}
    for s in sorted(samples, key=lambda s: (s.order_key, s.sample_id)):
        by_bucket.setdefault(s.bucket, []).extend([s] * (1 + s.repeats))
    batches = []
    for bucket in sorted(by_bucket):
        items = by_bucket[bucket]
        rng.shuffle(items)
        n = -(-len(items) // batch_size) * batch_size
        items = [items[i % len(items)] for i in range(n)]
        batches.extend(items[i:i + batch_size] for i in range(0, n, batch_size))
    rng.shuffle(batches)
    pad = -len(batches) % world_size
    batches += [batches[i % len(batches)] for i in range(pad)] if batches else []
    return batches


def rank_batches(plan: list[list[Sample]], rank: int, world_size: int) -> list[list[Sample]]:
    return plan[rank::world_size]
