"""The training reader on a synthetic cache: window-local plans, streamed batches, bounded memory, S3 faults.

No Ray: the cache is written by the writer's own functions (data/synthetic.py) on local disk or on moto.
"""
from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from flux_ray import storage
from flux_ray.data import cache_read
from flux_ray.data.cache_read import CacheReadError
from flux_ray.data.loader import CacheReader, batch_plan, epoch_windows, rank_batches
from flux_ray.data.prefetch import BatchStream
from flux_ray.data.synthetic import VAE_CONFIG, write_synthetic_cache
from flux_ray.spec import load_spec

BUCKETS = [(128, 128), (96, 160), (160, 96)]


def _spec(cache_uri: str, endpoint: str | None = None, memory_gib: float = 2.0, dropout: float = 0.3):
    return load_spec(data={
        "model": {"pretrained_model_name_or_path": "/nonexistent/tiny", "tokenizer_max_length": 16},
        "datasets": [{"id": "d", "instance_data_dir": "/nonexistent/data", "caption_dropout_probability": dropout}],
        "cache": {"uri": cache_uri, "reader_memory_gib": memory_gib},
        "storage": {"aws_endpoint_url": endpoint}}, check_paths=False)


def _write(spec, n_images=60, n_captions=20):
    return write_synthetic_cache(spec, n_images, BUCKETS, n_captions, rows_per_file=16, pooled_dim=8, embed_dim=32)


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("loader") / "cache")
    return uri, _write(_spec(uri))


def _old_plan(samples, batch_size, world_size, seed, epoch):
    """The global-shuffle plan before windows (format 1 reader), kept as the reference for coverage."""
    rng = random.Random(seed * 1_000_003 + epoch)
    by_bucket = {}
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


def _stream(reader, samples, world, rank, start=0, stop=None, bs=2, seed=3, epoch=0, dropout=0.3):
    windows = reader.plan(samples, bs, world, seed, epoch, prefetch_batches=2)[rank]
    total = sum(len(w) for w in windows)

    def keys(i):
        return torch.Generator().manual_seed(hash((seed, i, rank)) & 0x7FFFFFFF)

    stream = BatchStream(reader, windows, start, total if stop is None else stop, keys, {"d": dropout},
                         torch.device("cpu"), depth=2)
    try:
        return [(tuple(s.sample_id for s in samples), b, g.initial_seed()) for samples, b, g in stream], stream
    finally:
        stream.close()


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("window_bytes", [None, 3000, 40_000])
def test_window_plan_covers_the_old_plans_samples_in_same_bucket_batches(local_cache, world, window_bytes):
    reader = CacheReader(_spec(local_cache[0]), VAE_CONFIG)
    samples, _ = reader.split(0.0)
    text = {c: t.nbytes for c, t in reader.text_rows.items()}
    new = batch_plan(samples, 4, world, 5, 0, window_bytes, text)
    old = _old_plan(samples, 4, world, 5, 0)
    per_rank = [rank_batches(new, r, world) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    assert all(len(b) == 4 and len({s.bucket for s in b}) == 1 for b in new)
    seen_new, seen_old = Counter(s.sample_id for b in new for s in b), Counter(s.sample_id for b in old for s in b)
    assert set(seen_new) == set(seen_old) == {s.sample_id for s in samples}
    # each sample once, plus fills of partial buckets (per rank) and padding: a few batches at most
    assert len(new) - len(old) <= world * len(BUCKETS)
    if window_bytes:
        wins = epoch_windows(samples, 4, world, 5, 0, window_bytes, text)
        assert sum(len(w) for w in wins) > world  # the bound cut the epoch into windows
        # a rank's windows read disjoint rows: no sample of one window reappears in a later one
        for rank_wins in wins:
            owners = {}
            for k, w in enumerate(rank_wins):
                for b in w:
                    for s in b:
                        owners.setdefault(s.sample_id, set()).add(k)
            assert sum(len(v) > 1 for v in owners.values()) <= len(BUCKETS) * 3  # only carried partial batches


def test_streamed_batches_equal_batches_built_on_the_training_thread(local_cache):
    reader = CacheReader(_spec(local_cache[0], memory_gib=40_000 / 2**30), VAE_CONFIG)
    samples, _ = reader.split(0.0)
    got, stream = _stream(reader, samples, 1, 0)
    windows = reader.plan(samples, 2, 1, 3, 0, prefetch_batches=2)[0]
    assert len(windows) > 2
    flat = [b for w in windows for b in w]
    assert [g[0] for g in got] == [tuple(s.sample_id for s in b) for b in flat]
    for i in (0, len(flat) // 2, len(flat) - 1):
        gen = torch.Generator().manual_seed(hash((3, i, 0)) & 0x7FFFFFFF)
        direct = reader.batch(flat[i], gen, {"d": 0.3}, random.Random(gen.initial_seed()))
        assert got[i][1].prior_rows == direct.prior_rows and got[i][1].loss_mask is direct.loss_mask is None
        for a, b in zip(got[i][1].tensors(), direct.tensors(), strict=True):
            assert torch.equal(a, b)
    assert len(stream.wait_s) == len(flat) + 1


def test_resume_mid_epoch_gives_the_same_following_batches(local_cache):
    reader = CacheReader(_spec(local_cache[0], memory_gib=40_000 / 2**30), VAE_CONFIG)
    samples, _ = reader.split(0.0)
    for world, rank in ((1, 0), (2, 1)):
        full, _ = _stream(reader, samples, world, rank)
        resumed, _ = _stream(reader, samples, world, rank, start=7)
        assert [r[0] for r in resumed] == [f[0] for f in full[7:]]
        assert all(torch.equal(a[1].latents, b[1].latents) and torch.equal(a[1].prompt_embeds, b[1].prompt_embeds)
                   for a, b in zip(resumed, full[7:]))


def test_a_cache_larger_than_the_memory_bound_is_read_about_once(local_cache):
    uri, sizes = local_cache
    bound = (sizes["latent_bytes"] + sizes["text_bytes"]) // 6
    reader = CacheReader(_spec(uri, memory_gib=bound / 2**30), VAE_CONFIG)
    samples, _ = reader.split(0.0)
    before = reader.counter.bytes
    got, _ = _stream(reader, samples, 1, 0, dropout=0.0)
    windows = reader.plan(samples, 2, 1, 3, 0, prefetch_batches=2)[0]
    assert len(windows) >= 3 and len(got) == sum(len(w) for w in windows)
    fetched = reader.counter.bytes - before
    assert fetched <= 1.25 * (sizes["latent_bytes"] + sizes["text_bytes"]), fetched


def test_an_old_format_cache_is_refused_naming_its_manifest(tmp_path):
    spec = _spec(str(tmp_path / "cache"))
    sizes = _write(spec, 8, 4)
    mpath = storage.join(sizes["text_uri"], "manifest.json")
    manifest = storage.read_json(mpath)
    storage.write_json_atomic(mpath, dict(manifest, format=1))
    with pytest.raises(ValueError, match=f"{mpath}: cache format 1.*run `flux-ray cache`"):
        CacheReader(spec, VAE_CONFIG)


class _FaultyProxy:
    """HTTP proxy in front of moto: GETs of shard row ranges fail (503, or a reset connection) ``fails`` times
    per distinct request before they pass; paths containing ``always`` fail every time."""

    def __init__(self, upstream: str, fails: int = 2, always: str | None = None):
        host, port = upstream.rsplit("/", 1)[-1].split(":")
        seen, lock, proxy = Counter(), threading.Lock(), self
        self.failed = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = (self.command, self.path, self.headers.get("Range"))
                if self.command == "GET" and "/shards/" in self.path and self.headers.get("Range"):
                    with lock:
                        seen[key] += 1
                        n = seen[key]
                    if (always and self.path.split("?")[0].endswith(always)) or n <= fails:
                        with lock:
                            proxy.failed += 1
                        if n % 2 or always:
                            self.send_response(503)
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                        else:
                            self.close_connection = True
                            self.connection.shutdown(2)
                        return
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but the object's length
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def s3_cache(s3_server):
    uri = "s3://loader-test/cache"
    spec = _spec(uri, s3_server.endpoint)
    _write(spec, 24, 8)
    return uri


def test_transient_s3_faults_are_survived_with_identical_batches(s3_server, s3_cache):
    clean = CacheReader(_spec(s3_cache, s3_server.endpoint, memory_gib=20_000 / 2**30), VAE_CONFIG)
    samples, _ = clean.split(0.0)
    want, _ = _stream(clean, samples, 1, 0)
    proxy = _FaultyProxy(s3_server.endpoint, fails=2)
    try:
        faulty = CacheReader(_spec(s3_cache, proxy.endpoint, memory_gib=20_000 / 2**30), VAE_CONFIG)
        got, _ = _stream(faulty, samples, 1, 0)
    finally:
        proxy.close()
    assert proxy.failed > 10
    assert [g[0] for g in got] == [w[0] for w in want]
    assert all(torch.equal(a[1].latents, b[1].latents) and torch.equal(a[1].prompt_embeds, b[1].prompt_embeds)
               for a, b in zip(got, want))


def test_a_permanent_read_failure_names_the_object(s3_server, s3_cache, monkeypatch):
    # fewer attempts than a run makes (6 SDK tries x 4 reads, ~50 s of backoff), so the test is quick
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    monkeypatch.setattr(cache_read, "READ_ATTEMPTS", 2)
    storage._s3_filesystem.cache_clear()
    reader = CacheReader(_spec(s3_cache, s3_server.endpoint), VAE_CONFIG)
    samples, _ = reader.split(0.0)
    victim = samples[0].shard
    proxy = _FaultyProxy(s3_server.endpoint, fails=0, always=victim.rsplit("/", 1)[-1])
    try:
        bad = CacheReader(_spec(s3_cache, proxy.endpoint), VAE_CONFIG)
        with pytest.raises(CacheReadError, match=f"reading cache object {victim} failed after"):
            _stream(bad, samples, 1, 0)
    finally:
        proxy.close()
        storage._s3_filesystem.cache_clear()
