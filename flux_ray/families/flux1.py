"""FLUX.1 (dev, krea, schnell): the family interface over the existing core modules.

Every method delegates: loading to core/model.py, latents to core/flow.py, export to
core/lora_export.py (BFL key names in core/bfl_names.py), presets to the spec's table.
"""
from __future__ import annotations

import torch

from flux_ray.core import flow
from flux_ray.core import lora_export
from flux_ray.core import model as model_io
from flux_ray.spec import LORA_TARGET_PRESETS


class Flux1:
    name = "flux"
    text_blobs = ("prompt_embeds", "pooled", "text_mask")
    lora_target_presets = LORA_TARGET_PRESETS

    def ensure_base(self, model_spec) -> str:
        return model_io.ensure_base_model(model_spec)

    def load_transformer(self, model_spec, dtype: torch.dtype = torch.bfloat16, device=None) -> torch.nn.Module:
        return model_io.load_transformer(model_spec, dtype=dtype, device=device)

    def load_vae(self, model_spec, dtype: torch.dtype = torch.float32, device=None) -> torch.nn.Module:
        return model_io.load_vae(model_spec, dtype=dtype, device=device)

    def load_vae_config(self, model_spec) -> dict:
        return model_io.load_vae_config(model_spec)

    def load_text_encoders(self, model_spec, dtype: torch.dtype = torch.float32, device=None) -> tuple:
        """(clip_tokenizer, clip_model, t5_tokenizer, t5_model)."""
        return model_io.load_text_encoders(model_spec, dtype=dtype, device=device)

    def load_scheduler_config(self, model_spec) -> dict:
        return model_io.load_scheduler_config(model_spec)

    def embed_text(self, encoders: tuple, captions: list[str], max_length: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
        """CLIP's pooled output and T5's last hidden state, as diffusers' ``FluxPipeline.encode_prompt``; the
        T5 attention mask as int8 (masked training and the loader's padding trim read it)."""
        tok, clip, tok2, t5 = encoders
        clip_in = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt")
        pooled = clip(clip_in.input_ids.to(device), output_hidden_states=False).pooler_output
        t5_in = tok2(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        embeds = t5(t5_in.input_ids.to(device), output_hidden_states=False)[0]
        return {"prompt_embeds": embeds, "pooled": pooled, "text_mask": t5_in.attention_mask.to(torch.int8)}

    def normalize_latents(self, raw: torch.Tensor, vae_config: dict) -> torch.Tensor:
        return flow.normalize_latents(raw, vae_config.get("shift_factor") or 0.0, vae_config.get("scaling_factor", 1.0))

    def pack_latents(self, latents_bchw: torch.Tensor) -> torch.Tensor:
        return flow.pack_latents(latents_bchw)

    def latent_norm(self, vae_config: dict) -> dict:
        return {"shift_factor": vae_config.get("shift_factor") or 0.0,
                "scaling_factor": vae_config.get("scaling_factor", 1.0)}

    def position_ids(self, h: int, w: int, text_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return flow.latent_image_ids(h, w, device=device), flow.text_ids(text_len, device=device)

    def transformer_inputs(self, batch) -> dict:
        return {"pooled_projections": batch.pooled}

    def lora_targets(self, lora_spec) -> list[str]:
        return lora_spec.target_modules

    def uses_guidance(self, transformer: torch.nn.Module) -> bool:
        base = getattr(transformer, "module", transformer)
        return bool(getattr(base.config, "guidance_embeds", False))

    def validation_pipeline(self, model_spec, transformer: torch.nn.Module, dtype: torch.dtype, device):
        """FluxPipeline; for the kontext flavour FluxKontextPipeline (it edits a reference image)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline

        tok, clip, tok2, t5 = self.load_text_encoders(model_spec, dtype=dtype, device=device)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(model_spec.base_path, subfolder="scheduler",
                                                                revision=model_spec.revision)
        pipeline = FluxKontextPipeline if model_spec.model_flavour == "kontext" else FluxPipeline
        return pipeline(scheduler=sched, vae=self.load_vae(model_spec, dtype=dtype, device=device),
                        text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2,
                        transformer=transformer)

    def encode_validation_prompt(self, pipe, text: str, device, max_length: int) -> dict[str, torch.Tensor]:
        """T5 embeddings and the pooled CLIP embedding."""
        embeds, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, device=device,
                                               max_sequence_length=max_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def validation_guidance(self, model_spec, eval_spec) -> tuple[dict, str | None]:
        """Distilled guidance ``validation_guidance``; true CFG with the negative prompt when
        ``validation_guidance_real > 1``."""
        if eval_spec.validation_guidance_real > 1:
            return ({"guidance_scale": eval_spec.validation_guidance,
                     "true_cfg_scale": eval_spec.validation_guidance_real}, eval_spec.validation_negative_prompt)
        return {"guidance_scale": eval_spec.validation_guidance}, None

    def export_lora_file(self, src_file, fmt: str, out_dir, spec=None, metadata: dict | None = None,
                         filename: str | None = None):
        return lora_export.export_lora_file(src_file, fmt, out_dir, spec=spec, metadata=metadata, filename=filename)

    def merge_and_save(self, src_file, model_spec, out_dir, spec=None):
        return lora_export.merge_and_save(src_file, model_spec, out_dir, spec=spec)
