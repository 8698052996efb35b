"""Training ingest from an S3 cache (moto over HTTP): the format-1 reader against the windowed stream.

Writes a synthetic cache through the project's writer (data/synthetic.py -> data/cache.py's write_shard
and _commit) to a moto server this script starts on 127.0.0.1, then runs one epoch per configuration
in 1 or 2 worker processes (ranks of one node), each with its own reader:

- ``old``: the format-1 reader (a copy of its CacheReader below: whole shards into a 16-shard LRU,
  batches built on the consumer thread, global shuffle plan);
- ``new``: data/loader.py's windowed plan served by data/prefetch.py's BatchStream.

Per configuration: samples/s per worker and per node (consumer taking 0 ms), read amplification
(bytes the readers asked storage for / bytes of the cache's shards), peak RSS per worker, and the
wait per batch on the consumer thread when the consumer takes ``--consumer-ms`` per batch. The old
reader can be capped (``--old-max-s``): its rates are then over the batches it reached, and its
amplification is scaled to a whole epoch.

usage: python bench/ingest_bench.py                       # full size: 5000 images 512 px, 1000 T5 captions
       python bench/ingest_bench.py --images 400 --captions 80 --seq 64   # a quick run
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict

import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flux_ray import storage  # noqa: E402
from flux_ray.data.cache_layout import bytes_to_tensor  # noqa: E402
from flux_ray.data.loader import EMPTY_CAPTION_ID, CacheReader, Sample  # noqa: E402
from flux_ray.data.prefetch import PREFETCH_BATCHES, BatchStream  # noqa: E402
from flux_ray.data.synthetic import VAE_CONFIG, write_synthetic_cache  # noqa: E402
from flux_ray.spec import load_spec  # noqa: E402

BUCKETS_512 = [(512, 512), (448, 576), (576, 448), (384, 640)]
DROPOUT = {"bench": 0.1}


def make_spec(uri: str, endpoint: str, seq: int, memory_gib: float):
    return load_spec(data={
        "model": {"pretrained_model_name_or_path": "/nonexistent/model", "tokenizer_max_length": seq},
        "datasets": [{"id": "bench", "instance_data_dir": "/nonexistent/data", "caption_dropout_probability": 0.1}],
        "cache": {"uri": uri, "reader_memory_gib": memory_gib},
        "storage": {"aws_endpoint_url": endpoint}}, check_paths=False)


class OldReader(CacheReader):
    """The format-1 reader's read path: whole shards, decoded to Python bytes, in a 16-shard LRU."""

    def __init__(self, spec, vae_config, max_open_shards: int = 16):
        super().__init__(spec, vae_config)
        self._shards: OrderedDict[str, dict] = OrderedDict()
        self._max_open = max_open_shards

    def _table(self, uri: str) -> dict:
        if uri in self._shards:
            self._shards.move_to_end(uri)
            return self._shards[uri]
        fs, path = storage.resolve(uri, self.st)
        tbl = pq.read_table(path, filesystem=fs).to_pydict()
        self.counter.add(fs.get_file_info(path).size)
        self._shards[uri] = tbl
        while len(self._shards) > self._max_open:
            self._shards.popitem(last=False)
        return tbl

    def old_batch(self, samples, generator, caption_dropout, rng):
        from flux_ray.core.flow import normalize_latents
        from flux_ray.core.step import FluxBatch
        lat, emb, pooled, mask = [], [], [], []
        for s in samples:
            t = self._table(s.shard)
            shape = (16, t["latent_h"][s.row], t["latent_w"][s.row])
            mean = bytes_to_tensor(t["latent_mean"][s.row], self.latent_dtype, shape).float()
            std = bytes_to_tensor(t["latent_std"][s.row], self.latent_dtype, shape).float()
            lat.append(normalize_latents(mean + std * torch.randn(shape, generator=generator),
                                         *self.latent_norm[s.dataset_id]))
            cid = s.caption_id
            if rng.random() < caption_dropout.get(s.dataset_id, 0.0):
                cid = EMPTY_CAPTION_ID
            tr = self.text_rows[cid]
            t = self._table(tr.shard)
            emb.append(bytes_to_tensor(t["prompt_embeds"][tr.row], self.text_dtype, (tr.seq_len, tr.embed_dim)).float())
            pooled.append(bytes_to_tensor(t["pooled"][tr.row], self.text_dtype, (tr.pooled_dim,)).float())
            mask.append(torch.frombuffer(bytearray(t["text_mask"][tr.row]), dtype=torch.int8).clone())
        return FluxBatch(torch.stack(lat), torch.stack(emb), torch.stack(pooled), torch.stack(mask))


def old_plan(samples: list[Sample], batch_size: int, world_size: int, seed: int, epoch: int):
    """The format-1 global-shuffle plan (git show 14fc4a3:flux_ray/data/loader.py)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    by_bucket: dict = {}
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
    batches += [batches[i % len(batches)] for i in range(-len(batches) % world_size)]
    return batches


def _gen(seed: int, i: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, i, rank, 0)) & 0x7FFFFFFFFFFF)


def run_worker(args, kind: str, rank: int, world: int, consumer_ms: float, out) -> None:
    torch.set_num_threads(1)
    spec = make_spec(args.uri, args.endpoint, args.seq, args.memory_gib)
    t_init = time.perf_counter()
    reader = (OldReader if kind == "old" else CacheReader)(spec, VAE_CONFIG)
    samples, _ = reader.split(0.0)
    init_s, index_bytes = time.perf_counter() - t_init, reader.counter.bytes
    waits, n_samples, t0 = [], 0, time.perf_counter()
    deadline = t0 + (args.old_max_s if kind == "old" and args.old_max_s else 1e12)
    if kind == "old":
        plan = old_plan(samples, args.bs, world, 0, 0)[rank::world]
        total = len(plan)
        for i, batch_samples in enumerate(plan):
            if time.perf_counter() > deadline:
                break
            tw = time.perf_counter()
            gen = _gen(0, i, rank)
            reader.old_batch(batch_samples, gen, DROPOUT, random.Random(gen.initial_seed()))
            waits.append(time.perf_counter() - tw)
            n_samples += len(batch_samples)
            time.sleep(consumer_ms / 1000)
        done = len(waits)
    else:
        windows = reader.plan(samples, args.bs, world, 0, 0, PREFETCH_BATCHES)[rank]
        total = sum(len(w) for w in windows)
        stream = BatchStream(reader, windows, 0, total, lambda i: _gen(0, i, rank), DROPOUT, torch.device("cpu"))
        for batch_samples, _, _ in stream:
            n_samples += len(batch_samples)
            time.sleep(consumer_ms / 1000)
        stream.close()
        waits, done = stream.wait_s[:-1], len(stream.wait_s) - 1
    wall = time.perf_counter() - t0
    out.put({"rank": rank, "samples": n_samples, "wall": wall, "init_s": init_s, "batches": done, "total": total,
             "bytes": reader.counter.bytes - index_bytes, "index_bytes": index_bytes,
             "wait_ms": 1000 * sum(waits[1:]) / max(1, len(waits) - 1), "first_wait_s": waits[0] if waits else 0,
             "rss_gib": peak_rss_gib()})


def peak_rss_gib() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would carry the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def run_config(args, kind: str, world: int, consumer_ms: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=run_worker, args=(args, kind, r, world, consumer_ms, out)) for r in range(world)]
    for p in procs:
        p.start()
    res = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sorted(res, key=lambda r: r["rank"])


def start_moto(tmp: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TMPDIR=tmp)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    import urllib.request
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise RuntimeError("moto did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions", type=int, default=1000)
    p.add_argument("--seq", type=int, default=512, help="T5 tokens")
    p.add_argument("--embed-dim", type=int, default=4096)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--readers", nargs="+", default=["old", "new"])
    p.add_argument("--consumer-ms", type=float, default=100.0)
    p.add_argument("--memory-gib", type=float, default=1.0, help="cache.reader_memory_gib (the spec default)")
    p.add_argument("--old-max-s", type=float, default=0, help="cap an old-reader run (0: whole epoch)")
    args = p.parse_args()
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost"}.items():
        os.environ[k] = v
    tmp = tempfile.mkdtemp(prefix="ingest_bench_", dir="/tmp")
    moto, args.endpoint = start_moto(tmp)
    args.uri = "s3://ingest-bench/cache"
    try:
        t = time.perf_counter()
        sizes = write_synthetic_cache(make_spec(args.uri, args.endpoint, args.seq, args.memory_gib), args.images,
                                      BUCKETS_512, args.captions, embed_dim=args.embed_dim, random_bytes=True)
        cache_bytes = sizes["latent_bytes"] + sizes["text_bytes"]
        print(f"cache: {args.images} images, {args.captions} captions, latents {sizes['latent_bytes'] / 2**30:.2f} "
              f"GiB, text {sizes['text_bytes'] / 2**30:.2f} GiB, written in {time.perf_counter() - t:.0f} s", flush=True)
        rows = []
        for kind in args.readers:
            for world in args.workers:
                fast = run_config(args, kind, world, 0.0)
                slow = run_config(args, kind, world, args.consumer_ms)
                frac = sum(r["batches"] for r in fast) / sum(r["total"] for r in fast)
                row = {"reader": kind, "workers": world, "epoch_done": frac,
                       "sps_worker": sum(r["samples"] / r["wall"] for r in fast) / world,
                       "sps_node": sum(r["samples"] for r in fast) / max(r["wall"] for r in fast),
                       "amplification": sum(r["bytes"] for r in fast) / frac / cache_bytes,
                       "rss_gib": max(r["rss_gib"] for r in fast + slow),
                       "wait_ms": sum(r["wait_ms"] for r in slow) / world,
                       "first_wait_s": max(r["first_wait_s"] for r in slow),
                       "init_s": max(r["init_s"] for r in fast)}
                rows.append(row)
                print(row, flush=True)
        print(f"\n| reader | workers | epoch run | samples/s per worker | samples/s per node | read amplification "
              f"| peak RSS per worker (GiB) | wait per batch at {args.consumer_ms:.0f} ms (ms) | first batch (s) "
              f"| index load (s) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['reader']} | {r['workers']} | {r['epoch_done']:.0%} | {r['sps_worker']:.1f} | "
                  f"{r['sps_node']:.1f} | {r['amplification']:.2f} | {r['rss_gib']:.2f} | {r['wait_ms']:.2f} | "
                  f"{r['first_wait_s']:.2f} | {r['init_s']:.1f} |")
    finally:
        moto.terminate()
        moto.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
