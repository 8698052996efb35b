"""Loading Flux components through ``from_pretrained`` (hub id or local diffusers folder).

The same calls load black-forest-labs/FLUX.1-dev and the tiny generated model. diffusers loads
safetensors memory-mapped onto meta-initialised modules (low_cpu_mem_usage), so N workers on one
host do not hold N full fp32 copies in host memory.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# FLUX.1-dev transformer config, for building the full-size model without weights (benchmarks).
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _subfolder(value: str | None) -> str | None:
    return None if value in (None, "", "none", "None") else value


def is_local_path(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def ensure_base_model(model_spec) -> str:
    """Resolve the base path; write the tiny model there when asked to and it is missing."""
    path = model_spec.base_path
    if model_spec.make_tiny_if_missing and is_local_path(path) and not (Path(path) / "model_index.json").exists():
        from flux_ray.core.tiny import ensure_tiny_flux

        ensure_tiny_flux(path, kontext=model_spec.model_flavour == "kontext")
    return path


def load_transformer(model_spec, dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None):
    """The frozen base transformer (override repo/subfolder honoured)."""
    from diffusers import FluxTransformer2DModel

    if model_spec.pretrained_transformer_model_name_or_path:
        path = model_spec.pretrained_transformer_model_name_or_path
        sub = _subfolder(model_spec.pretrained_transformer_subfolder)
    else:
        path, sub = model_spec.base_path, "transformer"
    model = FluxTransformer2DModel.from_pretrained(path, subfolder=sub, torch_dtype=dtype,
                                                   revision=model_spec.revision, **straight_to(device))
    model.requires_grad_(False)
    return model.to(device) if device is not None else model  # already there, unless accelerate was missing


def straight_to(device: str | torch.device | None) -> dict:
    """``from_pretrained`` kwargs that load a model's weights straight onto ``device``: diffusers' ``device_map``
    on one device copies each tensor from the memory-mapped safetensors to it (the CPU never holds the whole
    model) and then moves the model there without hooks (accelerate's ``dispatch_model``). None, or no
    accelerate: the CPU (the caller moves the model)."""
    from diffusers.utils import is_accelerate_available

    if device is None or not is_accelerate_available():
        return {}
    return {"device_map": {"": torch.device(device)}}


def load_vae(model_spec, dtype: torch.dtype = torch.float32, device=None):
    from diffusers import AutoencoderKL

    if model_spec.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(model_spec.pretrained_vae_model_name_or_path, torch_dtype=dtype)
    else:
        vae = AutoencoderKL.from_pretrained(model_spec.base_path, subfolder="vae", torch_dtype=dtype,
                                            revision=model_spec.revision)
    vae.requires_grad_(False).eval()
    return vae.to(device) if device is not None else vae


def load_text_encoders(model_spec, dtype: torch.dtype = torch.float32, device=None):
    """(clip_tokenizer, clip_model, t5_tokenizer, t5_model)."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    path, rev = model_spec.base_path, model_spec.revision
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev)
    tok2 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", revision=rev)
    clip = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, revision=rev)
    t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype, revision=rev)
    for m in (clip, t5):
        m.requires_grad_(False).eval()
        if device is not None:
            m.to(device)
    return tok, clip, tok2, t5


def load_scheduler_config(model_spec) -> dict:
    """The scheduler config (base/max shift and sequence lengths for auto shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(model_spec.base_path, subfolder="scheduler",
                                                                revision=model_spec.revision))
    except (OSError, ValueError):
        return {}


def load_vae_config(model_spec) -> dict:
    from diffusers import AutoencoderKL

    if model_spec.pretrained_vae_model_name_or_path:
        return dict(AutoencoderKL.load_config(model_spec.pretrained_vae_model_name_or_path))
    return dict(AutoencoderKL.load_config(model_spec.base_path, subfolder="vae", revision=model_spec.revision))


def build_transformer_from_config(config: dict, device: str | torch.device, dtype=torch.bfloat16, seed: int = 0):
    """A randomly initialised transformer of the given config, made directly on ``device``."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(prev)
    return model.requires_grad_(False)
