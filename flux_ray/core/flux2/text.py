"""FLUX.2 prompt embeddings: hidden states of several text-encoder layers, side by side per token.

Mirrors ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` ([klein]: Qwen3, the caption as a user turn
with the generation prompt and thinking off) and ``Flux2Pipeline._get_mistral_3_small_prompt_embeds``
([dev]: Mistral 3, BFL's system message then the caption), both padded to ``max_sequence_length``.
Two speed choices leave the values unchanged (tests compare with the pipelines' ``encode_prompt``):
the language model runs without its LM head (logits over a 130-150k vocabulary per token are
never used), and only up to the deepest layer asked for (28 of Qwen3's 36, 31 of Mistral's 40).
Text position ids are not cached: they are ``arange(L)`` on the last axis (``text_ids``).
"""
from __future__ import annotations

import contextlib

import torch

MAX_SEQUENCE_LENGTH = 512
TEXT_COLUMNS = ("prompt_embeds", "attention_mask")
"""Cache columns per caption: prompt_embeds (L, n_layers * hidden) in the cache dtype, attention_mask (L,) int8."""


def mistral_messages(captions: list[str], system_message: str | None = None) -> list[list[dict]]:
    """[dev]'s conversations (diffusers ``format_input`` without images): system turn, then the caption."""
    if system_message is None:
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as system_message
    return [[{"role": "system", "content": [{"type": "text", "text": system_message}]},
             {"role": "user", "content": [{"type": "text", "text": c.replace("[IMG]", "")}]}] for c in captions]


def tokenize(tokenizer, captions: list[str], kind: str, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
             system_message: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, max_sequence_length), as the pipelines build them."""
    pad = dict(padding="max_length", truncation=True, max_length=max_sequence_length, return_tensors="pt")
    if kind == "mistral3":
        enc = tokenizer.apply_chat_template(mistral_messages(captions, system_message), add_generation_prompt=False,
                                            tokenize=True, return_dict=True, **pad)
        return enc["input_ids"], enc["attention_mask"]
    if kind != "qwen3":
        raise ValueError(f"unknown FLUX.2 text encoder kind {kind!r} (qwen3 or mistral3)")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False) for c in captions]
    enc = tokenizer(texts, **pad)
    return enc["input_ids"], enc["attention_mask"]


def language_model(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (Qwen3ForCausalLM.model, Mistral3's language_model)."""
    inner = getattr(text_encoder, "model", text_encoder)
    return getattr(inner, "language_model", inner)


@contextlib.contextmanager
def layers_up_to(lm: torch.nn.Module, deepest: int):
    """Run only the first ``deepest + 1`` decoder layers: hidden_states[k] for k <= deepest is unchanged.

    (+1 because transformers replaces the last recorded hidden state with the final-norm output.)
    """
    total = lm.config.num_hidden_layers
    if deepest > total:
        raise ValueError(f"text encoder has {total} layers; hidden state {deepest} does not exist")
    lm.config.num_hidden_layers = min(total, deepest + 1)
    try:
        yield
    finally:
        lm.config.num_hidden_layers = total


def stack_layers(hidden_states: tuple[torch.Tensor, ...], layers: tuple[int, ...]) -> torch.Tensor:
    """(B, L, D) per layer -> (B, L, n_layers * D), layer-major within each token (the pipelines' order)."""
    out = torch.stack([hidden_states[k] for k in layers], dim=1)
    b, n, seq, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, seq, n * d)


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: list[str], *, kind: str, layers: tuple[int, ...],
                    max_sequence_length: int = MAX_SEQUENCE_LENGTH, system_message: str | None = None,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (prompt_embeds (B, L, len(layers) * hidden), attention_mask (B, L)) on the encoder's device."""
    input_ids, mask = tokenize(tokenizer, list(captions), kind, max_sequence_length, system_message)
    lm = language_model(text_encoder)
    device = next(lm.parameters()).device
    with layers_up_to(lm, max(layers)):
        out = lm(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                 use_cache=False)
    embeds = stack_layers(out.hidden_states, tuple(layers))
    return embeds.to(dtype or text_encoder.dtype), mask.to(device)


def text_ids(batch_size: int, seq_len: int, device=None) -> torch.Tensor:
    """(B, L, 4) position ids (t, h, w, l) = (0, 0, 0, i): ``Flux2Pipeline._prepare_text_ids``."""
    ids = torch.zeros(seq_len, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(seq_len, device=device)
    return ids.unsqueeze(0).expand(batch_size, -1, -1)


def text_cache_shapes(flavour, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> dict[str, tuple[int, ...]]:
    """Per-caption shape of each cache column for a ``flavours.Flux2Flavour``."""
    return {"prompt_embeds": (max_sequence_length, flavour.prompt_embed_dim), "attention_mask": (max_sequence_length,)}
