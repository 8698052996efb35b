"""Tiny random FLUX.2 pipelines in diffusers layout, generated offline (for CPU tests and demos).

The same classes and folders as the published checkpoints -- transformer, ``AutoencoderKLFlux2``,
text encoder (``Qwen3ForCausalLM`` for [klein], ``Mistral3ForConditionalGeneration`` for [dev]),
tokenizer, scheduler -- so ``Flux2KleinPipeline.from_pretrained(dir)`` /
``Flux2Pipeline.from_pretrained(dir)`` load them and generate on a CPU in seconds. The text
encoders keep the real depth that the pipelines' default hidden-state layers index (27 / 30
layers) at a width of 16. Tokenizers are byte-level BPE built locally (no merges) with the chat
template each pipeline applies. [dev] ships a ``PixtralProcessor``; the tiny one stores a plain
tokenizer with the same ``apply_chat_template`` call (PixtralProcessor needs torchvision).
The VAE's batch-norm statistics are random, so latent normalisation is visible in tests.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from flux_ray.core.flux2.flavours import FLUX2_SCHEDULER, get_flavour
from flux_ray.core.tiny import save_pipeline_atomically

TINY_TEXT_WIDTH = 16
TINY_TRANSFORMER = dict(patch_size=1, in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=3 * TINY_TEXT_WIDTH, timestep_guidance_channels=32,
                        mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1, norm_num_groups=4, sample_size=128, use_quant_conv=True,
                use_post_quant_conv=True, batch_norm_eps=1e-4, patch_size=(2, 2))
TINY_QWEN3 = dict(hidden_size=TINY_TEXT_WIDTH, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, rope_theta=1000000.0)
TINY_MISTRAL_TEXT = dict(hidden_size=TINY_TEXT_WIDTH, intermediate_size=32, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024)
TINY_PIXTRAL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                    patch_size=4, image_size=64)

QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set text = m['content'][0]['text'] %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}")
MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]")


def _byte_vocab(specials: tuple[str, ...] = ()) -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({c: len(vocab) + i for i, c in enumerate(sorted(ByteLevel.alphabet()))})
    return vocab


def qwen3_tokenizer():
    """A byte-level Qwen2TokenizerFast with Qwen3's chat special tokens and template."""
    from transformers import Qwen2TokenizerFast

    tok = Qwen2TokenizerFast(vocab=_byte_vocab(), merges=[], chat_template=QWEN3_CHAT_TEMPLATE, model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    return tok


def mistral_tokenizer():
    """A byte-level fast tokenizer with Mistral's [INST]/[SYSTEM_PROMPT] tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=_byte_vocab(MISTRAL_SPECIALS), merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(MISTRAL_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=512, chat_template=MISTRAL_CHAT_TEMPLATE)


def build_text_encoder(kind: str, vocab_size: int, text_config: dict, image_token_index: int | None = None,
                       vision_config: dict | None = None):
    """``Qwen3ForCausalLM`` (kind qwen3) or ``Mistral3ForConditionalGeneration`` (kind mistral3)."""
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig,
                              Qwen3Config, Qwen3ForCausalLM)

    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**{**text_config, "vocab_size": vocab_size}))
    cfg = Mistral3Config(text_config=MistralConfig(**{**text_config, "vocab_size": vocab_size}),
                         vision_config=PixtralVisionConfig(**(vision_config or TINY_PIXTRAL)),
                         image_token_index=image_token_index, spatial_merge_size=2)
    return Mistral3ForConditionalGeneration(cfg)


def build_tiny_flux2_pipeline(flavour: str = "klein-4b", seed: int = 0):
    """A tiny fp32 Flux2KleinPipeline ([klein] flavours) or Flux2Pipeline ([dev])."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    from flux_ray.core.flux2.flavours import pipeline_class

    fl = get_flavour(flavour)
    torch.manual_seed(seed)
    if fl.text_encoder_kind == "qwen3":
        tok = qwen3_tokenizer()
        text_encoder = build_text_encoder("qwen3", len(tok), TINY_QWEN3)
    else:
        tok = mistral_tokenizer()
        text_encoder = build_text_encoder("mistral3", len(tok), TINY_MISTRAL_TEXT,
                                          image_token_index=tok.convert_tokens_to_ids("[IMG]"))
    transformer = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "guidance_embeds": fl.guidance_embeds})
    vae = AutoencoderKLFlux2(**TINY_VAE)
    with torch.no_grad():  # non-trivial batch-norm statistics, so normalisation is visible
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return pipeline_class(flavour)(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=vae,
                                   text_encoder=text_encoder.eval(), tokenizer=tok, transformer=transformer)


def write_tiny_flux2(directory: str | os.PathLike, flavour: str = "klein-4b", seed: int = 0,
                     overwrite: bool = False) -> Path:
    """Save the tiny FLUX.2 of ``flavour`` in diffusers layout at ``directory`` (temp dir, then rename)."""
    return save_pipeline_atomically(lambda: build_tiny_flux2_pipeline(flavour, seed), directory, overwrite,
                                    ".tiny-flux2-")


def ensure_tiny_flux2(directory: str | os.PathLike, flavour: str = "klein-4b") -> Path:
    """Write the tiny FLUX.2 at ``directory`` unless a model is already there (``make_tiny_if_missing``)."""
    path = Path(directory).expanduser().resolve()
    if (path / "model_index.json").exists():
        return path
    try:
        return write_tiny_flux2(path, flavour)
    except FileExistsError:  # another process wrote it first
        if (path / "model_index.json").exists():
            return path
        raise
