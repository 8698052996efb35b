"""Worker-side cache reader: committed Parquet -> same-bucket batches, by a window-local batch plan.

The plan (which samples form which same-bucket batch, in which order) depends only on the cache
index, the seed, the epoch, the world size and the memory bound, so every rank derives the same plan
and all ranks run the same number of steps per epoch.

Why windows: a T5 embedding is 4 MiB and a latent row 0.25-1 MiB, so a globally shuffled plan over a
cache larger than host memory fetches most rows many times. Here an epoch's samples are ordered by
caption (shuffled per epoch), cut into one contiguous part per rank and each part into *windows* whose
unique rows fit half of ``cache.reader_memory_gib``; batches are made and shuffled inside a window. A
rank reads a window's rows once (row-group range reads, data/cache_read.py), serves its batches while
the next window loads (data/prefetch.py), then drops it: each latent and text byte is fetched about
once per epoch per node, and host memory stays bounded whatever the dataset size.
"""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from flux_ray import storage
from flux_ray.core.model import DTYPES
from flux_ray.core.step import FluxBatch
from flux_ray.data.cache_layout import (INDEX_CAPTION_IDS, LATENT_BLOBS, MANIFEST_FILE, MASK_BLOBS, SHARD_TARGET_BYTES,
                                       TEXT_BLOBS, CachePaths, bytes_to_tensor, check_format, dataset_key, mask_key,
                                       nbytes, reference_key, rows_file, text_key)
from flux_ray.data.cache_read import ByteCounter, read_rows, read_table
from flux_ray.data.sources import caption_id
from flux_ray.families import get_family

if TYPE_CHECKING:
    from flux_ray.spec import JobSpec

EMPTY_CAPTION_ID = caption_id("")
READ_THREADS = 4
ROWS_PER_READ = 64  # rows of one shard per read_row_groups call (a shard is <= SHARD_TARGET_BYTES anyway)


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
    nbytes: int = 0       # stored latent bytes (mean + std), and the mask's
    latent_hw: tuple[int, int] = (0, 0)
    mask_id: str = ""     # its loss mask's row (conditioning_type: mask), "" without one
    mask_shard: str = ""
    mask_row: int = -1
    caption_ids: tuple[str, ...] = ()
    """Every caption of the image when it has several; ``caption_id`` is the first until an epoch draws one."""
    reference_id: str = ""  # its Kontext reference latents' row (conditioning_type reference_*), "" without one
    reference_shard: str = ""
    reference_row: int = -1
    reference_hw: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class TextRow:
    shard: str
    row: int
    seq_len: int
    embed_dim: int
    pooled_dim: int
    nbytes: int


@dataclass
class WindowData:
    """Decoded rows of one window, in the cache dtype: sample_id -> (mean, std), caption_id -> (T5, CLIP, mask),
    mask_id -> uint8 loss mask (h, w), reference_id -> (mean, std) of the Kontext reference."""
    latents: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    references: dict = field(default_factory=dict)


class CacheReader:
    """Index of one job's cache (from the shards' side files); reads the rows a window or batch needs."""

    def __init__(self, spec: JobSpec, vae_config: dict):
        self.spec, self.st = spec, spec.storage
        paths = CachePaths(spec.cache.uri)
        self.latent_dtype = DTYPES[spec.cache.latent_dtype]
        self.text_dtype = DTYPES[spec.cache.text_embed_dtype]
        self.memory_bytes = int(spec.cache.reader_memory_gib * 2**30)
        self.counter = ByteCounter()
        self.footers: dict = {}  # shard uri -> Parquet footer, read once
        self.samples: dict[str, list[Sample]] = {}
        self.family = get_family(spec.model.model_family)
        self.latent_channels = int(vae_config.get("latent_channels") or 16)  # FLUX.1: 16, FLUX.2: 32
        self.latent_norm: dict[str, dict] = {}  # dataset id -> the VAE factors its manifest recorded
        for ds in spec.latent_datasets():
            key = dataset_key(ds, spec.model, vae_config, spec.cache.latent_dtype)
            uri = paths.latents(key)
            manifest = self._manifest(uri, f"dataset {ds.id!r}")
            self.latent_norm[ds.id] = {k: manifest[k] for k in self.family.latent_norm(vae_config)}
            mask_ds = spec.mask_dataset(ds)
            masks = self._index_masks(paths.masks(mask_key(key, mask_ds)), ds) if mask_ds else None
            reference_ds = spec.reference_dataset(ds)
            references = (self._index_references(paths.references(reference_key(key, reference_ds)), ds)
                          if reference_ds else None)
            self.samples[ds.id] = self._index_dataset(ds, uri, manifest, masks, references)
        turi = paths.text(text_key(spec.model, spec.cache.text_embed_dtype))
        self.text_manifest = self._manifest(turi, "the captions")
        self.text_rows: dict[str, TextRow] = {}
        for shard in self.text_manifest["shards"]:
            suri = storage.join(turi, shard["file"])
            side = read_table(rows_file(suri), self.st, ["caption_id", "seq_len", "embed_dim", "pooled_dim"])
            for i, r in enumerate(side.to_pylist()):
                size = nbytes(self.text_dtype, r["seq_len"], r["embed_dim"]) + nbytes(self.text_dtype, r["pooled_dim"])
                self.text_rows[r["caption_id"]] = TextRow(suri, i, r["seq_len"], r["embed_dim"], r["pooled_dim"],
                                                          size + r["seq_len"])

    def _manifest(self, uri: str, what: str) -> dict:
        mpath = storage.join(uri, MANIFEST_FILE)
        if not storage.exists(mpath, self.st):
            raise FileNotFoundError(f"{what} has no cache at {uri}: run `flux-ray cache` first")
        manifest = storage.read_json(mpath, self.st)
        check_format(manifest, mpath)
        return manifest

    def _index_masks(self, uri: str, ds) -> dict[str, tuple[str, str, int]]:
        """sample_id -> (mask_id, shard, row) of the dataset's usable masks (data/masks.py)."""
        manifest = self._manifest(uri, f"the masks of dataset {ds.id!r}")
        index = {r["mask_id"]: r["sample_id"] for r in
                 read_table(storage.join(uri, manifest["index"]), self.st, ["sample_id", "mask_id"]).to_pylist()}
        rows = {}
        for shard in manifest["shards"]:
            suri = storage.join(uri, shard["file"])
            for i, r in enumerate(read_table(rows_file(suri), self.st, ["mask_id", "skip_reason"]).to_pylist()):
                if not r["skip_reason"] and r["mask_id"] in index:
                    rows[index[r["mask_id"]]] = (r["mask_id"], suri, i)
        return rows

    def _index_references(self, uri: str, ds) -> dict[str, dict]:
        """sample_id -> Sample fields of the dataset's usable Kontext references (data/references.py)."""
        manifest = self._manifest(uri, f"the references of dataset {ds.id!r}")
        index = {r["reference_id"]: r["sample_id"] for r in
                 read_table(storage.join(uri, manifest["index"]), self.st, ["sample_id", "reference_id"]).to_pylist()}
        rows = {}
        for shard in manifest["shards"]:
            suri = storage.join(uri, shard["file"])
            cols = ["reference_id", "skip_reason", "latent_h", "latent_w"]
            for i, r in enumerate(read_table(rows_file(suri), self.st, cols).to_pylist()):
                if not r["skip_reason"] and r["reference_id"] in index:
                    rows[index[r["reference_id"]]] = {
                        "reference_id": r["reference_id"], "reference_shard": suri, "reference_row": i,
                        "reference_hw": (int(r["latent_h"]), int(r["latent_w"]))}
        return rows

    def _index_dataset(self, ds, uri: str, manifest: dict, masks: dict | None = None,
                       references: dict | None = None) -> list[Sample]:
        table = read_table(storage.join(uri, manifest["index"]), self.st)  # small: one row per image
        has_variants = INDEX_CAPTION_IDS in table.column_names
        index = table.select(["sample_id", "caption_id", "rel_path"] + [INDEX_CAPTION_IDS] * has_variants).to_pylist()
        captions = {r["sample_id"]: r["caption_id"] for r in index}
        variants = {r["sample_id"]: tuple(r[INDEX_CAPTION_IDS]) for r in index
                    if has_variants and len(r[INDEX_CAPTION_IDS]) > 1}
        keys = {r["sample_id"]: hashlib.sha256(f"{ds.id}\0{r['rel_path']}".encode()).hexdigest()[:24] for r in index}
        out = []
        for shard in manifest["shards"]:
            suri = storage.join(uri, shard["file"])
            cols = read_table(rows_file(suri), self.st, ["sample_id", "skip_reason", "bucket_w", "bucket_h",
                                                          "latent_h", "latent_w"]).to_pylist()
            for i, r in enumerate(cols):
                if r["skip_reason"] or r["sample_id"] not in captions:
                    continue
                mask = ("", "", -1) if masks is None else masks.get(r["sample_id"])
                reference = {} if references is None else references.get(r["sample_id"])
                if mask is None or reference is None:  # empty or missing: reported by the cache job, not trained
                    continue
                hw = (int(r["latent_h"]), int(r["latent_w"]))
                size = 2 * nbytes(self.latent_dtype, self.latent_channels, *hw) + (hw[0] * hw[1] if mask[0] else 0)
                if reference:
                    size += 2 * nbytes(self.latent_dtype, self.latent_channels, *reference["reference_hw"])
                out.append(Sample(r["sample_id"], ds.id, (r["bucket_w"], r["bucket_h"]), captions[r["sample_id"]],
                                  suri, i, ds.repeats, ds.is_regularisation_data, keys[r["sample_id"]], size, hw,
                                  *mask, variants.get(r["sample_id"], ()), **reference))
        return sorted(out, key=lambda s: s.order_key)

    def split(self, eval_fraction: float) -> tuple[list[Sample], list[Sample]]:
        """(train, eval) samples: eval datasets, or a deterministic hashed fraction of training images."""
        train = [s for ds in self.spec.enabled_datasets("image") for s in self.samples[ds.id]]
        evals = [s for ds in self.spec.enabled_datasets("eval") for s in self.samples[ds.id]]
        if not evals and eval_fraction > 0:  # held out from the images the adapter learns, not the prior's
            evals = [s for s in train
                     if not s.is_regularisation and int(s.order_key[:8], 16) / 0xFFFFFFFF < eval_fraction]
            held = {s.sample_id for s in evals}
            train = [s for s in train if s.sample_id not in held]
        return train, evals

    # ------------------------------------------------------------------ plans
    def window_bytes(self, batch_size: int, prefetch_batches: int) -> int:
        """Bytes of unique rows per window: two windows (served + loading), the reads in flight (Arrow copy and
        tensors of a shard per read thread) and the ready batches fit the bound."""
        text = max((t.nbytes for t in self.text_rows.values()), default=0)
        lat = max((s.nbytes for ds in self.samples.values() for s in ds), default=0)
        batch_fp32 = batch_size * 2 * (text + lat)  # fp32 batches are twice the bf16 rows
        in_flight = READ_THREADS * 2 * SHARD_TARGET_BYTES
        return max(1, (self.memory_bytes - (prefetch_batches + 2) * batch_fp32 - in_flight - text) // 2)

    def plan(self, samples: list[Sample], batch_size: int, world_size: int, seed: int, epoch: int,
             prefetch_batches: int) -> list[list[list[list[Sample]]]]:
        """:func:`epoch_windows` under this reader's memory bound."""
        return epoch_windows(samples, batch_size, world_size, seed, epoch,
                             self.window_bytes(batch_size, prefetch_batches),
                             {c: t.nbytes for c, t in self.text_rows.items()})

    # ------------------------------------------------------------------ reads
    def load(self, samples, caption_ids, reuse: WindowData | None = None) -> WindowData:
        """Read the latents of ``samples`` and the embeddings of ``caption_ids`` (what ``reuse`` holds is kept)."""
        reuse = reuse or WindowData()
        out = WindowData({s.sample_id: reuse.latents[s.sample_id] for s in samples if s.sample_id in reuse.latents},
                         {c: reuse.text[c] for c in caption_ids if c in reuse.text},
                         {s.mask_id: reuse.masks[s.mask_id] for s in samples if s.mask_id in reuse.masks},
                         {s.reference_id: reuse.references[s.reference_id] for s in samples
                          if s.reference_id in reuse.references})
        reference_jobs: dict[str, dict[int, Sample]] = defaultdict(dict)
        for s in samples:
            if s.reference_id and s.reference_id not in out.references:
                reference_jobs[s.reference_shard][s.reference_row] = s
        mask_jobs: dict[str, dict[int, Sample]] = defaultdict(dict)
        for s in samples:
            if s.mask_id and s.mask_id not in out.masks:
                mask_jobs[s.mask_shard][s.mask_row] = s
        lat_jobs: dict[str, dict[int, Sample]] = defaultdict(dict)
        for s in samples:
            if s.sample_id not in out.latents:
                lat_jobs[s.shard][s.row] = s
        text_jobs: dict[str, dict[int, str]] = defaultdict(dict)
        for c in caption_ids:
            if c not in out.text:
                t = self.text_rows[c]
                text_jobs[t.shard][t.row] = c
        jobs = [(self._read_latents, uri, dict(chunk)) for uri, rows in lat_jobs.items() for chunk in _chunks(rows)]
        jobs += [(self._read_text, uri, dict(chunk)) for uri, rows in text_jobs.items() for chunk in _chunks(rows)]
        jobs += [(self._read_masks, uri, dict(chunk)) for uri, rows in mask_jobs.items() for chunk in _chunks(rows)]
        jobs += [(self._read_references, uri, dict(chunk)) for uri, rows in reference_jobs.items()
                 for chunk in _chunks(rows)]
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="flux_ray-read") as pool:
            for kind, got in pool.map(lambda j: j[0](j[1], j[2]), jobs):
                getattr(out, kind).update(got)
        return out

    def _read_latents(self, uri: str, rows: dict[int, Sample]) -> tuple[str, dict]:
        order = sorted(rows)
        t = read_rows(uri, self.st, order, list(LATENT_BLOBS), self.counter, self.footers)
        mean, std = t.column("latent_mean"), t.column("latent_std")
        got = {}
        for i, r in enumerate(order):
            shape = (self.latent_channels, *rows[r].latent_hw)
            got[rows[r].sample_id] = (bytes_to_tensor(mean[i].as_buffer(), self.latent_dtype, shape),
                                      bytes_to_tensor(std[i].as_buffer(), self.latent_dtype, shape))
        return "latents", got

    def _read_references(self, uri: str, rows: dict[int, Sample]) -> tuple[str, dict]:
        order = sorted(rows)
        t = read_rows(uri, self.st, order, list(LATENT_BLOBS), self.counter, self.footers)
        mean, std = t.column("latent_mean"), t.column("latent_std")
        got = {}
        for i, r in enumerate(order):
            shape = (self.latent_channels, *rows[r].reference_hw)
            got[rows[r].reference_id] = (bytes_to_tensor(mean[i].as_buffer(), self.latent_dtype, shape),
                                         bytes_to_tensor(std[i].as_buffer(), self.latent_dtype, shape))
        return "references", got

    def _read_masks(self, uri: str, rows: dict[int, Sample]) -> tuple[str, dict]:
        order = sorted(rows)
        t = read_rows(uri, self.st, order, list(MASK_BLOBS), self.counter, self.footers)
        col = t.column(MASK_BLOBS[0])
        return "masks", {rows[r].mask_id: torch.frombuffer(bytearray(col[i].as_py()), dtype=torch.uint8)
                         .view(*rows[r].latent_hw) for i, r in enumerate(order)}

    def _read_text(self, uri: str, rows: dict[int, str]) -> tuple[str, dict]:
        order = sorted(rows)
        t = read_rows(uri, self.st, order, list(TEXT_BLOBS), self.counter, self.footers)
        emb, pooled, mask = t.column("prompt_embeds"), t.column("pooled"), t.column("text_mask")
        got = {}
        for i, r in enumerate(order):
            tr = self.text_rows[rows[r]]
            got[rows[r]] = (bytes_to_tensor(emb[i].as_buffer(), self.text_dtype, (tr.seq_len, tr.embed_dim)),
                            bytes_to_tensor(pooled[i].as_buffer(), self.text_dtype, (tr.pooled_dim,)),
                            torch.frombuffer(bytearray(mask[i].as_py()), dtype=torch.int8))
        return "text", got

    # ------------------------------------------------------------------ batches
    def build(self, data: WindowData, samples: list[Sample], generator: torch.Generator | None = None,
              caption_dropout: dict[str, float] | None = None, rng: random.Random | None = None) -> FluxBatch:
        """A host batch from loaded rows. Latents are a fresh sample mean + std * eps of the stored distribution,
        normalised for the transformer; a dropped caption becomes the empty caption's embeddings."""
        lat, emb, pooled, mask = [], [], [], []
        for s in samples:
            mean, std = data.latents[s.sample_id]
            mean = mean.float()
            raw = mean if generator is None else mean + std.float() * torch.randn(mean.shape, generator=generator)
            lat.append(self.family.normalize_latents(raw, self.latent_norm[s.dataset_id]))
            cid = s.caption_id
            p = (caption_dropout or {}).get(s.dataset_id, 0.0)
            if p and rng is not None and rng.random() < p:
                cid = EMPTY_CAPTION_ID
            e, pl, m = data.text[cid]
            emb.append(e.float()), pooled.append(pl.float()), mask.append(m)
        pooled = torch.stack(pooled) if pooled[0].numel() else None  # a family without a pooled embedding
        return FluxBatch(torch.stack(lat), torch.stack(emb), pooled, torch.stack(mask),
                         loss_mask=_loss_mask(data, samples),
                         prior_rows=tuple(i for i, s in enumerate(samples) if s.is_regularisation),
                         reference_latents=self._reference_latents(data, samples, generator))

    def _reference_latents(self, data: WindowData, samples: list[Sample],
                           generator: torch.Generator | None) -> torch.Tensor | None:
        """(B, 16, rh, rw) Kontext reference latents, sampled and normalised like the targets (their draws come
        after the targets', so a batch's target latents do not depend on its references), or None."""
        if not any(s.reference_id for s in samples):
            return None
        out = []
        for s in samples:
            mean, std = data.references[s.reference_id]
            mean = mean.float()
            raw = mean if generator is None else mean + std.float() * torch.randn(mean.shape, generator=generator)
            out.append(self.family.normalize_latents(raw, self.latent_norm[s.dataset_id]))
        return torch.stack(out)

    def batch(self, samples: list[Sample], generator: torch.Generator | None = None,
              caption_dropout: dict[str, float] | None = None, rng: random.Random | None = None) -> FluxBatch:
        """Read and build one batch directly (eval; the training loop streams windows instead)."""
        cids = {s.caption_id for s in samples} | ({EMPTY_CAPTION_ID} if caption_dropout else set())
        return self.build(self.load(samples, sorted(cids)), samples, generator, caption_dropout, rng)


def _loss_mask(data: WindowData, samples: list[Sample]) -> torch.Tensor | None:
    """(B, 1, h, w) weights in [0, 1] when a sample of the batch has a mask (ones for those without), else None."""
    if not any(s.mask_id for s in samples):
        return None
    return torch.stack([data.masks[s.mask_id].float() / 255.0 if s.mask_id else torch.ones(s.latent_hw)
                        for s in samples])[:, None]


def _chunks(rows: dict) -> list[list]:
    items = sorted(rows.items())
    return [items[i:i + ROWS_PER_READ] for i in range(0, len(items), ROWS_PER_READ)]


def window_needs(window: list[list[Sample]], with_empty_caption: bool) -> tuple[list[Sample], list[str]]:
    """The unique samples and caption ids a window's batches read."""
    samples = list({s.sample_id: s for b in window for s in b}.values())
    cids = {s.caption_id for s in samples} | ({EMPTY_CAPTION_ID} if with_empty_caption else set())
    return samples, sorted(cids)


def epoch_windows(samples: list[Sample], batch_size: int, world_size: int, seed: int, epoch: int,
                  window_bytes: int | None = None, text_bytes: dict[str, int] | None = None
                  ) -> list[list[list[list[Sample]]]]:
    """Per rank, its windows of same-bucket batches for an epoch; every rank gets the same number of batches.

    Each sample appears 1 + repeats times, with this epoch's caption (:func:`epoch_captions`). Samples are ordered
    by caption (the captions shuffled per
    epoch), cut into ``world_size`` contiguous parts of equal count, and each part into windows whose unique
    latent + caption bytes stay under ``window_bytes`` (None: one window). Inside a window each bucket's
    samples are shuffled into batches; a bucket's partial batch carries into the next window, and the last
    is filled by wrapping around that bucket; a window's batches are shuffled. Shorter ranks are padded with
    their own last window's batches (a rank without samples wraps the other ranks' batches).
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    by_caption: dict[str, list[Sample]] = {}
    for s in sorted(epoch_captions(samples, seed, epoch), key=lambda s: (s.order_key, s.sample_id)):
        by_caption.setdefault(s.caption_id, []).extend([s] * (1 + s.repeats))
    order = sorted(by_caption)
    rng.shuffle(order)
    stream = [s for c in order for s in by_caption[c]]
    if not stream:
        return [[] for _ in range(world_size)]
    bounds = [len(stream) * r // world_size for r in range(world_size + 1)]
    ranks = [_rank_windows(stream[bounds[r]:bounds[r + 1]], batch_size, rng, window_bytes, text_bytes or {})
             for r in range(world_size)]
    longest = max(sum(len(w) for w in wins) for wins in ranks)
    everything = [b for wins in ranks for w in wins for b in w]
    for wins in ranks:
        n = sum(len(w) for w in wins)
        if n < longest:
            if not wins:
                wins.append([])
            source = wins[-1][:] or everything
            wins[-1].extend(source[i % len(source)] for i in range(longest - n))
    return ranks


def epoch_captions(samples: list[Sample], seed: int, epoch: int) -> list[Sample]:
    """Each image with several captions trains on one of them this epoch, drawn uniformly from a hash of
    (seed, epoch, sample): every rank draws the same, and a resumed epoch draws what it drew before."""
    return [replace(s, caption_id=s.caption_ids[caption_draw(seed, epoch, s.sample_id, len(s.caption_ids))])
            if len(s.caption_ids) > 1 else s for s in samples]


def caption_draw(seed: int, epoch: int, sample_id: str, n: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{epoch}\0{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n


def _rank_windows(stream: list[Sample], batch_size: int, rng: random.Random, window_bytes: int | None,
                  text_bytes: dict[str, int]) -> list[list[list[Sample]]]:
    windows: list[list[Sample]] = []
    cost, seen = 0, set()
    for s in stream:
        add = (0 if s.sample_id in seen else s.nbytes) + \
            (0 if s.caption_id in seen else text_bytes.get(s.caption_id, 0))
        if window_bytes is not None and windows and cost + add > window_bytes and windows[-1]:
            windows.append([])
            cost, seen = 0, set()
            add = s.nbytes + text_bytes.get(s.caption_id, 0)
        if not windows:
            windows.append([])
        windows[-1].append(s)
        cost += add
        seen.update((s.sample_id, s.caption_id))
    out, carry = [], {}
    for k, items in enumerate(windows):
        by_bucket: dict[tuple[int, int], list[Sample]] = {}
        for s in items:
            by_bucket.setdefault(s.bucket, []).append(s)
        batches = []
        for bucket in sorted(set(by_bucket) | set(carry)):
            mine = by_bucket.get(bucket, [])
            rng.shuffle(mine)
            mine = carry.pop(bucket, []) + mine
            full = len(mine) // batch_size * batch_size
            if k == len(windows) - 1 and full < len(mine):
                full = -(-len(mine) // batch_size) * batch_size
                mine = [mine[i % len(mine)] for i in range(full)]
            elif full < len(mine):
                carry[bucket] = mine[full:]
            batches.extend(mine[i:i + batch_size] for i in range(0, full, batch_size))
        rng.shuffle(batches)
        out.append(batches)
    return [w for w in out if w] or out[:0]


def batch_plan(samples: list[Sample], batch_size: int, world_size: int, seed: int, epoch: int,
               window_bytes: int | None = None, text_bytes: dict[str, int] | None = None) -> list[list[Sample]]:
    """The global batch list of :func:`epoch_windows`: ``plan[rank::world_size]`` is a rank's batches in order."""
    ranks = [[b for w in wins for b in w]
             for wins in epoch_windows(samples, batch_size, world_size, seed, epoch, window_bytes, text_bytes)]
    return [ranks[r][i] for i in range(len(ranks[0])) for r in range(world_size)] if ranks and ranks[0] else []


def rank_batches(plan: list[list[Sample]], rank: int, world_size: int) -> list[list[Sample]]:
    return plan[rank::world_size]
