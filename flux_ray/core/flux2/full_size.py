"""Full-size FLUX.2 components with random weights, for GPU speed work without downloading anything.

Configs are the published ones (``flavours``). ``write_random_flux2`` builds one component at a time
directly on ``device`` (no host copy), saves it in diffusers layout and frees it, so a GPU with room
for the largest single component suffices ([dev]: the 24B Mistral text encoder, ~48 GB in bf16).
Tokenizers are the tiny byte-level ones (their ids fit the real vocabularies; padding gives the real
512-token length). Speed does not depend on weight values. ``reduced_text_encoder_config`` is a text
encoder of the same class whose prompt embeddings have the real shape but which is a few GB at most
(for runs that time the transformer, not the text encoder).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from flux_ray.core.flux2.flavours import FLUX2_SCHEDULER, FLUX2_VAE, get_flavour
from flux_ray.core.full_size import build_on

COMPONENTS = ("transformer", "text_encoder", "vae")


def build_component(flavour: str, name: str, device, dtype: torch.dtype = torch.bfloat16,
                    config: dict | None = None) -> torch.nn.Module:
    """One full-size component of ``flavour`` (random weights; ``device="meta"`` allocates nothing).

    ``config`` replaces the published config of that component (the CPU test writes small ones).
    """
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from flux_ray.core.flux2.tiny import build_text_encoder

    fl = get_flavour(flavour)
    if name == "transformer":
        return build_on(lambda: Flux2Transformer2DModel(**(config or fl.transformer)), device, dtype)
    if name == "vae":
        return build_on(lambda: AutoencoderKLFlux2(**(config or FLUX2_VAE)), device, dtype)
    if name == "text_encoder":
        cfg = config or fl.text_encoder
        if fl.text_encoder_kind == "qwen3":
            return build_on(lambda: build_text_encoder("qwen3", cfg["vocab_size"], cfg), device, dtype)
        extra = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config", "image_token_index",
                                                         "spatial_merge_size")}
        return build_on(lambda: _mistral3(cfg, extra), device, dtype)
    raise ValueError(f"unknown FLUX.2 component {name!r}; one of {COMPONENTS}")


def _mistral3(cfg: dict, extra: dict):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(**cfg["text_config"]), vision_config=PixtralVisionConfig(**cfg["vision_config"]),
        image_token_index=cfg["image_token_index"], spatial_merge_size=cfg["spatial_merge_size"], **extra))


def reduced_text_encoder_config(flavour: str, intermediate_size: int = 1024, num_attention_heads: int = 4) -> dict:
    """A text-encoder config for ``build_component(flavour, "text_encoder", config=...)`` that keeps what the
    transformer sees -- the real hidden size (``joint_attention_dim`` = layers stacked x hidden) and one decoder
    layer past the deepest stacked one (what ``text.encode_captions`` runs on the real model) -- but has a
    small MLP, ``num_attention_heads`` heads (one KV head), a vocabulary the size of the byte-level tokenizer
    and, for [dev], the tiny one-layer Pixtral tower. [dev]: ~0.7B parameters (1.5 GB bf16) against 24B.
    Its speed and memory are not the real encoder's."""
    from flux_ray.core.flux2.tiny import TINY_PIXTRAL, mistral_tokenizer, qwen3_tokenizer

    fl = get_flavour(flavour)
    small = dict(intermediate_size=intermediate_size, num_hidden_layers=max(fl.text_encoder_layers) + 1,
                 num_attention_heads=num_attention_heads, num_key_value_heads=1)
    if fl.text_encoder_kind == "qwen3":
        return {**fl.text_encoder, **small, "vocab_size": len(qwen3_tokenizer())}
    tok = mistral_tokenizer()
    return {**fl.text_encoder, "text_config": {**fl.text_encoder["text_config"], **small, "vocab_size": len(tok)},
            "vision_config": dict(TINY_PIXTRAL), "image_token_index": tok.convert_tokens_to_ids("[IMG]")}


def parameter_count(flavour: str, name: str, config: dict | None = None) -> int:
    """Parameters of a full-size component (or of ``config``), counted on the meta device."""
    return sum(p.numel() for p in build_component(flavour, name, "meta", config=config).parameters())


def write_random_flux2(directory: str | os.PathLike, flavour: str = "klein-4b", device: str = "cuda",
                       seed: int = 0, dtype: torch.dtype = torch.bfloat16, configs: dict | None = None) -> Path:
    """Save a random full-size FLUX.2 ``flavour`` in diffusers layout, atomically; a no-op if one is there.

    ``configs`` ({component: config}) replaces published configs (a small CPU test of the layout).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flux_ray.core.flux2.tiny import mistral_tokenizer, qwen3_tokenizer

    fl = get_flavour(flavour)
    out = Path(directory).expanduser().resolve()
    if (out / "model_index.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".random-flux2-", dir=out.parent))
    torch.manual_seed(seed)
    try:
        for name in COMPONENTS:  # one at a time: build, save, free
            module = build_component(flavour, name, device, dtype, (configs or {}).get(name))
            module.save_pretrained(tmp / name, safe_serialization=True, max_shard_size="10GB")
            del module
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        tok = qwen3_tokenizer() if fl.text_encoder_kind == "qwen3" else mistral_tokenizer()
        tok.save_pretrained(tmp / "tokenizer")
        FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(model_index(flavour, type(tok).__name__), indent=2))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_index(flavour: str, tokenizer_class: str) -> dict:
    import diffusers

    fl = get_flavour(flavour)
    text_encoder = "Qwen3ForCausalLM" if fl.text_encoder_kind == "qwen3" else "Mistral3ForConditionalGeneration"
    index = {"_class_name": fl.pipeline_class, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", text_encoder],
             "tokenizer": ["transformers", tokenizer_class], "transformer": ["diffusers", "Flux2Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLFlux2"]}
    if fl.pipeline_class == "Flux2KleinPipeline":
        index["is_distilled"] = False  # the base checkpoints (the ones to train on) use real CFG
    return index
