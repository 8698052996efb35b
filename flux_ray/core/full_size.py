"""FLUX.1-dev-sized components with random weights, for speed work without downloading anything.

The configs are FLUX.1-dev's (transformer, VAE, CLIP-L, T5-XXL). ``write_random_flux`` saves them in
diffusers layout, so the trainer and the cache load them through the same ``from_pretrained`` calls as
the real model. Tokenizers are the tiny model's character-level ones (ids fit the real vocabularies;
padding gives the real 77 / 512 lengths). Speed does not depend on weight values.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from flux_ray.core.model import FLUX_DEV_TRANSFORMER
from flux_ray.core.tiny import FLUX_SCHEDULER, _clip_tokenizer, _t5_tokenizer

FLUX_DEV_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.3611,
                    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
              vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
CLIP_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")


def build_on(ctor, device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """``ctor()`` with its parameters created directly on ``device`` in ``dtype`` (no host copy)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = ctor()
    finally:
        torch.set_default_dtype(prev)
    return module.eval().requires_grad_(False)


FULL_SIZE = {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_DEV_VAE, "text_encoder": CLIP_L,
             "text_encoder_2": T5_XXL}


def build_component(name: str, config: dict, device, dtype=torch.bfloat16) -> torch.nn.Module:
    """One Flux component (diffusers/transformers class by pipeline folder name) with random weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if name == "text_encoder":
        tok = _clip_tokenizer()
        cfg = CLIPTextConfig(**{"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                "pad_token_id": tok.pad_token_id, **config})
        return build_on(lambda: CLIPTextModel(cfg), device, dtype)
    ctor = {"transformer": lambda: FluxTransformer2DModel(**config), "vae": lambda: AutoencoderKL(**config),
            "text_encoder_2": lambda: T5EncoderModel(T5Config(**config))}[name]
    return build_on(ctor, device, dtype)


def write_random_flux(directory: str | os.PathLike, device: str = "cuda", seed: int = 0,
                      configs: dict | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a random Flux (FLUX.1-dev sizes unless ``configs`` overrides; ~34 GB in bf16) in diffusers
    layout, atomically; a no-op if a model is already there."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = Path(directory).expanduser().resolve()
    if (out / "model_index.json").exists():
        return out
    configs = {**FULL_SIZE, **(configs or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".random-flux-", dir=out.parent))
    torch.manual_seed(seed)
    try:
        for name in ("transformer", "text_encoder_2", "text_encoder", "vae"):  # one at a time: build, save, free
            module = build_component(name, configs[name], device, dtype)
            module.save_pretrained(tmp / name, safe_serialization=True, max_shard_size="10GB")
            del module
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        _clip_tokenizer().save_pretrained(tmp / "tokenizer")
        _t5_tokenizer().save_pretrained(tmp / "tokenizer_2")
        FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).save_pretrained(tmp / "scheduler")
        _write_model_index(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_model_index(path: Path) -> None:
    import json

    import diffusers

    index = {"_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5Tokenizer"],
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
