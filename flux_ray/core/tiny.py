"""A tiny random Flux in diffusers layout, generated offline.

Same classes and folder layout as black-forest-labs/FLUX.1-dev (transformer, vae, CLIP, T5,
tokenizers built locally, scheduler), so every code path that loads the real model via
``from_pretrained(path, subfolder=...)`` runs on a CPU in seconds.
"""
from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

TINY_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1, norm_num_groups=4, sample_size=128, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_pipeline(seed: int = 0, guidance_embeds: bool = True, kontext: bool = False):
    """A FluxPipeline of tiny random modules (fp32); ``kontext``: a FluxKontextPipeline of the same modules (FLUX.1
    Kontext is the FLUX.1 transformer with guidance embeddings; the reference image enters as extra tokens)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, vocab_size=len(tok), projection_dim=32, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1, vocab_size=len(tok2),
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER, "guidance_embeds": guidance_embeds})
    vae = AutoencoderKL(**TINY_VAE)
    pipeline = FluxKontextPipeline if kontext else FluxPipeline
    return pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=clip,
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)


def write_tiny_clip(directory: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random CLIPModel + CLIPProcessor (this module's tokenizer, 32 px images) for ``evaluation_type: clip``
    tests, saved with ``save_pretrained`` so it loads like ``openai/clip-vit-large-patch14-336``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tok = _clip_tokenizer()
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    out = Path(directory).expanduser().resolve()
    model.save_pretrained(out, safe_serialization=True)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    return out


def save_pipeline_atomically(build, directory: str | os.PathLike, overwrite: bool, prefix: str) -> Path:
    """``build()``'s pipeline saved in diffusers layout at ``directory``: into a temp dir beside it, then renamed."""
    out = Path(directory).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    try:
        build().save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_tiny_flux(directory: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True,
                    overwrite: bool = False, kontext: bool = False) -> Path:
    """Save the tiny Flux in diffusers layout at ``directory`` (atomically: temp dir, then rename)."""
    return save_pipeline_atomically(lambda: build_tiny_pipeline(seed, guidance_embeds, kontext), directory,
                                    overwrite, ".tiny-flux-")


def ensure_tiny_flux(directory: str | os.PathLike, kontext: bool = False) -> Path:
    """Write the tiny Flux (``kontext``: the tiny FLUX.1 Kontext) at ``directory`` unless a model is already there."""
    path = Path(directory).expanduser().resolve()
    if (path / "model_index.json").exists():
        return path
    try:
        return write_tiny_flux(path, kontext=kontext)
    except FileExistsError:  # another process wrote it first
        if (path / "model_index.json").exists():
            return path
        raise
