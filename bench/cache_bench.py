"""Cache-encode throughput of flux_ray's own encoder callables at full size, on one GPU, without Ray.

Builds the FLUX.1-dev VAE, T5-XXL and CLIP-L from their configs with random bf16 weights on the GPU
(speed does not depend on weight values; nothing is downloaded) and times ``data/encoders.py``'s
``VaeEncoder`` and ``TextEncoder`` ``__call__`` on Ray Data-shaped batches (dict of numpy columns: fp32
pixels in, latent mean/std and embedding bytes out). Their ``__init__`` loads through ``from_pretrained``,
which needs a saved model, so this sets the loaded attributes directly. Tokenizers are the tiny
model's character-level ones, padded to the same lengths (77 CLIP, 512 T5 tokens), so the encoders
see full-length sequences. Ray Data itself is left out: its wheel does not fit the device carry
limit beside the others, so this times the GPU part of the pipeline.

Run the stock baseline (stock_cache_encode.py) in the same call for the ratio.

End to end, one GPU doing both stages for images with unique captions, the rate is
``1 / (1/vae_rate + 1/text_rate)``.

usage: python bench/cache_bench.py [--res 1024] [--vae-bs 8] [--text-bs 32] [--channels-last 0 1] [--compile 0 1]
       python bench/cache_bench.py --mix eager compiled --vae-bs 16 --channels-last 1   # cold start
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from flux_ray.core.full_size import CLIP_L, FLUX_DEV_VAE, T5_XXL, build_component  # noqa: E402


def timed(fn, sync, reps=5):
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def vae_encoder(device, dtype, channels_last=False, compile_backend=None, batch_size=None):
    from flux_ray.data.encoders import VaeEncoder

    enc = VaeEncoder.__new__(VaeEncoder)  # __init__ would load from_pretrained; use() takes a built VAE
    enc.device = device
    enc.use(build_component("vae", FLUX_DEV_VAE, device, dtype), dtype, torch.bfloat16, channels_last,
            compile_backend, batch_size)
    return enc


def text_encoder(device, dtype, compile_backend=None):
    from flux_ray.core.tiny import _clip_tokenizer, _t5_tokenizer
    from flux_ray.data.encoders import TextEncoder

    enc = TextEncoder.__new__(TextEncoder)  # __init__ would load from_pretrained; use() takes built encoders
    enc.device = device
    enc.use(_clip_tokenizer(), build_component("text_encoder", CLIP_L, device, dtype), _t5_tokenizer(),
            build_component("text_encoder_2", T5_XXL, device, dtype), 512, torch.bfloat16, compile_backend)
    return enc


def vae_batch(n, res, rng):
    return {"sample_id": np.array([f"{i:08x}" for i in range(n)], dtype=object),
            "skip_reason": np.array([""] * n, dtype=object),
            "bucket_w": np.full(n, res, np.int32), "bucket_h": np.full(n, res, np.int32),
            "pixels": rng.integers(0, 256, (n, 3 * res * res), dtype=np.uint8)}  # as DecodeAndCrop emits


def mixed_batch(n, sizes, rng):
    """A Ray Data batch as the cache's VAE actors get it: n rows spread at random over bucket ``sizes``."""
    pick = [sizes[i] for i in rng.integers(0, len(sizes), n)]
    return {"sample_id": np.array([f"{i:08x}" for i in range(n)], dtype=object),
            "skip_reason": np.array([""] * n, dtype=object),
            "bucket_w": np.array([w for w, _ in pick], np.int32), "bucket_h": np.array([h for _, h in pick], np.int32),
            "pixels": np.array([rng.integers(0, 256, 3 * w * h, dtype=np.uint8) for w, h in pick], dtype=object)}


def bucket_mix(a, device, dtype, sync, rng) -> None:
    """Cold start to steady state of one VAE actor fed --mix-batches mixed-bucket batches (vae_bs x window rows
    over the 4 buckets of bench/ray_gpu_bench.py): seconds for the warm-up batches (compiles included) and
    images/s after them, eager and compiled."""
    sizes = [(w * a.res // 1024 // 64 * 64, h * a.res // 1024 // 64 * 64)
             for w, h in [(1024, 1024), (1216, 832), (832, 1216), (1536, 1024)]]
    for name in a.mix:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        t0 = time.perf_counter()
        enc = vae_encoder(device, dtype, channels_last=bool(a.channels_last[-1]),
                          compile_backend="inductor" if name == "compiled" else None, batch_size=a.vae_bs[0])
        sync()
        load_s = time.perf_counter() - t0
        batches = [mixed_batch(a.vae_bs[0] * a.window, sizes, rng) for _ in range(4)]
        times = []
        for i in range(a.mix_batches):
            t = time.perf_counter()
            enc(batches[i % len(batches)])
            sync()
            times.append(time.perf_counter() - t)
        warm, n = a.mix_warmup, a.vae_bs[0] * a.window
        print(json.dumps(dict(stage="ours_vae_bucket_mix", variant=name, res=a.res, vae_bs=a.vae_bs[0], window=a.window,
                              build_s=round(load_s, 1), warmup_batches=warm, warmup_s=round(sum(times[:warm]), 1),
                              warmup_images_per_s=round(n * warm / sum(times[:warm]), 1),
                              first_batch_s=round(times[0], 1),
                              steady_images_per_s=round(n * (len(times) - warm) / sum(times[warm:]), 1),
                              slowest_steady_batch_s=round(max(times[warm:]), 2),
                              graphs=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))), flush=True)
        del enc
        if device.type == "cuda":
            torch.cuda.empty_cache()


def text_batch(n):
    caps = [f"a photo of subject {i} standing in a sunlit garden, detailed, {i % 7} flowers" for i in range(n)]
    return {"caption_id": np.array([f"{i:08x}" for i in range(n)], dtype=object),
            "caption": np.array(caps, dtype=object)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--vae-bs", type=int, nargs="+", default=[8])
    ap.add_argument("--text-bs", type=int, nargs="+", default=[32])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--channels-last", type=int, nargs="+", default=[0], help="VAE memory format variants (0/1)")
    ap.add_argument("--compile", type=int, nargs="+", default=[0],
                    help="variants: 0 eager, 1 torch.compile (inductor) the VAE encoder / T5 (cache.compile_encoders)")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--mix", nargs="*", default=[], choices=["eager", "compiled"],
                    help="bucket-mix variants: cold start to steady state on mixed-bucket batches (then exits)")
    ap.add_argument("--mix-batches", type=int, default=24)
    ap.add_argument("--mix-warmup", type=int, default=8)
    ap.add_argument("--window", type=int, default=4, help="cache.vae_bucket_window for --mix")
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    if a.mix:
        return bucket_mix(a, device, dtype, sync, rng)
    rates = {}
    for cl, comp in [(cl, comp) for comp in a.compile for cl in a.channels_last]:
        enc = vae_encoder(device, dtype, channels_last=bool(cl), compile_backend="inductor" if comp else None)
        for bs in a.vae_bs:
            batch = vae_batch(bs, a.res, rng)
            t0 = time.perf_counter()
            t = timed(lambda: enc(batch), sync, a.reps)
            rates["vae"] = max(rates.get("vae", 0), bs / t)
            print(json.dumps(dict(stage="ours_vae_encoder", res=a.res, bs=bs, channels_last=cl, compile=comp,
                                  s=round(t, 4), first_s=round(time.perf_counter() - t0 - t * a.reps, 1),
                                  images_per_s=round(bs / t, 1),
                                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda"
                                  else None)), flush=True)
        del enc
    if a.skip_text:
        return
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for comp in a.compile:
        enc = text_encoder(device, dtype, compile_backend="inductor" if comp else None)
        for bs in a.text_bs:
            batch = text_batch(bs)
            t0 = time.perf_counter()
            t = timed(lambda: enc(batch), sync, a.reps)
            rates["text"] = max(rates.get("text", 0), bs / t)
            print(json.dumps(dict(stage="ours_text_encoder", t5_tokens=512, bs=bs, compile=comp, s=round(t, 4),
                                  first_s=round(time.perf_counter() - t0 - t * a.reps, 1),
                                  captions_per_s=round(bs / t, 1))), flush=True)
        del enc
        if device.type == "cuda":
            torch.cuda.empty_cache()
    both = 1 / (1 / rates["vae"] + 1 / rates["text"])
    print(json.dumps(dict(stage="ours_end_to_end_one_gpu", res=a.res, images_per_s=round(both, 1),
                          note="unique caption per image; VAE and text encoders in turn on one GPU")), flush=True)


if __name__ == "__main__":
    main()
