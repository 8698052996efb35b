"""Ray-free callables for the cache pipeline's encode stages: VAE encode, text encode (decode+crop is data/decode.py).

Each is a class that loads what it needs in ``__init__`` and maps ``dict[str, ndarray] -> dict``
batches, so Ray Data runs it on an actor pool and tests call it directly.

What is stored from the VAE: the latent distribution's mean and std (not one sample), in the cache
dtype (bf16 by default), so each epoch draws a fresh sample ``mean + std * eps`` exactly as
encoding the image again would, at the cost of 2x the bytes of a single sample.
"""
from __future__ import annotations

import numpy as np
import torch

from flux_ray.core.model import DTYPES
from flux_ray.data.cache_layout import tensor_to_bytes
from flux_ray.families import DEFAULT_FAMILY, ModelFamily, get_family


def pick_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


class VaeEncoder:
    """Encodes same-bucket groups of a batch with the VAE, ``batch_size`` images at a time (None: a whole
    group); stores mean and std bytes.

    Pixels arrive as uint8 (or float in [-1, 1]); on a GPU they are copied from pinned memory and
    normalised there, and each VAE batch's mean/std come back to the host in one copy.
    """

    def __init__(self, model_spec, latent_dtype: str = "bf16", use_gpu: bool = False, channels_last: bool = False,
                 compile_backend: str | None = None, batch_size: int | None = None, storage=None):
        from flux_ray.node_cache import localize_model

        model_spec = localize_model(model_spec, storage)  # an s3:// model: fetched once per node

        self.device = pick_device(use_gpu)
        compute = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        vae = get_family(model_spec.model_family).load_vae(model_spec, dtype=compute, device=self.device)
        self.use(vae, compute, DTYPES[latent_dtype], channels_last, compile_backend, batch_size)

    def use(self, vae, compute: torch.dtype, latent_dtype: torch.dtype, channels_last: bool = False,
            compile_backend: str | None = None, batch_size: int | None = None) -> None:
        """Take a loaded VAE (``__init__``'s, or one built in memory by bench/cache_bench.py).

        ``compile_backend`` (e.g. "inductor") compiles the encoder with symbolic batch, height and width: one
        graph serves every bucket and chunk size (bench/RESULTS.md, call 18: as fast as one graph per shape)."""
        self.vae, self.compute, self.dtype, self.batch_size = vae, compute, latent_dtype, batch_size
        self.channels_last = channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.vae.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one conv plan per batch shape, reused for every batch
        self.compiled = bool(compile_backend)
        if compile_backend:
            self.vae.encoder = torch.compile(self.vae.encoder, backend=compile_backend, dynamic=True)

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        n = len(batch["sample_id"])
        means, stds = [b""] * n, [b""] * n
        lat_h, lat_w = np.zeros(n, np.int32), np.zeros(n, np.int32)
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(n):
            if not batch["skip_reason"][i]:
                groups.setdefault((int(batch["bucket_w"][i]), int(batch["bucket_h"][i])), []).append(i)
        step = self.batch_size or n
        for (w, h), group in groups.items():
            for idx in (group[k:k + step] for k in range(0, len(group), step)):
                self._encode(batch, idx, h, w, means, stds, lat_h, lat_w)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out.update(latent_mean=np.array(means, dtype=object), latent_std=np.array(stds, dtype=object),
                   latent_h=lat_h, latent_w=lat_w)
        return out

    def _pixels(self, batch: dict, idx: list[int], h: int, w: int) -> torch.Tensor:
        px = torch.from_numpy(np.stack([np.asarray(batch["pixels"][i]).reshape(3, h, w) for i in idx]))
        if self.device.type == "cuda":
            px = px.pin_memory().to(self.device, non_blocking=True)
        if px.dtype == torch.uint8:
            px = px.float() / 127.5 - 1.0  # == decode.normalize_pixels, on the device
        px = px.to(self.compute)
        return px.contiguous(memory_format=torch.channels_last) if self.channels_last else px

    def _encode(self, batch: dict, idx: list[int], h: int, w: int, means: list, stds: list, lat_h, lat_w) -> None:
        """One VAE batch: rows ``idx`` of ``batch`` (one bucket, h x w); fills their outputs in place."""
        px = self._pixels(batch, idx, h, w)
        if self.compiled:
            one = px.shape[0] == 1  # dynamo specialises a size of 1: a one-image chunk runs as two
            with _symbolic_sizes():
                dist = self.vae.encode(torch.cat([px, px]) if one else px).latent_dist
            dist = type(dist)(dist.parameters[:1]) if one else dist
        else:
            dist = self.vae.encode(px).latent_dist
        mean = dist.mean.to("cpu", self.dtype).contiguous()
        std = dist.std.to("cpu", self.dtype).contiguous()
        for j, i in enumerate(idx):
            means[i], stds[i] = tensor_to_bytes(mean[j], self.dtype), tensor_to_bytes(std[j], self.dtype)
            lat_h[i], lat_w[i] = mean.shape[2], mean.shape[3]


def _symbolic_sizes():
    """Dynamo's duck sizing gives equal sizes one symbol: a square first bucket would pin height == width."""
    from torch.fx.experimental import _config as fx_config

    return fx_config.patch(use_duck_shape=False)


class TextEncoder:
    """The family's text embeddings for unique captions (FLUX.1: CLIP pooled + T5 sequence and the T5 mask;
    FLUX.2: stacked text-encoder layers and the mask, no pooled embedding: stored zero-width)."""

    def __init__(self, model_spec, embed_dtype: str = "bf16", use_gpu: bool = False,
                 compile_backend: str | None = None, storage=None):
        from flux_ray.node_cache import localize_model

        model_spec = localize_model(model_spec, storage)  # an s3:// model: fetched once per node

        self.device = pick_device(use_gpu)
        compute = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        family = get_family(model_spec.model_family)
        self.use_encoders(family.load_text_encoders(model_spec, dtype=compute, device=self.device),
                          model_spec.t5_max_length, DTYPES[embed_dtype], compile_backend, family=family)

    def use(self, tok, clip, tok2, t5, max_len: int, embed_dtype: torch.dtype,
            compile_backend: str | None = None, family: ModelFamily | None = None) -> None:
        """Take FLUX.1's loaded tokenizers and encoders (ones built in memory by bench/cache_bench.py)."""
        self.use_encoders((tok, clip, tok2, t5), max_len, embed_dtype, compile_backend, family)

    def use_encoders(self, encoders: tuple, max_len: int, embed_dtype: torch.dtype,
                     compile_backend: str | None = None, family: ModelFamily | None = None) -> None:
        """Take the family's loaded encoders (``load_text_encoders``); ``family`` embeds with them (default:
        FLUX.1's CLIP + T5). ``compile_backend`` compiles the last encoder (FLUX.1's T5: one padded shape)."""
        self.encoders, self.max_len, self.dtype = tuple(encoders), max_len, embed_dtype
        self.family = family or get_family(DEFAULT_FAMILY)
        if compile_backend:
            self.encoders = (*self.encoders[:-1], torch.compile(self.encoders[-1], backend=compile_backend))

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        captions = [str(c) for c in batch["caption"]]
        text = self.family.embed_text(self.encoders, captions, self.max_len, self.device)
        n = len(captions)
        embeds = text["prompt_embeds"].to("cpu", self.dtype)
        pooled = text["pooled"].to("cpu", self.dtype) if "pooled" in text else embeds.new_zeros(n, 0)
        mask = text["text_mask"].cpu()
        return {"caption_id": np.asarray(batch["caption_id"]), "caption": np.asarray(captions, dtype=object),
                "prompt_embeds": np.array([tensor_to_bytes(embeds[i], self.dtype) for i in range(n)], dtype=object),
                "pooled": np.array([tensor_to_bytes(pooled[i], self.dtype) for i in range(n)], dtype=object),
                "text_mask": np.array([mask[i].numpy().tobytes() for i in range(n)],
                                      dtype=object),
                "seq_len": np.full(n, embeds.shape[1], np.int32), "embed_dim": np.full(n, embeds.shape[2], np.int32),
                "pooled_dim": np.full(n, pooled.shape[1], np.int32)}
