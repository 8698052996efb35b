"""The job spec: one pydantic model, the single source of truth for every option.

Option names follow SimpleTuner's where it has one (``lora_rank``, ``flux_lora_target``,
``caption_strategy``, ``train_batch_size`` ...). Unknown keys are rejected; a bad value fails with
the dotted key path before any expensive work starts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

FLAVOUR_HUB_IDS = {
    "krea": "black-forest-labs/FLUX.1-Krea-dev",
    "dev": "black-forest-labs/FLUX.1-dev",
    "schnell": "black-forest-labs/FLUX.1-schnell",
    "kontext": "black-forest-labs/FLUX.1-Kontext-dev",
}

FLUX2_FLAVOUR_HUB_IDS = {
    "klein-4b": "black-forest-labs/FLUX.2-klein-base-4B",
    "klein-9b": "black-forest-labs/FLUX.2-klein-base-9B",
    "dev": "black-forest-labs/FLUX.2-dev",
}
"""model_family flux2: flavour -> hub id (SimpleTuner's HUGGINGFACE_PATHS; core/flux2/flavours.py holds the same)."""
FLUX2_DEFAULT_FLAVOUR = "klein-9b"  # SimpleTuner's DEFAULT_MODEL_FLAVOUR for flux2
FLUX1_FLAVOURS = ("krea", "dev", "schnell", "kontext")
_F2_IMG_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
_F2_TXT_ATTN = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_F2_SINGLE = ["attn.to_qkv_mlp_proj", "attn.to_out"]
_F2_MLP = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
FLUX2_LORA_TARGET_PRESETS: dict[str, list[str]] = {
    "all": _F2_IMG_ATTN + _F2_TXT_ATTN + _F2_MLP + _F2_SINGLE,
    "attention": _F2_IMG_ATTN + _F2_TXT_ATTN + _F2_SINGLE,
    "mlp": list(_F2_MLP),
    "tiny": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "diffusers": _F2_IMG_ATTN + _F2_SINGLE,
}
"""model_family flux2: ``lora.flux_lora_target`` presets (sources and block layout: core/flux2/lora_targets.py)."""
FLUX2_LORA_TARGETS = tuple(FLUX2_LORA_TARGET_PRESETS)

LORA_TARGET_PRESETS: dict[str, list[str]] = {
    "mmdit": ["to_k", "to_q", "to_v", "to_out.0"],
    "all": ["to_k", "to_q", "to_v", "add_k_proj", "add_q_proj", "add_v_proj", "to_out.0", "to_add_out"],
    "context": ["add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"],
    "tiny": ["single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"],
    "nano": ["single_transformer_blocks.7.proj_out"],
}
LORA_TARGET_PRESETS["all+ffs"] = LORA_TARGET_PRESETS["all"] + [
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
LORA_TARGET_PRESETS["context+ffs"] = LORA_TARGET_PRESETS["context"] + ["ff_context.net.0.proj", "ff_context.net.2"]
FAMILY_TITLES = {"flux": "FLUX.1", "flux2": "FLUX.2"}
FAMILY_FLAVOURS = {"flux": FLAVOUR_HUB_IDS, "flux2": FLUX2_FLAVOUR_HUB_IDS}
"""model.model_family -> its flavours and their hub ids (the registry, families/, owns everything else)."""
FAMILY_DEFAULT_FLAVOUR = {"flux": "krea", "flux2": FLUX2_DEFAULT_FLAVOUR}
FAMILY_LORA_PRESETS = {"flux": LORA_TARGET_PRESETS, "flux2": FLUX2_LORA_TARGET_PRESETS}


def _flux2_unsupported(spec: JobSpec) -> list[str]:
    """The options set in ``spec`` that the FLUX.2 path does not wire (each named by its key)."""
    m, t, ev = spec.model, spec.train, spec.eval
    refused = {
        "model.assistant_lora_path": bool(m.assistant_lora_path),
        "model.pretrained_transformer_model_name_or_path": bool(m.pretrained_transformer_model_name_or_path),
        "model.pretrained_vae_model_name_or_path": bool(m.pretrained_vae_model_name_or_path),
        "lora.lora_type lycoris": spec.lora.lora_type == "lycoris",
        "train.flux_attention_masked_training": t.flux_attention_masked_training,
        "cache.compile_encoders": spec.cache.compile_encoders,
        "conditioning (mask / reference) datasets": bool(spec.enabled_datasets("conditioning")),
        "output.export_formats comfyui/kohya": bool(set(spec.output.export_formats) - {"diffusers"}),
        "eval.validation_guidance_real (FLUX.1's true CFG: [klein]'s CFG scale is eval.validation_guidance, [dev] "
        "is guidance-distilled)": ev.validation_guidance_real > 1,
    }
    return [k for k, on in refused.items() if on]


FAMILY_UNSUPPORTED = {"flux": lambda spec: [], "flux2": _flux2_unsupported}
"""model.model_family -> the spec options it refuses."""

LYCORIS_IGNORED_LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "flux_lora_target",
                             "peft_lora_target_modules", "init_lora")
"""LoraSpec keys that shape a standard (PEFT) LoRA only; with lora_type lycoris they must keep their defaults."""
CONDITIONING_IGNORED_KEYS = ("caption_strategy", "instance_prompt", "prepend_instance_prompt", "parquet",
                             "caption_dropout_probability", "resolution", "resolution_type", "minimum_image_size",
                             "maximum_image_size", "target_downsample_size", "crop", "crop_style", "crop_aspect",
                             "repeats", "is_regularisation_data")
"""DatasetSpec keys a mask (conditioning) dataset would ignore: they must keep their defaults there."""
SECRET_KEY_PARTS = ("secret", "password", "token", "access_key", "credential", "webhook_url")
"""Key parts that mark a value as a credential: whole ``_``-separated words of the key (``hf_token``,
``aws_secret_access_key``) or, for the two-word ones, substrings; ``max_new_tokens`` and ``tokenizer_max_length``
are not secrets."""


def is_secret_key(key: object) -> bool:
    k = str(key).lower()
    words = set(k.split("_"))
    return any(part in words if "_" not in part else part in k for part in SECRET_KEY_PARTS)
"""Keys whose values are never logged: dropped from MLflow params and the run identity, masked in job_spec.yaml
(a Discord or Slack webhook URL carries its token in the path)."""
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
"""Image files a dataset folder may hold: the spec checks a local folder has one, the source lister lists them."""
T5_COMPILE_MIN_CAPTIONS = 4096  # cache.compile_encoders: fewer captions encode faster eager than compile + encode


class SpecError(ValueError):
    """A job spec that cannot run; the message names the file, key path and problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Section):
    model_family: Literal["flux", "flux2"] = "flux"
    """flux: FLUX.1; flux2: FLUX.2 ([klein] 4B / 9B, [dev])."""
    model_flavour: Literal["krea", "dev", "schnell", "kontext", "klein-4b", "klein-9b"] = "krea"
    """flux: krea, dev, schnell, kontext; flux2: klein-4b, klein-9b, dev (default klein-9b)."""
    pretrained_model_name_or_path: str | None = None
    """Hub id or local diffusers folder; defaults to the flavour's hub id."""
    revision: str | None = None
    pretrained_transformer_model_name_or_path: str | None = None
    pretrained_transformer_subfolder: str | None = "transformer"
    pretrained_vae_model_name_or_path: str | None = None
    make_tiny_if_missing: bool = False
    """Generate the tiny random Flux at a missing local path (demo and tests)."""
    base_model_precision: Literal["no_change", "int8-quanto", "int4-quanto", "int2-quanto", "nf4-bnb",
                                  "int8-torchao", "fp8-torchao"] = "no_change"
    quantize_via: Literal["accelerator", "cpu"] = "accelerator"
    base_compute_dtype: Literal["bf16", "fp8"] = "bf16"
    """GEMM precision of the frozen base's block Linears. fp8: e4m3 forward and input-gradient GEMMs with
    rowwise scales, the weights quantised once (core/fp8.py); needs FP8 tensor cores (sm_89+: H100, H200,
    L40S). Not a base_model_precision: that sets how weights are stored (fp8-torchao: fp8 storage, bf16 GEMMs)."""
    base_model_default_dtype: Literal["bf16", "fp32"] = "bf16"
    enable_group_offload: bool = False
    """Keep the frozen base on the CPU; each group is copied to the GPU for its forward and backward
    (diffusers' group offloading; core/offload.py). Needs train.gradient_checkpointing."""
    group_offload_type: Literal["block_level", "leaf_level"] = "block_level"
    group_offload_blocks_per_group: int = Field(1, ge=1)
    """block_level: transformer blocks per group (one copy each)."""
    group_offload_use_stream: bool = False
    """CUDA: copy the next group on a side stream while this one computes (pinned host copy of the base)."""
    group_offload_to_disk_path: str | None = None
    """Keep the offloaded base in safetensors files under this directory instead of host memory."""
    enable_model_cpu_offload: bool = False
    """diffusers' whole-model CPU offload; refused for training (the model runs every step): use group offload."""
    tokenizer_max_length: int | None = None
    """T5 sequence length; 512 by default, 256 for schnell."""
    assistant_lora_path: str | None = None
    """schnell: a frozen assistant LoRA (path or hub id) applied under the trained one."""

    @model_validator(mode="after")
    def _check_flavour(self) -> ModelSpec:
        flavours = FAMILY_FLAVOURS[self.model_family]
        if "model_flavour" not in self.model_fields_set and self.model_flavour not in flavours:
            self.model_flavour = FAMILY_DEFAULT_FLAVOUR[self.model_family]  # re-validates once with it set
        if self.model_flavour not in flavours:
            raise ValueError(f"model.model_flavour {self.model_flavour!r} is not a flavour of model_family "
                             f"{self.model_family} ({FAMILY_TITLES[self.model_family]}): choose one of "
                             + ", ".join(flavours))
        return self

    @model_validator(mode="after")
    def _check_offload(self) -> ModelSpec:
        if self.enable_group_offload and self.enable_model_cpu_offload:
            raise ValueError("model.enable_group_offload and model.enable_model_cpu_offload are exclusive; "
                             "use model.enable_group_offload")
        if self.enable_model_cpu_offload:
            raise ValueError("model.enable_model_cpu_offload is not supported for training (the transformer runs "
                             "forward and backward every step, so moving it whole saves no GPU memory); "
                             "use model.enable_group_offload")
        if self.base_compute_dtype == "fp8" and (self.base_model_precision != "no_change" or self.enable_group_offload):
            raise ValueError("model.base_compute_dtype fp8 quantises the bf16 base itself: it needs "
                             f"model.base_model_precision no_change (got {self.base_model_precision!r}) and no "
                             "model.enable_group_offload")
        if not self.enable_group_offload:
            return self
        if self.base_model_precision != "no_change":
            raise ValueError("model.enable_group_offload needs an unquantized base "
                             f"(model.base_model_precision={self.base_model_precision!r}; use no_change)")
        if self.group_offload_use_stream and self.group_offload_type == "block_level" \
                and self.group_offload_blocks_per_group != 1:
            raise ValueError("model.group_offload_use_stream prefetches one block at a time: set "
                             "model.group_offload_blocks_per_group to 1 (diffusers would reset it)")
        return self

    @property
    def base_path(self) -> str:
        return self.pretrained_model_name_or_path or FAMILY_FLAVOURS[self.model_family][self.model_flavour]

    @property
    def t5_max_length(self) -> int:
        if self.tokenizer_max_length:
            return self.tokenizer_max_length
        return 256 if self.model_flavour == "schnell" else 512


class LoraSpec(_Section):
    lora_type: Literal["standard", "lycoris"] = "standard"
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float | None = None
    """Defaults to lora_rank (scale 1)."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_init_type: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    flux_lora_target: Literal["mmdit", "all", "all+ffs", "context", "context+ffs", "tiny", "nano",
                              "attention", "mlp", "diffusers"] = "all"
    """flux: mmdit, all, all+ffs, context, context+ffs, tiny, nano; flux2: all, attention, mlp, tiny, diffusers."""
    peft_lora_target_modules: list[str] | None = None
    init_lora: str | None = None
    """Continue from an existing LoRA file (diffusers safetensors)."""
    lycoris_config: dict[str, Any] = Field(
        default_factory=lambda: {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1,
                                 "factor": 16})

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    _family: str = PrivateAttr("flux")
    """The job's model.model_family (JobSpec sets it): which preset table flux_lora_target names."""

    @property
    def target_modules(self) -> list[str]:
        return list(self.peft_lora_target_modules or FAMILY_LORA_PRESETS[self._family][self.flux_lora_target])


MANIFEST_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv"}


class ParquetManifest(_Section):
    """SimpleTuner's ``parquet:`` block: a table of file names and captions, read by the path's extension
    (.parquet; .jsonl JSON lines and .json, as SimpleTuner reads them; .csv with a header row)."""
    path: str
    filename_column: str = "filename"
    caption_column: str | list[str] = "caption"
    """A column, or several: each non-empty value is one caption of the image. A list cell holds several."""
    fallback_caption_column: str | None = None
    """Used where every caption column is empty (SimpleTuner's option)."""

    @field_validator("path")
    @classmethod
    def _known_format(cls, v: str) -> str:
        ext = os.path.splitext(v.lower())[1]
        if ext not in MANIFEST_FORMATS:
            raise ValueError(f"{v!r}: a caption manifest is read by its extension: {', '.join(MANIFEST_FORMATS)}")
        return v

    @property
    def format(self) -> str:
        return MANIFEST_FORMATS[os.path.splitext(self.path.lower())[1]]

    @property
    def caption_columns(self) -> list[str]:
        return [self.caption_column] if isinstance(self.caption_column, str) else list(self.caption_column)


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
"""A dataset whose instance_data_dir (local) or aws_data_prefix (s3) ends so is an archive of images."""
TRIGGER_PLACEHOLDER = "[trigger]"


class CaptionerSpec(_Section):
    """``caption_strategy: auto``: a vision-language model captions the images that have no ``.txt`` caption
    (data/auto_captions.py). Names follow SimpleTuner's captioning toolkit (toolkit/captioning/caption_with_*.py)."""
    model_name: str = "florence-community/Florence-2-large"
    """Hub id or local folder of a transformers image-text-to-text model (Florence-2, BLIP, GIT, Qwen2-VL ...),
    loaded with AutoProcessor and AutoModelForImageTextToText."""
    query_str: str = "<MORE_DETAILED_CAPTION>"
    """The text given with each image: Florence-2's task token, a question for chat models, "" for none (BLIP)."""
    max_new_tokens: int = Field(128, ge=1, le=4096)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Weights and compute dtype on a GPU; a CPU always runs fp32."""
    batch_size: int = Field(8, ge=1)
    """Images per generate() call on an actor."""
    num_actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(1.0, gt=0, le=1)
    """GPU share each captioner actor asks Ray for (``scaling.use_gpu``); on CPU each actor holds one CPU."""
    output_parquet: str | None = None
    """Where the captions go (Parquet: filename, caption, model_name); default
    ``<cache.uri>/captions/<dataset id>-<hash>.parquet``. Edit it to change a caption; delete a row to recaption."""

    @field_validator("model_name")
    @classmethod
    def _not_s3(cls, v: str) -> str:
        if v.startswith("s3://"):
            raise ValueError(f"an s3:// captioner is not fetched to the nodes (got {v!r}): use a hub id or a folder "
                             "every node has (storage.shared_paths)")
        return v


class DatasetSpec(_Section):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["local", "s3"] = "local"
    """``aws`` (SimpleTuner's spelling) is read as ``s3``."""
    instance_data_dir: str | None = None
    aws_bucket_name: str | None = None
    aws_data_prefix: str = ""
    aws_endpoint_url: str | None = None
    aws_region_name: str | None = None
    disabled: bool = False
    make_demo_if_missing: bool = False
    """Write the generated demo images at a missing local instance_data_dir."""
    caption_strategy: Literal["filename", "textfile", "instanceprompt", "parquet", "auto"] = "textfile"
    """auto: a ``<stem>.txt`` beside the image if there is one, else a caption by ``captioner`` (computed once,
    kept in ``captioner.output_parquet``)."""
    instance_prompt: str | None = None
    prepend_instance_prompt: bool = False
    disable_multiline_split: bool = False
    """textfile and auto (their .txt files): the whole file is one caption. By default each non-empty line is one
    caption of the image (SimpleTuner's), and each epoch trains on one of them, drawn per (seed, epoch, image)."""
    parquet: ParquetManifest | None = None
    captioner: CaptionerSpec = Field(default_factory=CaptionerSpec)
    trigger_word: str | None = None
    """The word that calls up the trained concept (the hosted trainers' name): replaces ``[trigger]`` in each
    caption, or is put first (``"<word>, caption"``) in a caption that lacks it; likewise in validation prompts."""
    caption_dropout_probability: float = Field(0.0, ge=0.0, le=1.0)
    resolution: int = Field(1024, ge=64)
    resolution_type: Literal["pixel", "pixel_area"] = "pixel_area"
    minimum_image_size: int | None = None
    maximum_image_size: int | None = None
    target_downsample_size: int | None = None
    crop: bool = False
    crop_style: Literal["center", "random", "corner"] = "center"
    crop_aspect: Literal["square", "preserve", "closest", "random"] = "preserve"
    repeats: int = Field(0, ge=0)
    """Extra passes over this dataset per epoch (SimpleTuner: 0 = seen once)."""
    is_regularisation_data: bool = False
    """Prior regularisation (SimpleTuner's parent-teacher): this dataset's samples are trained towards the base
    model's own prediction with the adapter off, not towards their images; mixed into batches like any dataset."""
    dataset_type: Literal["image", "eval", "conditioning"] = "image"
    conditioning_type: Literal["mask", "controlnet", "reference_strict", "reference_loose"] | None = None
    """For dataset_type conditioning, one file per image of the dataset that links it, matched by file name. mask:
    loss masks (white trains, black is ignored; data/masks.py). reference_strict / reference_loose (model_flavour
    kontext): reference images, VAE-encoded and given to the transformer as extra image tokens
    (data/references.py); strict crops each with its image's own plan, loose buckets and crops it on its own."""
    conditioning_data: str | list[str] | None = None
    """Id(s) of the conditioning dataset(s) paired with this image dataset (SimpleTuner's name): at most one mask
    dataset and one reference dataset."""

    @field_validator("type", mode="before")
    @classmethod
    def _simpletuner_type(cls, v: Any) -> Any:
        return "s3" if v == "aws" else v

    @model_validator(mode="after")
    def _check_source(self) -> DatasetSpec:
        if self.type == "local" and not self.instance_data_dir:
            raise ValueError("a local dataset needs instance_data_dir")
        if self.type == "s3" and not self.aws_bucket_name:
            raise ValueError("an s3 dataset needs aws_bucket_name")
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ValueError("caption_strategy instanceprompt needs instance_prompt")
        if self.caption_strategy == "parquet" and self.parquet is None:
            raise ValueError("caption_strategy parquet needs a parquet: {path, filename_column, caption_column}")
        if self.captioner != CaptionerSpec() and self.caption_strategy != "auto":
            raise ValueError(f"captioner is used only by caption_strategy auto (got {self.caption_strategy!r}): "
                             "set caption_strategy: auto, or remove captioner")
        word = self.trigger_word
        if word is not None and (not word.strip() or TRIGGER_PLACEHOLDER in word):
            raise ValueError(f"trigger_word must be a non-empty word or phrase without {TRIGGER_PLACEHOLDER!r} "
                             f"(got {self.trigger_word!r})")
        if self.archive_suffix and self.caption_strategy == "parquet":
            raise ValueError("an archive dataset cannot use caption_strategy parquet (its manifest names files of a "
                             "folder): use textfile (.txt files in the archive) or auto")
        return self

    @property
    def archive_suffix(self) -> str | None:
        """The archive suffix of instance_data_dir (local) or aws_data_prefix (s3), or None for a folder."""
        where = (self.instance_data_dir or "") if self.type == "local" else self.aws_data_prefix
        return next((x for x in ARCHIVE_SUFFIXES if where.lower().endswith(x)), None)

    @property
    def conditioning_ids(self) -> list[str]:
        c = self.conditioning_data
        return [] if c is None else [c] if isinstance(c, str) else list(c)

    @model_validator(mode="after")
    def _check_conditioning(self) -> DatasetSpec:
        if self.dataset_type != "conditioning":
            if self.conditioning_type is not None:
                raise ValueError("conditioning_type applies to dataset_type conditioning only")
            if len(self.conditioning_ids) > 2:
                raise ValueError("conditioning_data: at most two conditioning datasets per image dataset (a mask "
                                 "dataset and a reference dataset)")
            return self
        if self.conditioning_type is None:
            raise ValueError("a dataset_type conditioning dataset needs conditioning_type (mask, reference_strict or "
                             "reference_loose)")
        if self.conditioning_type == "controlnet":
            raise ValueError("conditioning_type controlnet is not supported (ControlNet training is not built): use "
                             "mask, reference_strict or reference_loose")
        if self.conditioning_data is not None:
            raise ValueError("conditioning_data is set on the image dataset that uses the conditioning images, not on "
                             "the conditioning dataset")
        ignored = [k for k in CONDITIONING_IGNORED_KEYS
                   if getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True)]
        if ignored:
            what = "mask" if self.conditioning_type == "mask" else "reference"
            raise ValueError(f"{', '.join(ignored)}: a {what} dataset takes its crop, bucket and schedule from the "
                             f"image dataset that links it ({what}s have no captions: the image's caption trains): "
                             "set these on the image dataset")
        return self

    @model_validator(mode="after")
    def _refuse_unimplemented(self) -> DatasetSpec:
        """Options the data path would accept and ignore: refused with the reason and what to use instead."""
        if self.is_regularisation_data and self.dataset_type != "image":
            raise ValueError("is_regularisation_data applies to dataset_type image (its samples are trained towards "
                             "the base model's prediction); an eval dataset measures the flow loss: remove one")
        if self.crop_aspect in ("closest", "random"):
            raise ValueError(f"crop_aspect {self.crop_aspect} needs SimpleTuner's crop_aspect_buckets list, which "
                             "the spec does not have: use preserve (aspect buckets) or square (with crop: true)")
        if self.crop_aspect == "square" and not self.crop:
            raise ValueError("crop_aspect square acts only with crop: true (without it every image is scaled to "
                             "its aspect bucket): set crop: true, or crop_aspect: preserve")
        sizes = {"maximum_image_size": self.maximum_image_size, "target_downsample_size": self.target_downsample_size}
        given = [k for k, v in sizes.items() if v is not None]
        if given and not self.crop:
            raise ValueError(f"{' and '.join(given)} act only with crop: true (without it every image is scaled "
                             "to its bucket, so there is nothing to downsample first): set crop: true or remove them")
        if len(given) == 1:
            missing = (set(sizes) - set(given)).pop()
            raise ValueError(f"{given[0]} needs {missing} (images above maximum_image_size are downsampled to "
                             "target_downsample_size before the crop): set both or neither")
        return self


class StorageSpec(_Section):
    """Where s3:// URIs of the cache and output go (AWS, MinIO, R2, moto)."""
    aws_endpoint_url: str | None = None
    aws_region_name: str | None = None
    shared_paths: list[str] = Field(default_factory=list)
    """Absolute directories that every node of the cluster mounts at the same path (NFS, EFS, a PVC).
    On a multi-node cluster a local path in the spec must lie under one of them (flux_ray/placement.py)."""

    @field_validator("shared_paths")
    @classmethod
    def _absolute(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if not p.startswith("/")]
        if bad:
            raise ValueError(f"storage.shared_paths must be absolute directories; got {bad}")
        return [p.rstrip("/") or "/" for p in v]


class CacheSpec(_Section):
    uri: str = "./flux_ray_runs/cache"
    """Local path or s3://bucket/prefix."""
    latent_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    text_embed_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    vae_batch_size: int = Field(4, ge=1)
    vae_bucket_window: int = Field(4, ge=1)
    """Images reach a VAE actor in Ray Data batches of vae_batch_size x this; the actor encodes each aspect
    bucket's images of a batch in batches of vae_batch_size, so mixed-aspect datasets still fill the VAE batch."""
    text_batch_size: int = Field(16, ge=1)
    num_vae_actors: int = Field(1, ge=1)
    num_text_actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0.5, gt=0, le=1)
    """GPU share each encoder actor asks Ray for (``scaling.use_gpu``). 0.5: a VAE actor and a text actor share
    one GPU, so captions are encoded beside the latents; 1 keeps one actor per GPU (many-GPU nodes)."""
    commit_every: int = Field(512, ge=1)
    """Images per committed chunk: a killed job loses at most one chunk of work."""
    min_rows_per_file: int = Field(256, ge=1)
    reader_memory_gib: float = Field(1.0, gt=0)
    """Host memory per training worker for cache data (data/loader.py): the epoch is served in windows of rows
    that fit it (the window served, the one loading, the reads in flight and the ready batches), each row fetched
    once per epoch. The process adds its own ~0.5 GiB (Python, torch): 1.0 kept a worker's peak RSS at 1.6 GiB
    (bench/RESULTS.md, "Training ingest"). Larger windows shuffle more widely; any size trains (a window holds at
    least one caption's images)."""
    decode_concurrency: int | None = Field(None, ge=1)
    """Most decode+crop tasks at once; default: the cluster's CPU count less the CPUs encoders hold."""
    vae_channels_last: bool = False
    """GPU only: run the VAE encoder in channels-last memory format. It pays only with ``compile_encoders``
    (H200, 1024 px bs16: 61 vs 50 images/s compiled; eager it halves the rate); ``bench/cache_bench.py``."""
    compile_encoders: bool = False
    """GPU only: ``torch.compile`` the VAE encoder and T5 in the cache actors (worth it for large datasets: each
    VAE actor compiles one graph, with symbolic sizes, for every bucket; 15-35 s on an H200). T5 is compiled only
    when at least ``T5_COMPILE_MIN_CAPTIONS`` captions are to be encoded. Ignored on CPU."""

    def encoder_compile_backend(self, use_gpu: bool) -> str | None:
        return "inductor" if self.compile_encoders and use_gpu else None

    def text_compile_backend(self, use_gpu: bool, captions: int) -> str | None:
        """``encoder_compile_backend`` for T5, when ``captions`` to encode repay its compile: about 30 s on an
        H200 to save 6 ms a caption (68 against 49 captions/s, bench/RESULTS.md call 10)."""
        return self.encoder_compile_backend(use_gpu) if captions >= T5_COMPILE_MIN_CAPTIONS else None


class FlowSpec(_Section):
    flow_sigmoid_scale: float = 1.0
    flow_use_uniform_schedule: bool = False
    flow_use_beta_schedule: bool = False
    """Sample training sigmas from Beta(flow_beta_schedule_alpha, flow_beta_schedule_beta) (SimpleTuner's option)."""
    flow_beta_schedule_alpha: float = Field(2.0, gt=0)
    flow_beta_schedule_beta: float = Field(2.0, gt=0)
    flow_schedule_shift: float | None = Field(None, gt=0)
    flow_schedule_auto_shift: bool = False
    flux_fast_schedule: bool | None = None
    """schnell's fixed sigmas (1.0 p=.7, else .75/.5/.25); default on for schnell."""
    flux_guidance_mode: Literal["constant", "random-range"] = "constant"
    flux_guidance_value: float = 1.0
    flux_guidance_min: float = 1.0
    flux_guidance_max: float = 4.0
    loss_type: Literal["mse", "huber"] = "mse"
    """``l2`` (SimpleTuner's spelling) is read as ``mse``."""
    huber_c: float = 0.1

    @field_validator("loss_type", mode="before")
    @classmethod
    def _simpletuner_loss_type(cls, v: Any) -> Any:
        return "mse" if v == "l2" else v


class TreadRoute(_Section):
    selection_ratio: float = Field(gt=0.0, lt=1.0)
    """Fraction of the image tokens that skip blocks start..end (text tokens never do)."""
    start_layer_idx: int
    """Block index over the double then the single blocks (FLUX.1: 19 + 38; FLUX.2 [dev]: 8 + 48); negative
    counts from the end."""
    end_layer_idx: int
    """Last routed block, inclusive. Range and overlap are checked against the model when it loads."""

    @model_validator(mode="after")
    def _check_order(self) -> TreadRoute:
        start, end = self.start_layer_idx, self.end_layer_idx
        if (start < 0) == (end < 0) and start > end:
            raise ValueError(f"start_layer_idx ({start}) comes after end_layer_idx ({end})")
        return self


class TreadConfig(_Section):
    routes: list[TreadRoute] = Field(min_length=1)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""``train.dynamo_mode`` values under which torch.compile replays the blocks as CUDA graphs."""


class TrainSpec(_Section):
    max_train_steps: int = Field(100, ge=1)
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    optimizer: Literal["adamw", "adamw_bf16", "optimi-lion", "optimi-stableadamw", "bnb-adamw8bit",
                       "bnb-lion8bit", "bnb-lion8bit-paged"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial", "sine"] = "constant"
    """diffusers' ``get_scheduler`` curves by name; ``sine`` is SimpleTuner's: a sine wave of period
    2 x lr_warmup_steps between 0 and learning_rate (train/optim.py)."""
    lr_warmup_steps: int = Field(0, ge=0)
    lr_num_cycles: int = Field(1, ge=1)
    """cosine_with_restarts: hard restarts over the run (diffusers' num_cycles; SimpleTuner's lr_num_cycles)."""
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["bf16", "no"] = "bf16"
    gradient_checkpointing: bool = False
    gradient_checkpointing_interval: int = Field(1, ge=1)
    seed: int = 42
    checkpointing_steps: int = Field(50, ge=1)
    checkpoints_total_limit: int = Field(2, ge=1)
    resume_from_checkpoint: str | None = "latest"
    """latest | a checkpoint path | null (start fresh)."""
    flux_attention_masked_training: bool = False
    attention_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    """auto: flash on CUDA (the default cuDNN choice crashed on H200), math on CPU. cudnn is the fastest
    measured (bench/RESULTS.md) but crashed in eager mode on an H200, so it needs compile: true."""
    compile: bool = False
    dynamo_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = "default"
    """With compile: ``torch.compile``'s mode for the blocks (accelerate's / SimpleTuner's ``dynamo_mode``).
    reduce-overhead replays each compiled block as a CUDA graph: the bs1 step is host-bound and ran 2x faster
    (H200, 512 px bs1 0.248 -> 0.126 s/step, the same losses; bench/RESULTS.md call 25). GPU workers with
    strategy ddp (several sync by one flat all-reduce: scaling.gradient_sync), a bf16 or fp8 base; the validation
    pipeline then runs the blocks eagerly."""
    compile_cache: bool = True
    """With compile: share torch.compile's artifacts through ``<cache.uri>/compile/``: rank 0 uploads them after
    any step that compiled something new (the first; a later bucket's shape), and a later run or trial with the
    same model, options and software on the same kind of device hot-loads them before compiling, so a fresh node
    skips inductor's codegen (train/compile_cache.py)."""
    tread_config: TreadConfig | None = None
    """TREAD token routing (SimpleTuner's option): training forwards only; eval loss and validation run
    every token. Works with flux_attention_masked_training (the mask is routed too), checkpointing, compile."""
    log_every: int = Field(10, ge=1)
    """Report metrics every n steps (a Ray Train report costs up to one controller poll)."""

    @property
    def uses_cuda_graphs(self) -> bool:
        """The blocks are compiled in a mode that replays CUDA graphs (torch's cudagraph trees)."""
        return self.compile and self.dynamo_mode in CUDA_GRAPH_MODES

    @model_validator(mode="after")
    def _check_lr_schedule(self) -> TrainSpec:
        if self.lr_scheduler == "sine" and self.lr_warmup_steps == 0:
            raise ValueError("train.lr_scheduler sine takes its period from train.lr_warmup_steps (as SimpleTuner's "
                             "does): set lr_warmup_steps > 0")
        if self.lr_num_cycles != 1 and self.lr_scheduler != "cosine_with_restarts":
            raise ValueError(f"train.lr_num_cycles acts only with lr_scheduler cosine_with_restarts (got "
                             f"{self.lr_scheduler!r}): remove it or use cosine_with_restarts")
        return self

    @model_validator(mode="after")
    def _check_attention(self) -> TrainSpec:
        if self.dynamo_mode != "default" and not self.compile:
            raise ValueError(f"train.dynamo_mode {self.dynamo_mode} needs train.compile: true")
        if self.attention_backend == "cudnn" and not self.compile:
            raise ValueError("train.attention_backend cudnn needs train.compile: true (eager cuDNN attention crashed "
                             "a Flux step on an H200, bench/RESULTS.md call 7); use flash or auto without compile")
        return self


CLIP_EVAL_DEFAULT = "openai/clip-vit-large-patch14-336"
"""SimpleTuner's default ``pretrained_evaluation_model_name_or_path``."""


class EvalSpec(_Section):
    eval_steps_interval: int | None = Field(None, ge=1)
    eval_split_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of training images held out for eval when no dataset_type: eval exists."""
    eval_timesteps: int = Field(28, ge=1)
    eval_seed: int = 0
    validation_step_interval: int | None = Field(None, ge=1)
    validation_prompt: str | None = None
    user_prompt_library: str | None = None
    validation_resolution: str = "1024x1024"
    validation_num_inference_steps: int = Field(20, ge=1)
    validation_guidance: float = 3.0
    validation_guidance_real: float = 1.0
    validation_negative_prompt: str = ""
    validation_seed: int = 42
    evaluation_type: Literal["none", "clip"] = "none"
    """SimpleTuner's key. ``clip``: score every validation image against its prompt with a CLIP model (CLIP score,
    torchmetrics' definition: 100 * max(cos(image, text), 0)), logged as ``clip_score`` (mean) and
    ``clip_score/<nickname>-WxH``; usable as ``tune.metric: clip_score``."""
    pretrained_evaluation_model_name_or_path: str = CLIP_EVAL_DEFAULT
    """SimpleTuner's key: the CLIP model (a transformers CLIPModel folder or hub id; default SimpleTuner's) read
    with evaluation_type: clip."""
    validation_reference_image: str | None = None
    """model_flavour kontext: the image that validation edits (FluxKontextPipeline's ``image``), resized to each
    validation size. flux_ray's own key: SimpleTuner samples its references from the datasets instead."""

    @field_validator("validation_resolution")
    @classmethod
    def _parse_res(cls, v: str) -> str:
        for item in v.split(","):
            parts = item.strip().lower().split("x")
            if len(parts) == 1:
                parts = parts * 2
            if len(parts) != 2 or not all(p.isdigit() and int(p) % 16 == 0 and int(p) > 0 for p in parts):
                raise ValueError(f"'{item}' is not WxH with sides that are multiples of 16")
        return v

    @model_validator(mode="after")
    def _check_evaluation(self) -> EvalSpec:
        if self.evaluation_type == "clip":
            if not self.validation_step_interval or not (self.validation_prompt or self.user_prompt_library):
                raise ValueError("eval.evaluation_type clip scores validation images, which are never rendered: set "
                                 "eval.validation_step_interval and eval.validation_prompt (or user_prompt_library)")
        elif self.pretrained_evaluation_model_name_or_path != CLIP_EVAL_DEFAULT:
            raise ValueError("eval.pretrained_evaluation_model_name_or_path is read only with eval.evaluation_type: "
                             "clip; set it, or remove the model")
        return self

    @property
    def validation_sizes(self) -> list[tuple[int, int]]:
        out = []
        for item in self.validation_resolution.split(","):
            parts = item.strip().lower().split("x")
            w, h = (int(parts[0]), int(parts[-1]))
            out.append((w, h))
        return out


class ScalingSpec(_Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    deepspeed_config: dict[str, Any] | None = None
    max_failures: int = Field(0, ge=-1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement of the training workers (Ray Train's ScalingConfig); STRICT_SPREAD: one worker per node."""
    gradient_sync: Literal["auto", "ddp", "allreduce"] = "auto"
    """How several ddp workers average their LoRA gradients. ddp: torch's DistributedDataParallel wrapper (bucketed
    all-reduces from autograd hooks during the backward). allreduce: no wrapper; the trainable parameters are
    broadcast from rank 0 at the start, and after each step's last backward every trainable gradient goes through
    one all-reduce of one flat buffer (train/stepper.py ``FlatAllReduceStepper``). auto: allreduce with a CUDA-graph
    ``train.dynamo_mode`` and num_workers > 1 (two DDP workers under CUDA graphs gave no first report in the run's
    time, bench/RESULTS.md call 33), ddp otherwise. strategy fsdp / deepspeed sync their own way: only auto goes with them."""


class TrackingSpec(_Section):
    mlflow_tracking_uri: str | None = None
    """Default: a local MLflow store under the run's output directory."""
    experiment_name: str = "flux_ray"
    register_model_name: str | None = None


ExportFormat = Literal["diffusers", "comfyui", "kohya"]


class PublishSpec(_Section):
    """Where the finished LoRA is delivered (publish/): its files, a model card (README.md) and the validation grid."""
    uri: str | None = None
    """A storage prefix (s3://bucket/prefix or a local folder); the run goes to <uri>/<name>/."""
    hub_model_id: str | None = None
    """A Hugging Face Hub model repo (SimpleTuner's name), created if missing; the token comes from HF_TOKEN."""
    hub_private: bool = True
    """Create the Hub repo private."""
    formats: list[ExportFormat] | None = None
    """LoRA formats to publish (each must be in output.export_formats); default: every exported format."""


class OutputSpec(_Section):
    uri: str = "./flux_ray_runs/output"
    """Runs go to <uri>/<name>: LoRA, checkpoints, validation images, run_summary.json."""
    export_formats: list[ExportFormat] = Field(default_factory=lambda: ["diffusers"])
    publish: PublishSpec = Field(default_factory=PublishSpec)

    @model_validator(mode="after")
    def _check_publish(self) -> OutputSpec:
        missing = sorted(set(self.publish.formats or []) - set(self.export_formats))
        if missing:
            raise ValueError(f"output.publish.formats {missing} are not exported: add them to output.export_formats")
        if self.publish.hub_model_id is not None and self.publish.hub_model_id.count("/") != 1:
            raise ValueError(f"output.publish.hub_model_id {self.publish.hub_model_id!r}: expected 'owner/name'")
        return self


class NotifySpec(_Section):
    """Webhook events (notify/): started, validation, checkpoint, finished, failed; delivered in the background."""
    webhook_url: str | None = None
    """Where events are POSTed; never logged (a Discord or Slack URL holds its token)."""
    webhook_type: Literal["raw", "discord", "slack"] = "raw"
    """raw: generic JSON (SimpleTuner's name); discord: message + validation image as multipart; slack: text."""
    message_prefix: str | None = None
    """Put before every message (SimpleTuner's name); default: the job's name."""
    webhook_max_retries: int = Field(5, ge=0)
    """Retries of a failed delivery, with exponential backoff (1 s, 2 s, 4 s ... up to 60 s)."""

    @field_validator("webhook_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v


class SearchDimension(_Section):
    type: Literal["loguniform", "uniform", "choice", "randint", "grid"]
    lower: float | None = None
    upper: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchDimension:
        if self.type in ("choice", "grid") and not self.values:
            raise ValueError(f"{self.type} needs values")
        if self.type in ("loguniform", "uniform", "randint") and (self.lower is None or self.upper is None):
            raise ValueError(f"{self.type} needs lower and upper")
        if self.lower is not None and self.upper is not None and not self.lower < self.upper:
            raise ValueError(f"lower ({self.lower}) must be below upper ({self.upper})")
        if self.type == "loguniform" and self.lower is not None and self.lower <= 0:
            raise ValueError(f"loguniform needs lower > 0 (got {self.lower})")
        return self


class TuneSpec(_Section):
    param_space: dict[str, SearchDimension] = Field(default_factory=dict)
    """Dotted spec key -> distribution, e.g. train.learning_rate: {type: loguniform, lower, upper}."""
    num_samples: int = Field(4, ge=1)
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    search_alg: Literal["random", "optuna", "hyperopt", "bayesopt"] = "random"
    max_concurrent_trials: int | None = Field(None, ge=1)
    reuse_actors: bool | None = None
    """Ray Tune's TuneConfig(reuse_actors): a one-worker trial trains in its Tune actor, which the next trial
    reuses with its loaded, compiled model (same model and LoRA structure). None: on when
    scaling.num_workers is 1; false: every trial runs its own TorchTrainer."""


class JobSpec(_Section):
    name: str = Field("flux-lora", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelSpec = Field(default_factory=ModelSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    datasets: list[DatasetSpec] = Field(min_length=1)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    flow: FlowSpec = Field(default_factory=FlowSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    notify: NotifySpec = Field(default_factory=NotifySpec)
    tune: TuneSpec | None = None

    @model_validator(mode="after")
    def _check_job(self) -> JobSpec:
        if self.train.mixed_precision == "no" and self.model.base_model_default_dtype == "bf16" \
                and self.model.base_model_precision == "no_change":
            raise ValueError("train.mixed_precision 'no' runs the step in fp32, but model.base_model_default_dtype is "
                             "bf16 (the first matmul would mix dtypes): set train.mixed_precision bf16, or "
                             "model.base_model_default_dtype fp32")
        if self.tune and self.tune.reuse_actors and self.scaling.num_workers > 1:
            raise ValueError(f"tune.reuse_actors: true needs one-worker trials (scaling.num_workers is "
                             f"{self.scaling.num_workers}): a multi-worker trial runs its own TorchTrainer; "
                             "remove tune.reuse_actors or set scaling.num_workers: 1")
        ids = [d.id for d in self.datasets]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"dataset ids must be unique; repeated: {sorted(dup)}")
        if not [d for d in self.datasets if not d.disabled and d.dataset_type == "image"]:
            raise ValueError("no enabled dataset with dataset_type: image")
        if self.lora.lora_init_type == "loftq" and self.model.base_model_precision != "no_change":
            raise ValueError("lora.lora_init_type loftq cannot be used with a quantized base "
                             f"(model.base_model_precision={self.model.base_model_precision})")
        if self.flow.flow_use_uniform_schedule and self.flow.flow_use_beta_schedule:
            raise ValueError("flow.flow_use_uniform_schedule and flow.flow_use_beta_schedule are exclusive")
        beta_keys = ("flow_beta_schedule_alpha", "flow_beta_schedule_beta")
        if not self.flow.flow_use_beta_schedule and any(getattr(self.flow, k) != 2.0 for k in beta_keys):
            raise ValueError("flow.flow_beta_schedule_alpha / _beta act only with flow.flow_use_beta_schedule: true")
        if self.lora.lora_type == "lycoris":
            if self.scaling.strategy == "fsdp":
                raise ValueError("lora.lora_type lycoris cannot be trained with scaling.strategy fsdp (use ddp)")
            if set(self.output.export_formats) - {"diffusers"}:
                raise ValueError("output.export_formats: a lycoris adapter is saved in LyCORIS's own format only; "
                                 "remove comfyui/kohya")
            if self.lora.lora_init_type != "default":
                raise ValueError("lora.lora_init_type applies to lora_type standard only")
        if self.lora.lora_type == "lycoris":
            changed = [k for k in LYCORIS_IGNORED_LORA_KEYS
                       if getattr(self.lora, k) != LoraSpec.model_fields[k].get_default(call_default_factory=True)]
            if changed:
                raise ValueError(f"lora.{', lora.'.join(changed)}: LyCORIS takes its shape, targets and scale from "
                                 "lora.lycoris_config (e.g. linear_dim, linear_alpha, factor, dropout), so these "
                                 "would be ignored: remove them, or use lora.lora_type standard")
        self._check_conditioning_links()
        image_sets = self.enabled_datasets("image")
        if all(d.is_regularisation_data for d in image_sets):
            raise ValueError("every enabled image dataset has is_regularisation_data: true, so the adapter would only "
                             "learn to stay the base model: add a dataset of the images to learn")
        init = self.lora.lora_init_type
        if any(d.is_regularisation_data for d in image_sets) and init in ("pissa", "olora", "loftq"):
            raise ValueError(f"is_regularisation_data cannot be used with lora.lora_init_type {init}: that init "
                             "moves part of the base weights into the adapter, so the adapter-off model "
                             "is not the base model; use lora_init_type default or gaussian")
        self._check_kontext()
        self._check_family()
        if self.flow.flow_schedule_auto_shift and self.flow.flow_schedule_shift is not None:
            raise ValueError("flow.flow_schedule_shift is ignored when flow.flow_schedule_auto_shift is true (the "
                             "shift then follows each image's resolution): set one or the other")
        if self.eval.eval_steps_interval and self.eval.eval_split_fraction == 0 \
                and not self.enabled_datasets("eval"):
            raise ValueError("eval.eval_steps_interval needs eval data: set eval.eval_split_fraction (e.g. 0.1) or "
                             "add a dataset with dataset_type: eval, or remove eval.eval_steps_interval")
        if self.scaling.strategy == "deepspeed" and not self.scaling.deepspeed_config:
            self.scaling.deepspeed_config = {"zero_optimization": {"stage": 2}}
        return self

    def _check_conditioning_links(self) -> None:
        """Every conditioning_data names an enabled mask dataset, and every mask dataset is used."""
        by_id = {d.id: d for d in self.datasets}
        linked = set()
        for d in self.datasets:
            for cid in d.conditioning_ids:
                target = by_id.get(cid)
                if target is None or target.dataset_type != "conditioning":
                    raise ValueError(f"dataset {d.id!r}: conditioning_data {cid!r} is not the id of a dataset with "
                                     "dataset_type conditioning")
                if target.disabled and not d.disabled:
                    raise ValueError(f"dataset {d.id!r}: its conditioning dataset {cid!r} is disabled")
                linked.add(cid)
        unused = [d.id for d in self.enabled_datasets("conditioning") if d.id not in linked]
        if unused:
            raise ValueError(f"conditioning datasets {unused} are not linked by any image dataset's conditioning_data,"
                             " so they would be ignored: link them or remove them")

        for d in self.datasets:
            kinds = [by_id[c].conditioning_type.split("_")[0] for c in d.conditioning_ids]
            if len(set(kinds)) < len(kinds):
                raise ValueError(f"dataset {d.id!r}: conditioning_data links two {kinds[0]} datasets; link one mask "
                                 "dataset and/or one reference dataset")

    def _check_family(self) -> None:
        """Per-family LoRA presets; FLUX.1-only options refused for FLUX.2."""
        family, target = self.model.model_family, self.lora.flux_lora_target
        self.lora._family = family
        if target not in FAMILY_LORA_PRESETS[family]:
            raise ValueError(f"lora.flux_lora_target {target!r} is not a preset of model_family {family} "
                             f"({FAMILY_TITLES[family]}): choose one of " + ", ".join(FAMILY_LORA_PRESETS[family]))
        bad = FAMILY_UNSUPPORTED[family](self)
        if bad:
            raise ValueError(f"model.model_family {family} does not support {'; '.join(bad)} yet (FLUX.1 only, or "
                             "not wired for FLUX.2): remove them. FLUX.2 LoRAs export in diffusers format only "
                             "(ComfyUI reads it directly: comfy/lora.py model_lora_keys_unet)")

    def _check_kontext(self) -> None:
        """Kontext trains on (image, reference) pairs; references mean nothing to the other flavours."""
        kontext = self.model.model_flavour == "kontext"
        latent_sets = [d for d in self.datasets if not d.disabled and d.dataset_type != "conditioning"]
        if not kontext:
            linked = [d.id for d in latent_sets if self.reference_dataset(d) is not None]
            if linked:
                raise ValueError(f"datasets {linked} link reference (conditioning) images, which only Kontext reads: "
                                 "set model.model_flavour kontext, or remove the reference datasets")
            if self.eval.validation_reference_image:
                raise ValueError("eval.validation_reference_image is the reference image of Kontext validation: set "
                                 "model.model_flavour kontext, or remove it")
            return
        missing = [d.id for d in latent_sets if self.reference_dataset(d) is None]
        if missing:
            raise ValueError(f"model.model_flavour kontext: datasets {missing} link no reference dataset; Kontext "
                             "trains on (edited image, reference image) pairs: add a dataset_type conditioning dataset "
                             "with conditioning_type reference_strict (or reference_loose) and name it in each one's "
                             "conditioning_data")
        if self.train.tread_config is not None:
            raise ValueError("train.tread_config with model_flavour kontext: TREAD's token routing does not know the "
                             "reference tokens yet; remove train.tread_config")
        loose = [d.id for d in latent_sets if self.reference_dataset(d).conditioning_type == "reference_loose"]
        if loose and self.train.train_batch_size > 1:
            raise ValueError(f"datasets {loose}: reference_loose references have their own aspect buckets, so a batch "
                             "of several images cannot hold their references in one tensor: use "
                             "train.train_batch_size 1 (with gradient_accumulation_steps), or reference_strict")
        ev = self.eval
        if ev.validation_step_interval and (ev.validation_prompt or ev.user_prompt_library) \
                and not ev.validation_reference_image:
            raise ValueError("model.model_flavour kontext: validation edits a reference image; set "
                             "eval.validation_reference_image (an image file), or remove eval.validation_step_interval")
        ref = ev.validation_reference_image
        if ref and not ref.startswith("s3://") and not os.path.isfile(os.path.expanduser(ref)):
            raise ValueError(f"eval.validation_reference_image {ref!r}: no such file")

    def _conditioning_dataset(self, ds: DatasetSpec, types: tuple[str, ...]) -> DatasetSpec | None:
        by_id = {d.id: d for d in self.datasets}
        return next((by_id[c] for c in ds.conditioning_ids if c in by_id and by_id[c].conditioning_type in types), None)

    def mask_dataset(self, ds: DatasetSpec) -> DatasetSpec | None:
        """The mask (conditioning) dataset an image or eval dataset links, or None."""
        return self._conditioning_dataset(ds, ("mask",))

    def reference_dataset(self, ds: DatasetSpec) -> DatasetSpec | None:
        """The Kontext reference (conditioning) dataset an image or eval dataset links, or None."""
        return self._conditioning_dataset(ds, ("reference_strict", "reference_loose"))

    def latent_datasets(self) -> list[DatasetSpec]:
        """Enabled datasets whose images are VAE-encoded (image and eval; not conditioning)."""
        return [d for d in self.enabled_datasets() if d.dataset_type != "conditioning"]

    @model_validator(mode="after")
    def _check_fp8_compute(self) -> JobSpec:
        """FP8 compute (core/fp8.py) runs on FP8 tensor cores, with DDP, on PEFT LoRA layers."""
        if self.model.base_compute_dtype != "fp8":
            return self
        key = "model.base_compute_dtype fp8"
        if not self.scaling.use_gpu:
            raise ValueError(f"{key} needs GPUs with FP8 tensor cores (compute capability 8.9+); "
                             "scaling.use_gpu is false (use model.base_compute_dtype: bf16 on a CPU)")
        if self.scaling.strategy != "ddp":
            raise ValueError(f"{key} cannot be used with scaling.strategy {self.scaling.strategy} (the base is "
                             "replicated, its FP8 weights are frozen parameters; use ddp)")
        if self.lora.lora_type != "standard":
            raise ValueError(f"{key} needs lora.lora_type standard (LyCORIS calls each Linear's own forward, "
                             "captured before the base is converted)")
        return self

    @property
    def syncs_gradients_by_allreduce(self) -> bool:
        """Several workers average gradients with one flat all-reduce per step, not a DDP wrapper
        (``scaling.gradient_sync`` allreduce, or auto under CUDA graphs)."""
        sync = self.scaling.gradient_sync
        if self.scaling.num_workers == 1 or self.scaling.strategy != "ddp":
            return False
        return sync == "allreduce" or (sync == "auto" and self.train.uses_cuda_graphs)

    @model_validator(mode="after")
    def _check_gradient_sync(self) -> JobSpec:
        sync = self.scaling.gradient_sync
        if sync != "auto" and self.scaling.strategy != "ddp":
            raise ValueError(f"scaling.gradient_sync {sync} cannot be used with scaling.strategy "
                             f"{self.scaling.strategy} (FSDP and DeepSpeed reduce the gradients themselves): remove "
                             "scaling.gradient_sync (auto) or use scaling.strategy ddp")
        return self

    @model_validator(mode="after")
    def _check_cuda_graphs(self) -> JobSpec:
        """CUDA-graph modes replay each block's kernels with fixed addresses: refused where that was not measured
        or cannot hold (weights moved or gathered per step, tensor-subclass weights, routed token counts). Several
        workers sync gradients with one flat all-reduce after the backward (``syncs_gradients_by_allreduce``), not
        DDP's hooks inside it."""
        if not self.train.uses_cuda_graphs:
            return self
        key = f"train.dynamo_mode {self.train.dynamo_mode}"
        refusals = [
            (not self.scaling.use_gpu, "scaling.use_gpu is false (CUDA graphs need GPUs; inductor would skip them "
                                       "on a CPU without a word)"),
            (self.scaling.strategy != "ddp", f"scaling.strategy is {self.scaling.strategy} (FSDP gathers and "
                                             "DeepSpeed manages the weights per step outside the graphs; use ddp)"),
            (self.scaling.num_workers > 1 and self.scaling.gradient_sync == "ddp",
             f"scaling.num_workers is {self.scaling.num_workers} with scaling.gradient_sync ddp (two DDP workers "
             "under CUDA graphs gave no first report within the run's time on 2 H200s, bench/RESULTS.md call 33; use "
             "gradient_sync auto or allreduce: one flat all-reduce after the backward)"),
            (self.model.base_model_precision != "no_change", f"model.base_model_precision is "
                                                             f"{self.model.base_model_precision} (quantised weights "
                                                             "are not measured under CUDA graphs)"),
            (self.model.enable_group_offload, "model.enable_group_offload moves the weights between devices"),
            (self.train.tread_config is not None, "train.tread_config routes a different token set each step "
                                                  "(not measured under CUDA graphs)"),
        ]
        for refused, why in refusals:
            if refused:
                raise ValueError(f"{key} cannot be used here: {why}; use train.dynamo_mode default or "
                                 "max-autotune-no-cudagraphs")
        return self

    @model_validator(mode="after")
    def _check_group_offload(self) -> JobSpec:
        """Group offload (core/offload.py) is single-process, eager, and needs recomputation to save memory."""
        if not self.model.enable_group_offload:
            return self
        key = "model.enable_group_offload"
        if self.scaling.strategy != "ddp":
            raise ValueError(f"{key} cannot be used with scaling.strategy {self.scaling.strategy} "
                             "(it shards and places the weights itself)")
        if self.scaling.num_workers > 1:
            raise ValueError(f"{key} runs on one worker (scaling.num_workers={self.scaling.num_workers}): DDP "
                             "broadcasts every parameter and wants them all on one device type")
        if not self.train.gradient_checkpointing:
            raise ValueError(f"{key} needs train.gradient_checkpointing: without recomputation autograd keeps "
                             "every block's weights for backward, so the base never leaves the GPU")
        if self.train.compile:
            raise ValueError(f"{key} cannot be used with train.compile (the offload hooks run eagerly)")
        if self.lora.lora_init_type in ("pissa", "olora", "loftq"):
            raise ValueError(f"{key} cannot be used with lora.lora_init_type {self.lora.lora_init_type} "
                             "(it rewrites base weights that are already offloaded)")
        return self

    @model_validator(mode="after")
    def _check_trigger_words(self) -> JobSpec:
        words = self.trigger_words
        if len(words) > 1 and any(TRIGGER_PLACEHOLDER in p for p in [self.eval.validation_prompt or ""]):
            raise ValueError(f"eval.validation_prompt has {TRIGGER_PLACEHOLDER} but the image datasets have several "
                             f"trigger_word values {words}: write the word into the prompt")
        return self

    @property
    def trigger_words(self) -> list[str]:
        """The distinct trigger words of the enabled image datasets, in dataset order."""
        return list(dict.fromkeys(d.trigger_word for d in self.enabled_datasets("image") if d.trigger_word))

    @property
    def validation_trigger_word(self) -> str | None:
        """The trigger word put into validation prompts: the image datasets' one, when they agree."""
        words = self.trigger_words
        return words[0] if len(words) == 1 else None

    @property
    def run_uri(self) -> str:
        return self.output.uri.rstrip("/") + "/" + self.name

    @property
    def fast_schedule(self) -> bool:
        f = self.flow.flux_fast_schedule
        return self.model.model_flavour == "schnell" if f is None else f

    def enabled_datasets(self, dataset_type: str | None = None) -> list[DatasetSpec]:
        return [d for d in self.datasets if not d.disabled and (dataset_type is None or d.dataset_type == dataset_type)]


# ---------------------------------------------------------------- loading, overrides, output

def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        given = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return f"invalid job spec {source}:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a','b'], yaml-parsed value)."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.learning_rate=1e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def set_dotted(data: dict, path: list[str], value: Any) -> None:
    """Set data[a][b]... = value; list items are addressed by index or by dataset id."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, path[: i + 1])
        else:
            node = node.setdefault(part, {})
    last = path[-1]
    if isinstance(node, list):
        idx = [j for j, d in enumerate(node) if str(j) == last or (isinstance(d, dict) and d.get("id") == last)]
        if not idx:
            raise SpecError(f"--set {'.'.join(path)}: no list item {last!r}")
        node[idx[0]] = value
    else:
        node[last] = value


def _list_item(items: list, part: str, path: list[str]) -> Any:
    for j, d in enumerate(items):
        if str(j) == part or (isinstance(d, dict) and d.get("id") == part):
            return d
    raise SpecError(f"--set {'.'.join(path)}: no list item {part!r} (use an index or a dataset id)")


def load_spec(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
              data: dict | None = None, check_paths: bool = True) -> JobSpec:
    """Read a YAML spec (or a dict), apply `a.b=value` overrides, validate; raises SpecError."""
    source = str(path) if path else "(dict)"
    if data is None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SpecError(f"cannot read job spec {source}: {e.strerror}") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise SpecError(f"job spec {source} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SpecError(f"job spec {source}: the top level must be a mapping of sections")
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    for item in overrides or []:
        keys, value = parse_override(item)
        set_dotted(data, keys, value)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(e, source)) from None
    if check_paths:
        check_local_inputs(spec, source)
    return absolutize(spec)


def check_local_inputs(spec: JobSpec, source: str = "") -> None:
    """Fail before Ray starts when a local dataset or model folder is missing or empty."""
    for i, d in enumerate(spec.datasets):
        if d.disabled or d.type != "local" or d.make_demo_if_missing and not Path(d.instance_data_dir).exists():
            continue
        where = f"datasets.{i}.instance_data_dir"
        p = Path(d.instance_data_dir)
        if d.archive_suffix:
            if not p.is_file():
                raise SpecError(f"invalid job spec {source}:\n  {where}: archive {str(p)!r} does not exist")
            continue
        if not p.is_dir():
            raise SpecError(f"invalid job spec {source}:\n  {where}: directory {str(p)!r} does not exist")
        if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in p.rglob("*") if f.is_file()):
            raise SpecError(f"invalid job spec {source}:\n  {where}: directory {str(p)!r} holds no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
        if d.caption_strategy == "parquet" and d.parquet and not Path(d.parquet.path).exists() \
                and "://" not in d.parquet.path:
            raise SpecError(f"invalid job spec {source}:\n  datasets.{i}.parquet.path: {d.parquet.path!r} "
                            "does not exist")
    m = spec.model
    base = m.base_path
    looks_local = base.startswith((".", "/", "~")) or os.path.exists(base)
    if looks_local and not os.path.exists(base) and not m.make_tiny_if_missing:
        raise SpecError(f"invalid job spec {source}:\n  model.pretrained_model_name_or_path: {base!r} does not exist")


def spec_to_yaml(spec: JobSpec, redact: bool = False) -> str:
    """The effective spec with every default filled in; ``redact`` drops secret values (to log it: the logged spec
    still loads, e.g. for ``flux-ray export``, without them)."""
    data = spec.model_dump(mode="json")
    return yaml.safe_dump(_masked(data) if redact else data, sort_keys=False)


def _masked(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: None if is_secret_key(k) else _masked(v) for k, v in data.items()}
    return [_masked(x) for x in data] if isinstance(data, list) else data


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b': v}; keys that look secret are dropped."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            if is_secret_key(k):
                continue
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        for i, v in enumerate(data):
            key = v.get("id", i) if isinstance(v, dict) else i
            out.update(flatten(v, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = data
    return out


def flat_params(spec: JobSpec) -> dict[str, Any]:
    """The effective spec flattened for MLflow params (no credentials)."""
    return flatten(spec.model_dump(mode="json", exclude={"tune"}))


def _abs(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    if path.startswith((".", "~", "/")) or os.path.exists(path):
        return str(Path(path).expanduser().resolve())
    return path  # a hub id


def absolutize(spec: JobSpec) -> JobSpec:
    """Local relative paths -> absolute, so Ray workers (other working dirs) see the same files.

    Inside a Ray job, relative outputs and generated inputs resolve against $FLUX_RAY_HOME instead of
    the job's working directory, which Ray deletes (flux_ray/job_home.py)."""
    from flux_ray.job_home import output_base, resolve_generated, resolve_output

    base = output_base()
    spec.cache.uri = resolve_output(spec.cache.uri, base)
    spec.output.uri = resolve_output(spec.output.uri, base)
    m = spec.model
    if m.make_tiny_if_missing and m.pretrained_model_name_or_path \
            and m.pretrained_model_name_or_path.startswith("."):
        m.pretrained_model_name_or_path = resolve_generated(m.pretrained_model_name_or_path, base)
    for d in spec.datasets:
        if d.type == "local" and d.make_demo_if_missing:
            d.instance_data_dir = resolve_generated(d.instance_data_dir, base)
    for key in ("pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path",
                "pretrained_vae_model_name_or_path", "assistant_lora_path", "group_offload_to_disk_path"):
        setattr(m, key, _abs(getattr(m, key)))
    for d in spec.datasets:
        d.instance_data_dir = _abs(d.instance_data_dir) if d.type == "local" else d.instance_data_dir
        if d.parquet:
            d.parquet.path = _abs(d.parquet.path)
        if d.captioner.output_parquet:
            d.captioner.output_parquet = _abs(d.captioner.output_parquet)
        d.captioner.model_name = _abs(d.captioner.model_name)
    spec.cache.uri = _abs(spec.cache.uri)
    spec.output.uri = _abs(spec.output.uri)
    spec.lora.init_lora = _abs(spec.lora.init_lora)
    spec.eval.user_prompt_library = _abs(spec.eval.user_prompt_library)
    if spec.train.resume_from_checkpoint not in (None, "latest"):
        spec.train.resume_from_checkpoint = _abs(spec.train.resume_from_checkpoint)
    return spec
