"""The cache actors' callables, called directly (Ray Data runs the same objects on its actor pools)."""
import numpy as np
import torch

from flux_ray.data.encoders import TextEncoder, VaeEncoder
from flux_ray.spec import ModelSpec


def _vae_batch(n: int, size: int) -> dict:
    rng = np.random.default_rng(0)
    return {"sample_id": np.array([f"{i:08x}" for i in range(n)], dtype=object),
            "skip_reason": np.array([""] * (n - 1) + ["too_small"], dtype=object),
            "bucket_w": np.full(n, size, np.int32), "bucket_h": np.full(n, size, np.int32),
            "pixels": rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)}


def _mixed_batch(sizes, seed=2) -> dict:
    rng = np.random.default_rng(seed)
    return {"sample_id": np.array([f"{i:08x}" for i in range(len(sizes))], dtype=object),
            "skip_reason": np.array([""] * len(sizes), dtype=object),
            "bucket_w": np.array([w for w, _ in sizes], np.int32), "bucket_h": np.array([h for _, h in sizes], np.int32),
            "pixels": np.array([rng.integers(0, 256, 3 * w * h, dtype=np.uint8) for w, h in sizes], dtype=object)}


def test_compiled_encoders_store_what_eager_ones_do(tiny_model_dir):
    """cache.compile_encoders' path (here with the aot_eager backend: the same dynamo capture as inductor,
    without a CPU C++ compile) changes how the encoders run, not what they store."""
    spec = ModelSpec(model_flavour="dev", pretrained_model_name_or_path=tiny_model_dir, tokenizer_max_length=32)
    torch._dynamo.reset()
    batch = _vae_batch(3, 64)
    eager = VaeEncoder(spec, latent_dtype="fp32")(batch)
    compiled_vae = VaeEncoder(spec, latent_dtype="fp32", compile_backend="aot_eager")
    assert hasattr(compiled_vae.vae.encoder, "_orig_mod")
    compiled = compiled_vae(batch)
    assert eager["latent_mean"][2] == b"" and compiled["latent_mean"][2] == b""  # the skip row stays empty
    for k in ("latent_mean", "latent_std"):
        for a, b in zip(eager[k][:2], compiled[k][:2]):
            np.testing.assert_allclose(np.frombuffer(a, np.float32), np.frombuffer(b, np.float32), rtol=1e-5, atol=1e-6)
    captions = {"caption_id": np.array(["a", "b"], dtype=object),
                "caption": np.array(["a red circle", ""], dtype=object)}
    text_eager = TextEncoder(spec, embed_dtype="fp32")(captions)
    text_compiled = TextEncoder(spec, embed_dtype="fp32", compile_backend="aot_eager")(captions)
    for k in ("prompt_embeds", "pooled", "text_mask"):
        for a, b in zip(text_eager[k], text_compiled[k]):
            np.testing.assert_allclose(np.frombuffer(a, np.float32 if k != "text_mask" else np.int8),
                                       np.frombuffer(b, np.float32 if k != "text_mask" else np.int8),
                                       rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_compile_encoders_applies_on_gpu_only():
    from flux_ray.spec import CacheSpec

    assert CacheSpec(compile_encoders=True).encoder_compile_backend(use_gpu=True) == "inductor"
    assert CacheSpec(compile_encoders=True).encoder_compile_backend(use_gpu=False) is None
    assert CacheSpec().encoder_compile_backend(use_gpu=True) is None
    # T5 compiles only for enough captions to repay the compile (an instance prompt is one caption)
    assert CacheSpec(compile_encoders=True).text_compile_backend(use_gpu=True, captions=2) is None
    assert CacheSpec(compile_encoders=True).text_compile_backend(use_gpu=True, captions=5000) == "inductor"
    assert CacheSpec(compile_encoders=True).text_compile_backend(use_gpu=False, captions=5000) is None


def test_vae_encodes_each_bucket_in_batches_of_batch_size(tiny_model_dir):
    """A Ray Data batch (vae_batch_size x vae_bucket_window rows) of mixed buckets: each bucket's rows go
    through the VAE batch_size at a time, and every row gets its own latents back in its own place."""
    spec = ModelSpec(model_flavour="dev", pretrained_model_name_or_path=tiny_model_dir)
    sizes = [(64, 64), (64, 32), (64, 64), (64, 64), (64, 32), (64, 64), (64, 64)]  # 5 of one bucket, 2 of another
    batch = _mixed_batch(sizes, seed=1)
    enc = VaeEncoder(spec, latent_dtype="fp32", batch_size=2)
    calls = []
    enc.vae.encoder.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape[:1] + args[0].shape[2:])))
    out = enc(batch)
    assert calls == [(2, 64, 64), (2, 64, 64), (1, 64, 64), (2, 32, 64)]
    one_by_one = VaeEncoder(spec, latent_dtype="fp32", batch_size=1)
    for i, (w, h) in enumerate(sizes):
        assert (out["latent_w"][i], out["latent_h"][i]) == (w // 8, h // 8)
        alone = one_by_one({k: v[i:i + 1] for k, v in batch.items()})
        np.testing.assert_allclose(np.frombuffer(out["latent_mean"][i], np.float32),
                                   np.frombuffer(alone["latent_mean"][0], np.float32), rtol=1e-4, atol=1e-5)


def test_compiled_vae_is_one_graph_for_every_bucket_and_chunk_size(tiny_model_dir):
    """cache.compile_encoders compiles the VAE once per actor: square and non-square buckets and chunks of 1..3
    images (a one-image chunk runs as two) reuse one graph with symbolic sizes, and give eager's latents."""
    spec = ModelSpec(model_flavour="dev", pretrained_model_name_or_path=tiny_model_dir)
    sizes = [(64, 64)] * 3 + [(64, 32)] * 2 + [(32, 64)] + [(64, 64)]  # chunks of 3: sizes 3, 2, 1 and 1
    batch = _mixed_batch(sizes)
    eager = VaeEncoder(spec, latent_dtype="fp32", batch_size=3)(batch)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = VaeEncoder(spec, latent_dtype="fp32", batch_size=3, compile_backend="aot_eager")
    outs = [compiled(batch), compiled(batch), compiled({k: v[4:6] for k, v in batch.items()})]  # then chunks of 1, 1
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    for out in outs[:2]:
        for i in range(len(sizes)):
            np.testing.assert_allclose(np.frombuffer(out["latent_mean"][i], np.float32),
                                       np.frombuffer(eager["latent_mean"][i], np.float32), rtol=1e-5, atol=1e-6)
            assert out["latent_h"][i] == sizes[i][1] // 8 and out["latent_w"][i] == sizes[i][0] // 8
    np.testing.assert_allclose(np.frombuffer(outs[2]["latent_std"][1], np.float32),
                               np.frombuffer(eager["latent_std"][5], np.float32), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
