"""FLUX.2 ([klein] 4B / 9B, [dev]): the family interface over core/flux2.

Loading through ``from_pretrained`` (hub id or local diffusers folder; ``make_tiny_if_missing`` writes the
tiny model of the flavour), prompt embeddings from core/flux2/text.py (no pooled embedding), latents
patchified and normalised by the VAE batch norm's statistics (core/flux2/latents.py; the statistics travel
in :meth:`load_vae_config`), the FLUX.2 presets of the spec, validation through the flavour's pipeline
(``Flux2KleinPipeline`` / ``Flux2Pipeline``), diffusers-format export (what ComfyUI reads for FLUX.2, see
:data:`COMFYUI_READS_DIFFUSERS`) and merging through core/lora_export.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from flux_ray.core import lora_export
from flux_ray.core.flux2 import latents as L
from flux_ray.core.flux2.flavours import FLUX2_SCHEDULER, get_flavour, pipeline_class
from flux_ray.core.flux2.text import encode_captions
from flux_ray.spec import FLUX2_LORA_TARGET_PRESETS

COMFYUI_READS_DIFFUSERS = (
    "ComfyUI loads FLUX.2 LoRAs in this diffusers layout as they are: comfy/lora.py model_lora_keys_unet maps "
    "'transformer.<diffusers module>' keys for comfy.model_base.Flux and its subclass Flux2 through comfy/utils.py "
    "flux_to_diffusers, which names FLUX.2's modules (attn.to_qkv_mlp_proj -> linear1, attn.to_out -> linear2, "
    "ff.linear_in/out -> img_mlp.0/2, to_q/k/v -> slices of img_attn.qkv)")
"""Why FLUX.2 exports no separate ComfyUI/kohya file (source: Comfy-Org/ComfyUI, the two functions named)."""


def _base(model_spec) -> str:
    """The base path; the tiny FLUX.2 of the flavour is written there when asked and missing."""
    from flux_ray.core.model import is_local_path

    path = model_spec.base_path
    if model_spec.make_tiny_if_missing and is_local_path(path) and not (Path(path) / "model_index.json").exists():
        from flux_ray.core.flux2.tiny import ensure_tiny_flux2

        ensure_tiny_flux2(path, model_spec.model_flavour)
    return path


class Flux2:
    name = "flux2"
    text_blobs = ("prompt_embeds", "text_mask")
    lora_target_presets = FLUX2_LORA_TARGET_PRESETS

    def ensure_base(self, model_spec) -> str:
        return _base(model_spec)

    def load_transformer(self, model_spec, dtype: torch.dtype = torch.bfloat16, device=None) -> torch.nn.Module:
        from diffusers import Flux2Transformer2DModel

        from flux_ray.core.model import straight_to

        model = Flux2Transformer2DModel.from_pretrained(_base(model_spec), subfolder="transformer", torch_dtype=dtype,
                                                        revision=model_spec.revision, **straight_to(device))
        model.requires_grad_(False)
        return model.to(device) if device is not None else model  # already there, unless accelerate was missing

    def load_vae(self, model_spec, dtype: torch.dtype = torch.float32, device=None) -> torch.nn.Module:
        from diffusers import AutoencoderKLFlux2

        vae = AutoencoderKLFlux2.from_pretrained(_base(model_spec), subfolder="vae", torch_dtype=dtype,
                                                 revision=model_spec.revision).eval()
        vae.requires_grad_(False)
        return vae.to(device) if device is not None else vae

    def load_vae_config(self, model_spec) -> dict:
        """The VAE config plus its batch norm's statistics (``bn_mean``, ``bn_std``: lists of 4C floats), which
        FLUX.2's latent normalisation needs (they are weights, so the VAE is loaded once here)."""
        vae = self.load_vae(model_spec)
        mean, std = L.bn_stats(vae)
        return {**dict(vae.config), "bn_mean": mean.flatten().tolist(), "bn_std": std.flatten().tolist()}

    def load_text_encoders(self, model_spec, dtype: torch.dtype = torch.float32, device=None) -> tuple:
        """(tokenizer, text_encoder): Qwen3ForCausalLM for [klein], Mistral3ForConditionalGeneration for [dev]."""
        from transformers import AutoTokenizer, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

        base = _base(model_spec)
        kind = get_flavour(model_spec.model_flavour).text_encoder_kind
        cls = Qwen3ForCausalLM if kind == "qwen3" else Mistral3ForConditionalGeneration
        tok = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", revision=model_spec.revision)
        enc = cls.from_pretrained(base, subfolder="text_encoder", torch_dtype=dtype, revision=model_spec.revision)
        enc.requires_grad_(False).eval()
        return tok, (enc.to(device) if device is not None else enc)

    def load_scheduler_config(self, model_spec) -> dict:
        """The folder's scheduler config; SimpleTuner's FLUX.2 values for a hub id not on disk."""
        cfg = Path(_base(model_spec)) / "scheduler" / "scheduler_config.json"
        return json.loads(cfg.read_text()) if cfg.exists() else dict(FLUX2_SCHEDULER)

    def embed_text(self, encoders: tuple, captions: list[str], max_length: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
        """The stacked hidden states (``Flux2KleinPipeline`` / ``Flux2Pipeline.encode_prompt``) and the attention
        mask as int8; FLUX.2 has no pooled embedding."""
        tok, enc = encoders
        fl = self._flavour_of(enc)
        embeds, mask = encode_captions(enc, tok, captions, kind=fl.text_encoder_kind, layers=fl.text_encoder_layers,
                                       max_sequence_length=max_length)
        return {"prompt_embeds": embeds.to(device), "text_mask": mask.to(device, torch.int8)}

    @staticmethod
    def _flavour_of(text_encoder):
        """The flavour's text-encoder kind and layers, from the encoder class (klein-4b and -9b share them)."""
        return get_flavour("dev" if type(text_encoder).__name__.startswith("Mistral3") else "klein-4b")

    def normalize_latents(self, raw: torch.Tensor, vae_config: dict) -> torch.Tensor:
        """VAE latents ([B,] C, H/8, W/8) -> patchified, batch-norm normalised ([B,] 4C, H/16, W/16)."""
        mean = torch.tensor(vae_config["bn_mean"]).view(1, -1, 1, 1)
        std = torch.tensor(vae_config["bn_std"]).view(1, -1, 1, 1)
        out = L.normalize(L.patchify(raw if raw.dim() == 4 else raw.unsqueeze(0)), mean, std)
        return out if raw.dim() == 4 else out.squeeze(0)

    def pack_latents(self, latents_bchw: torch.Tensor) -> torch.Tensor:
        return L.pack(latents_bchw)

    def latent_norm(self, vae_config: dict) -> dict:
        return {"bn_mean": list(vae_config["bn_mean"]), "bn_std": list(vae_config["bn_std"])}

    def position_ids(self, h: int, w: int, text_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, h, w, l) ids, (S, 4) each (the transformer takes one set for the batch)."""
        from flux_ray.core.flux2.text import text_ids

        return L.latent_ids(1, h, w, device)[0], text_ids(1, text_len, device)[0]

    def transformer_inputs(self, batch) -> dict:
        return {}  # no pooled embedding

    def lora_targets(self, lora_spec) -> list[str]:
        return list(lora_spec.peft_lora_target_modules or FLUX2_LORA_TARGET_PRESETS[lora_spec.flux_lora_target])

    def uses_guidance(self, transformer: torch.nn.Module) -> bool:
        base = getattr(transformer, "module", transformer)
        return bool(getattr(base.config, "guidance_embeds", False))  # [dev] only

    def validation_pipeline(self, model_spec, transformer: torch.nn.Module, dtype: torch.dtype, device):
        """The flavour's pipeline ([klein]: Flux2KleinPipeline, undistilled; [dev]: Flux2Pipeline) around
        ``transformer``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        tok, enc = self.load_text_encoders(model_spec, dtype=dtype, device=device)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(_base(model_spec), subfolder="scheduler",
                                                                revision=model_spec.revision)
        return pipeline_class(model_spec.model_flavour)(
            scheduler=sched, vae=self.load_vae(model_spec, dtype=dtype, device=device), text_encoder=enc,
            tokenizer=tok, transformer=transformer)

    def encode_validation_prompt(self, pipe, text: str, device, max_length: int) -> dict[str, torch.Tensor]:
        """The stacked hidden states (no pooled embedding); the text ids are rebuilt by the pipeline."""
        embeds, _ = pipe.encode_prompt(prompt=text, device=device, max_sequence_length=max_length)
        return {"prompt_embeds": embeds}

    def validation_guidance(self, model_spec, eval_spec) -> tuple[dict, str | None]:
        """``validation_guidance`` is the pipeline's ``guidance_scale``: [klein]'s CFG scale (above 1 it renders
        against ``validation_negative_prompt``, encoded once like the prompts; the pipeline would otherwise
        encode "" with the freed encoder), [dev]'s distilled guidance (no negative prompt)."""
        guidance = {"guidance_scale": eval_spec.validation_guidance}
        cfg = not get_flavour(model_spec.model_flavour).guidance_embeds and eval_spec.validation_guidance > 1
        return guidance, (eval_spec.validation_negative_prompt if cfg else None)

    def export_lora_file(self, src_file, fmt: str, out_dir, spec=None, metadata: dict | None = None,
                         filename: str | None = None) -> Path:
        """diffusers only: the trained file is already what ``Flux2(Klein)Pipeline.load_lora_weights`` reads, and
        what ComfyUI reads for FLUX.2 (:data:`COMFYUI_READS_DIFFUSERS`)."""
        if fmt != "diffusers":
            raise ValueError(f"LoRA format {fmt!r} is FLUX.1's; model_family flux2 exports diffusers only. "
                             + COMFYUI_READS_DIFFUSERS)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dst = out / (filename or Path(src_file).name)
        shutil.copyfile(src_file, dst)
        return dst

    def merge_and_save(self, src_file, model_spec, out_dir, spec=None) -> Path:
        """The FLUX.2 base transformer with the LoRA fused in, as a diffusers folder (core/lora_export.py)."""
        return lora_export.merge_and_save(src_file, model_spec, out_dir, spec=spec,
                                          load_transformer=self.load_transformer)
