"""FLUX.2 flavours: hub ids, published component configs, and what differs between them.

Sources (each value was checked against one of these):
- transformer: diffusers' ``Flux2Transformer2DModel`` defaults are FLUX.2 [dev]'s (8 double, 48 single
  blocks, 48 heads x 128, joint_attention_dim 15360 = 3 x Mistral's 5120, guidance embeddings);
  [klein] 4B: 5 double, 20 single, 24 heads, joint 7680 (3 x Qwen3-4B's 2560), no guidance;
  [klein] 9B: 8 double, 24 single, 32 heads, joint 12288 (3 x Qwen3-8B's 4096), no guidance --
  BFL's ``flux2/src/flux2/model.py`` Klein4BParams/Klein9BParams as quoted in mflux's
  ``model_config.py`` and SimpleTuner's ``helpers/models/flux2/model.py`` (``max_swappable_blocks``).
- VAE: ``AutoencoderKLFlux2``'s defaults (32 latent channels, 2x2 patch, batch-norm eps 1e-4).
- text encoders: the ``config.json`` published with Qwen/Qwen3-4B, Qwen/Qwen3-8B and
  mistralai/Mistral-Small-3.1-24B-Instruct-2503 (text and Pixtral vision towers).
- hidden-state layers: ``Flux2KleinPipeline`` (9, 18, 27) and ``Flux2Pipeline`` (10, 20, 30), the
  same as SimpleTuner's KLEIN_OUTPUT_LAYERS / OUTPUT_LAYERS.
- hub ids: SimpleTuner's HUGGINGFACE_PATHS (the undistilled "base" klein checkpoints are the ones
  to train a LoRA on).
- scheduler: SimpleTuner's SCHEDULER_CONFIG for FLUX.2 (FLUX.1's dynamic-shift values).
"""
from __future__ import annotations

from dataclasses import dataclass, field

FLUX2_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

FLUX2_VAE = dict(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024, use_quant_conv=True,
                 use_post_quant_conv=True, mid_block_add_attention=True, batch_norm_eps=1e-4,
                 batch_norm_momentum=0.1, patch_size=(2, 2))

_TRANSFORMER_COMMON = dict(patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256,
                           mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6)

QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
MISTRAL_SMALL_3_1 = dict(
    text_config=dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=131072, max_position_embeddings=131072,
                     rope_theta=1000000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       head_dim=64, patch_size=14, image_size=1540, rope_theta=10000.0),
    image_token_index=10, spatial_merge_size=2, projector_hidden_act="gelu", multimodal_projector_bias=False,
    tie_word_embeddings=False)


@dataclass(frozen=True)
class Flux2Flavour:
    """One FLUX.2 model: where it lives and how its parts are shaped."""
    name: str
    hub_id: str
    pipeline_class: str
    """``Flux2KleinPipeline`` or ``Flux2Pipeline``: validation, LoRA loading, encode_prompt."""
    text_encoder_kind: str
    """``qwen3`` (user turn, generation prompt, thinking off) or ``mistral3`` (system + user turn)."""
    text_encoder_layers: tuple[int, ...]
    guidance_embeds: bool
    transformer: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)

    @property
    def text_hidden_size(self) -> int:
        cfg = self.text_encoder.get("text_config", self.text_encoder)
        return cfg["hidden_size"]

    @property
    def prompt_embed_dim(self) -> int:
        """Width of one prompt-embedding token: the stacked layers side by side."""
        return len(self.text_encoder_layers) * self.text_hidden_size


FLAVOURS: dict[str, Flux2Flavour] = {
    "klein-4b": Flux2Flavour(
        "klein-4b", "black-forest-labs/FLUX.2-klein-base-4B", "Flux2KleinPipeline", "qwen3", (9, 18, 27), False,
        {**_TRANSFORMER_COMMON, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
         "joint_attention_dim": 7680, "guidance_embeds": False}, QWEN3_4B),
    "klein-9b": Flux2Flavour(
        "klein-9b", "black-forest-labs/FLUX.2-klein-base-9B", "Flux2KleinPipeline", "qwen3", (9, 18, 27), False,
        {**_TRANSFORMER_COMMON, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
         "joint_attention_dim": 12288, "guidance_embeds": False}, QWEN3_8B),
    "dev": Flux2Flavour(
        "dev", "black-forest-labs/FLUX.2-dev", "Flux2Pipeline", "mistral3", (10, 20, 30), True,
        {**_TRANSFORMER_COMMON, "num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48,
         "joint_attention_dim": 15360, "guidance_embeds": True}, MISTRAL_SMALL_3_1),
}
DEFAULT_FLAVOUR = "klein-9b"  # SimpleTuner's DEFAULT_MODEL_FLAVOUR for model_family flux2


def get_flavour(name: str) -> Flux2Flavour:
    if name not in FLAVOURS:
        raise ValueError(f"unknown FLUX.2 flavour {name!r}; choose one of {sorted(FLAVOURS)}")
    return FLAVOURS[name]


def pipeline_class(flavour: str):
    import diffusers

    return getattr(diffusers, get_flavour(flavour).pipeline_class)
