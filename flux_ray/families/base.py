"""What a model family is: the one interface the cache, trainer, validation and export call.

A family owns everything that differs between model generations (FLUX.1, FLUX.2, ...): how its
parts load, how captions become the embeddings the cache stores, how VAE latents are normalised and
packed, its LoRA target presets, whether the transformer takes a guidance input, which diffusers
pipeline renders validation images, and how a LoRA is exported. Shared code asks
``get_family(spec.model.model_family)`` and never branches on the family's name.

Families sit on the core floor: they may import spec, storage and core, never data, train or Ray.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

import torch


class ModelFamily(Protocol):
    name: str
    """The spec's ``model.model_family`` value (SimpleTuner's name)."""
    text_blobs: tuple[str, ...]
    """The tensor columns :meth:`embed_text` returns and the text cache stores, in order."""
    lora_target_presets: Mapping[str, list[str]]
    """``lora.flux_lora_target`` preset name -> module-name suffixes that get a LoRA."""

    # ---- loading (hub id or local diffusers folder, from the model spec)
    def ensure_base(self, model_spec) -> str:
        """The base path; the family's tiny model is written there first with ``make_tiny_if_missing``."""

    def load_transformer(self, model_spec, dtype: torch.dtype = torch.bfloat16, device=None) -> torch.nn.Module:
        """The frozen base transformer; ``device``: its weights loaded straight onto it (no CPU copy first)."""

    def load_vae(self, model_spec, dtype: torch.dtype = torch.float32, device=None) -> torch.nn.Module:
        """The frozen VAE, in eval mode."""

    def load_vae_config(self, model_spec) -> dict:
        """The VAE's config without its weights (latent channels, shift and scaling factors)."""

    def load_text_encoders(self, model_spec, dtype: torch.dtype = torch.float32, device=None) -> tuple:
        """The tokenizers and text encoders, as :meth:`embed_text` takes them."""

    def load_scheduler_config(self, model_spec) -> dict:
        """The flow-matching scheduler's config (shift settings); {} when the folder has none."""

    # ---- text embedding
    def embed_text(self, encoders: tuple, captions: list[str], max_length: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
        """Captions -> the :attr:`text_blobs` tensors, batch first, on ``device``."""

    # ---- latents
    def normalize_latents(self, raw: torch.Tensor, vae_config: dict) -> torch.Tensor:
        """VAE latents -> the transformer's latent space."""

    def pack_latents(self, latents_bchw: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> the transformer's token sequence."""

    def latent_norm(self, vae_config: dict) -> dict:
        """The values :meth:`normalize_latents` needs (JSON-able): each latent manifest records them."""

    def position_ids(self, h: int, w: int, text_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(image ids, text ids) for normalised latents of h x w and ``text_len`` text tokens."""

    def transformer_inputs(self, batch) -> dict:
        """The family's extra transformer inputs from a ``core.step.FluxBatch`` (FLUX.1: the pooled embedding)."""

    # ---- LoRA, guidance
    def lora_targets(self, lora_spec) -> list[str]:
        """The module-name suffixes to adapt: an explicit list or the preset."""

    def uses_guidance(self, transformer: torch.nn.Module) -> bool:
        """Whether the transformer takes a distilled-guidance input."""

    # ---- validation and export
    def validation_pipeline(self, model_spec, transformer: torch.nn.Module, dtype: torch.dtype, device):
        """A diffusers pipeline around the live (LoRA-wrapped) transformer that renders prompts."""

    def encode_validation_prompt(self, pipe, text: str, device, max_length: int) -> dict[str, torch.Tensor]:
        """One prompt -> the pipeline's embedding arguments (``prompt_embeds``, ...), by its own ``encode_prompt``;
        the validator prefixes ``negative_`` for the negative prompt."""

    def validation_guidance(self, model_spec, eval_spec) -> tuple[dict, str | None]:
        """(the pipeline's guidance arguments, the negative prompt to encode or None) for the eval spec."""

    def export_lora_file(self, src_file, fmt: str, out_dir, spec=None, metadata: dict | None = None,
                         filename: str | None = None) -> Path:
        """A trained diffusers-format LoRA file -> ``fmt`` (diffusers, comfyui, kohya) under ``out_dir``."""

    def merge_and_save(self, src_file, model_spec, out_dir, spec=None) -> Path:
        """The base transformer with the LoRA fused in, saved as a diffusers folder."""
