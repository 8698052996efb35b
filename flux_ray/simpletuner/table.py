"""The SimpleTuner -> flux_ray key table: every key the importer knows, and what becomes of it.

One row per SimpleTuner key (``config.json`` trainer arguments without their ``--``, and the
``multidatabackend.json`` dataset keys). A row maps the key to a flux_ray spec key (``map``), drops it
because flux_ray has its own mechanism (``drop``), or reports it as not supported yet (``unsupported``),
always with a reason. Keys absent from the table are reported as not supported yet too, so nothing
is dropped silently. Key list: SimpleTuner's documentation/OPTIONS.md, DATALOADER.md and
quickstart/FLUX.md (bghira/SimpleTuner at bc8e6ab, 2026-08-22).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from flux_ray.simpletuner.values import (Context, as_bool, as_dict, as_float, as_int, as_str, as_str_list, choice,
                                         dataset_id, dataset_type_backend, instance_data_dir, max_train_steps,
                                         megapixels_to_edge, model_family, model_path, model_type, num_train_epochs,
                                         only_instance_prompt, optional_size, parquet_manifest, prompt_library,
                                         read_json_file, resolution_type, resolve_path,
                                         resume_from_checkpoint, run_name, same, validation_disable,
                                         validation_resolution)
from flux_ray.spec import FLAVOUR_HUB_IDS, LORA_TARGET_PRESETS


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Rule:
    key: str
    """SimpleTuner key (without ``--``)."""
    scope: str
    """``config`` (config.json), ``dataset`` (a multidatabackend.json entry) or ``dataset+config`` (a dataset
    key that config.json may also set, as the default for every dataset)."""
    action: str
    """``map`` | ``drop`` | ``unsupported``."""
    target: str = ""
    """flux_ray dotted key; for dataset rules the key inside the dataset."""
    parse: Callable[[Any, Context], Any] = as_str
    convert: Callable[[Any, Context], Any] | None = None
    note: str = ""
    """drop / unsupported: the reason. map: what the conversion does, if it changes the value."""


def M(key, target, parse=as_str, convert=None, note="", scope="config") -> Rule:  # noqa: N802
    return Rule(key, scope, "map", target, parse, convert, note)


def D(key, note, scope="config") -> Rule:  # noqa: N802
    return Rule(key, scope, "drop", note=note)


def U(key, note, scope="config") -> Rule:  # noqa: N802
    return Rule(key, scope, "unsupported", note=note)


DS, DC = "dataset", "dataset+config"
CACHE = "flux_ray caches VAE latents and text embeddings itself, content-addressed under cache.uri"
NO_EMA = "flux_ray has no EMA of the LoRA weights yet"
NO_HUB = ("not converted: set output.publish.hub_model_id (final LoRA, model card and validation grid; "
          "no checkpoint pushes)")
TRACKING = "flux_ray logs to MLflow (tracking section)"
VALIDATION = "flux_ray's validation renders eval.validation_prompt / user_prompt_library only"
QUANTIZED = ("no_change", "int8-quanto", "int4-quanto", "int2-quanto", "nf4-bnb", "int8-torchao", "fp8-torchao")
OPTIMIZERS = ("adamw_bf16", "optimi-lion", "optimi-stableadamw", "bnb-adamw8bit", "bnb-lion8bit", "bnb-lion8bit-paged")

TABLE: tuple[Rule, ...] = (
    # model
    M("model_family", "model.model_family", convert=model_family),
    M("model_type", "", convert=model_type),
    M("model_flavour", "model.model_flavour", convert=choice(
        same(*FLAVOUR_HUB_IDS), "flavour {value!r}: flux_ray knows {known}; set model.pretrained_model_name_or_path")),
    M("pretrained_model_name_or_path", "model.pretrained_model_name_or_path", convert=model_path),
    M("revision", "model.revision"),
    M("pretrained_transformer_model_name_or_path", "model.pretrained_transformer_model_name_or_path",
      convert=model_path),
    M("pretrained_transformer_subfolder", "model.pretrained_transformer_subfolder"),
    M("pretrained_vae_model_name_or_path", "model.pretrained_vae_model_name_or_path", convert=model_path),
    M("base_model_precision", "model.base_model_precision", convert=choice(
        same(*QUANTIZED), "{value!r}: flux_ray quantizes the base with {known}")),
    M("quantize_via", "model.quantize_via", convert=choice(
        same("accelerator", "cpu"), "quantize_via {value!r}: flux_ray quantizes on the accelerator or cpu")),
    M("base_model_default_dtype", "model.base_model_default_dtype", convert=choice(
        same("bf16", "fp32"), "{value!r}: flux_ray holds the base in bf16 or fp32")),
    M("enable_group_offload", "model.enable_group_offload", as_bool),
    M("group_offload_type", "model.group_offload_type"),
    M("group_offload_blocks_per_group", "model.group_offload_blocks_per_group", as_int),
    M("group_offload_use_stream", "model.group_offload_use_stream", as_bool),
    M("group_offload_to_disk_path", "model.group_offload_to_disk_path", convert=resolve_path),
    M("enable_model_cpu_offload", "model.enable_model_cpu_offload", as_bool),
    M("tokenizer_max_length", "model.tokenizer_max_length", as_int),
    M("assistant_lora_path", "model.assistant_lora_path", convert=model_path),
    D("text_encoder_1_precision", "flux_ray runs CLIP in the cache's encoder actors; cache.text_embed_dtype "
                                  "sets what is stored"),
    D("text_encoder_2_precision", "flux_ray runs T5 in the cache's encoder actors; cache.text_embed_dtype "
                                  "sets what is stored"),
    D("vae_dtype", "flux_ray runs the VAE in the cache's encoder actors; cache.latent_dtype sets what is stored"),
    D("offload_during_startup", "flux_ray encodes in separate Ray actors; the trainer never loads the encoders"),
    D("keep_vae_loaded", "the trainer never loads the VAE (latents come from the cache)"),
    D("fully_unload_text_encoder", "the trainer never loads the text encoders (embeddings come from the cache)"),
    U("pretrained_t5_model_name_or_path", "flux_ray loads T5 from the base model folder"),
    U("fuse_qkv_projections", "not implemented in flux_ray yet"),
    U("quantization_config", "flux_ray quantizes by model.base_model_precision presets only"),
    # LoRA
    M("lora_type", "lora.lora_type", convert=choice(same("standard", "lycoris"), "lora_type {value!r}")),
    M("lora_rank", "lora.lora_rank", as_int),
    M("lora_alpha", "lora.lora_alpha", as_float),
    M("lora_dropout", "lora.lora_dropout", as_float),
    M("lora_init_type", "lora.lora_init_type"),
    M("flux_lora_target", "lora.flux_lora_target", convert=choice(
        same(*LORA_TARGET_PRESETS), "flux_lora_target {value!r}: flux_ray's presets are {known}")),
    M("peft_lora_target_modules", "lora.peft_lora_target_modules", as_str_list),
    M("init_lora", "lora.init_lora", convert=model_path),
    M("lycoris_config", "lora.lycoris_config", convert=read_json_file, note="the file's JSON, inlined"),
    U("use_dora", "flux_ray has no DoRA yet"),
    U("lora_format", "flux_ray saves diffusers LoRA files; output.export_formats adds comfyui / kohya copies"),
    U("init_lokr_norm", "not implemented in flux_ray yet"),
    # training
    M("max_train_steps", "train.max_train_steps", as_int, convert=max_train_steps),
    M("num_train_epochs", "", as_int, convert=num_train_epochs),
    M("train_batch_size", "train.train_batch_size", as_int),
    M("gradient_accumulation_steps", "train.gradient_accumulation_steps", as_int),
    M("learning_rate", "train.learning_rate", as_float),
    M("optimizer", "train.optimizer", convert=choice(
        same(*OPTIMIZERS), "optimizer {value!r}: flux_ray has {known} and adamw (torch)")),
    M("optimizer_beta1", "train.adam_beta1", as_float),
    M("optimizer_beta2", "train.adam_beta2", as_float),
    M("adam_beta1", "train.adam_beta1", as_float),
    M("adam_beta2", "train.adam_beta2", as_float),
    M("adam_weight_decay", "train.adam_weight_decay", as_float),
    M("lr_scheduler", "train.lr_scheduler", convert=choice(
        same("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "sine"),
        "lr_scheduler {value!r}: flux_ray has {known}")),
    M("lr_num_cycles", "train.lr_num_cycles", as_int),
    M("lr_warmup_steps", "train.lr_warmup_steps", as_int),
    M("max_grad_norm", "train.max_grad_norm", as_float),
    M("mixed_precision", "train.mixed_precision", convert=choice(
        same("bf16", "no"), "mixed_precision {value!r}: flux_ray trains in bf16 or fp32 (no)")),
    M("gradient_checkpointing", "train.gradient_checkpointing", as_bool),
    M("gradient_checkpointing_interval", "train.gradient_checkpointing_interval", as_int),
    M("seed", "train.seed", as_int),
    M("checkpoint_step_interval", "train.checkpointing_steps", as_int),
    M("checkpointing_steps", "train.checkpointing_steps", as_int, note="SimpleTuner's old name"),
    M("checkpoints_total_limit", "train.checkpoints_total_limit", as_int),
    M("resume_from_checkpoint", "train.resume_from_checkpoint", convert=resume_from_checkpoint),
    M("flux_attention_masked_training", "train.flux_attention_masked_training", as_bool),
    M("attention_mechanism", "train.attention_backend", convert=choice(
        {"diffusers": "auto"}, "attention_mechanism {value!r}: flux_ray uses torch SDPA (train.attention_backend)"),
      note="diffusers -> auto (torch SDPA)"),
    M("tread_config", "train.tread_config", as_dict),
    U("lr_end", "flux_ray's polynomial schedule ends at diffusers' default 1e-7"),
    U("lr_power", "flux_ray's polynomial schedule uses power 1"),
    U("lr_scale", "flux_ray does not scale the learning rate by batch size"),
    U("adam_epsilon", "flux_ray uses the optimizer's default epsilon"),
    U("optimizer_config", "flux_ray has no per-optimizer settings beyond the adam_* keys"),
    U("checkpoint_epoch_interval", "flux_ray checkpoints by step (train.checkpointing_steps)"),
    U("checkpointing_rolling_steps", "flux_ray keeps train.checkpoints_total_limit checkpoints"),
    U("use_ema", NO_EMA), U("ema_decay", NO_EMA), U("ema_device", NO_EMA), U("ema_update_interval", NO_EMA),
    U("snr_gamma", "min-SNR weighting is for epsilon models; not in flux_ray"),
    U("noise_offset", "not implemented in flux_ray yet"),
    U("input_perturbation", "not implemented in flux_ray yet"),
    U("train_text_encoder", "flux_ray trains the transformer LoRA only"),
    U("disable_tf32", "flux_ray leaves torch's TF32 settings at their defaults"),
    # flow matching
    M("flow_sigmoid_scale", "flow.flow_sigmoid_scale", as_float),
    M("flow_use_uniform_schedule", "flow.flow_use_uniform_schedule", as_bool),
    M("flow_use_beta_schedule", "flow.flow_use_beta_schedule", as_bool),
    M("flow_schedule_shift", "flow.flow_schedule_shift", as_float),
    M("flow_schedule_auto_shift", "flow.flow_schedule_auto_shift", as_bool),
    M("flux_fast_schedule", "flow.flux_fast_schedule", as_bool),
    M("flux_guidance_mode", "flow.flux_guidance_mode"),
    M("flux_guidance_value", "flow.flux_guidance_value", as_float),
    M("flux_guidance_min", "flow.flux_guidance_min", as_float),
    M("flux_guidance_max", "flow.flux_guidance_max", as_float),
    M("loss_type", "flow.loss_type", convert=choice(
        {"l2": "mse", "mse": "mse", "huber": "huber"}, "loss_type {value!r}: flux_ray has mse (l2) and huber"),
      note="l2 -> mse"),
    M("huber_c", "flow.huber_c", as_float),
    M("flow_beta_schedule_alpha", "flow.flow_beta_schedule_alpha", as_float),
    M("flow_beta_schedule_beta", "flow.flow_beta_schedule_beta", as_float),
    U("huber_schedule", "flux_ray's huber_c is constant"),
    # validation and eval
    M("validation_prompt", "eval.validation_prompt"),
    M("user_prompt_library", "eval.user_prompt_library", convert=prompt_library),
    M("validation_step_interval", "eval.validation_step_interval", as_int),
    M("validation_steps", "eval.validation_step_interval", as_int, note="SimpleTuner's old name"),
    M("validation_disable", "eval.validation_step_interval", as_bool, convert=validation_disable,
      note="true: no validation images"),
    M("validation_resolution", "eval.validation_resolution", convert=validation_resolution,
      note="sides rounded to multiples of 16"),
    M("validation_num_inference_steps", "eval.validation_num_inference_steps", as_int),
    M("validation_guidance", "eval.validation_guidance", as_float),
    M("validation_guidance_real", "eval.validation_guidance_real", as_float),
    M("validation_negative_prompt", "eval.validation_negative_prompt"),
    M("validation_seed", "eval.validation_seed", as_int),
    M("eval_steps_interval", "eval.eval_steps_interval", as_int),
    M("eval_timesteps", "eval.eval_timesteps", as_int),
    U("num_eval_images", "flux_ray holds out eval.eval_split_fraction of the images, or reads a dataset_type: eval "
                         "dataset"),
    U("validation_guidance_rescale", VALIDATION), U("validation_torch_compile", VALIDATION),
    U("validation_noise_scheduler", VALIDATION), U("num_validation_images", VALIDATION),
    U("validation_using_datasets", VALIDATION), U("validation_epoch_interval", VALIDATION),
    M("evaluation_type", "eval.evaluation_type", convert=choice(same("none", "clip"),
                                                               "evaluation_type {value!r}: flux_ray has {known}")),
    M("pretrained_evaluation_model_name_or_path", "eval.pretrained_evaluation_model_name_or_path",
      convert=model_path),
    D("disable_benchmark", "flux_ray renders no base-model benchmark at step 0"),
    D("validation_on_startup", "flux_ray renders no base-model benchmark at step 0"),
    # data
    D("data_backend_config", "the datasets are read from --data-backend-config into the spec's datasets list"),
    M("cache_dir", "cache.uri", convert=resolve_path, note="flux_ray's content-addressed Parquet cache goes here"),
    D("cache_dir_vae", CACHE), D("cache_dir_text", CACHE),
    M("vae_batch_size", "cache.vae_batch_size", as_int),
    M("text_encoder_batch_size", "cache.text_batch_size", as_int),
    D("write_batch_size", CACHE), D("read_batch_size", CACHE), D("compress_disk_cache", CACHE),
    D("vae_cache_scan_behaviour", CACHE), D("vae_cache_ondemand", CACHE), D("override_dataset_config", CACHE),
    D("aspect_bucket_rounding", "flux_ray rounds aspect ratios to 2 decimals (data/buckets.py)"),
    D("aspect_bucket_worker_count", "flux_ray's cache job decodes on Ray Data tasks (cache.decode_concurrency)"),
    D("max_workers", "flux_ray's cache job decodes on Ray Data tasks (cache.decode_concurrency)"),
    D("dataloader_prefetch", "flux_ray's loader reads cached Parquet; no prefetch queue to size"),
    D("dataloader_prefetch_qlen", "flux_ray's loader reads cached Parquet; no prefetch queue to size"),
    D("metadata_update_interval", "flux_ray lists the images when the cache job runs"),
    U("data_backend_sampling", "flux_ray mixes enabled datasets by size x (1 + repeats); no sampling strategy"),
    # tracking and output
    M("output_dir", "output.uri", convert=resolve_path, note="runs go to <output.uri>/<name>"),
    M("tracker_run_name", "name", convert=run_name, note="the job name (letters, digits, _ . -)"),
    M("tracker_project_name", "tracking.experiment_name"),
    D("report_to", TRACKING), D("logging_dir", TRACKING), D("tracker_image_layout", TRACKING),
    U("push_to_hub", NO_HUB), U("push_checkpoints_to_hub", NO_HUB), U("hub_model_id", NO_HUB),
    U("webhook_config", "not converted (a JSON file or list): set notify.webhook_url, notify.webhook_type "
                        "(raw | discord | slack) and notify.message_prefix"),
    # dataset keys (multidatabackend.json; DC ones may also sit in config.json as the default for every dataset)
    M("id", "id", convert=dataset_id, note="letters, digits, _ . - only", scope=DS),
    M("type", "type", convert=dataset_type_backend, note="aws -> s3", scope=DS),
    M("dataset_type", "dataset_type", convert=choice(same("image", "eval", "conditioning"), "{value!r}"), scope=DS),
    M("conditioning_type", "conditioning_type", scope=DS),
    M("instance_data_dir", "instance_data_dir", convert=instance_data_dir, scope=DS),
    M("aws_bucket_name", "aws_bucket_name", scope=DS),
    M("aws_data_prefix", "aws_data_prefix", scope=DS),
    M("aws_endpoint_url", "aws_endpoint_url", scope=DS),
    M("aws_region_name", "aws_region_name", scope=DS),
    D("aws_access_key_id", "flux_ray reads S3 credentials from the environment (AWS_ACCESS_KEY_ID), never "
                           "from a spec", scope=DS),
    D("aws_secret_access_key", "flux_ray reads S3 credentials from the environment (AWS_SECRET_ACCESS_KEY), "
                               "never from a spec", scope=DS),
    D("aws_max_pool_connections", "flux_ray's S3 filesystem (pyarrow) pools its own connections", scope=DC),
    M("disabled", "disabled", as_bool, scope=DS),
    M("disable", "disabled", as_bool, note="SimpleTuner's other spelling", scope=DS),
    M("caption_strategy", "caption_strategy", convert=choice(
        same("filename", "textfile", "instanceprompt", "parquet"), "caption_strategy {value!r}: flux_ray has {known}"),
      scope=DC),
    M("instance_prompt", "instance_prompt", scope=DC),
    M("prepend_instance_prompt", "prepend_instance_prompt", as_bool, scope=DC),
    M("only_instance_prompt", "caption_strategy", as_bool, convert=only_instance_prompt,
      note="true -> caption_strategy instanceprompt", scope=DC),
    M("parquet", "parquet", as_dict, convert=parquet_manifest, scope=DS),
    M("disable_multiline_split", "disable_multiline_split", as_bool, scope=DC),
    M("caption_dropout_probability", "caption_dropout_probability", as_float, scope=DC),
    M("resolution_type", "resolution_type", convert=resolution_type,
      note="area -> pixel_area, megapixel sizes -> pixel edges", scope=DC),
    M("resolution", "resolution", as_float, convert=megapixels_to_edge, scope=DC),
    M("minimum_image_size", "minimum_image_size", as_float, convert=optional_size, scope=DC),
    M("maximum_image_size", "maximum_image_size", as_float, convert=optional_size, scope=DC),
    M("target_downsample_size", "target_downsample_size", as_float, convert=optional_size, scope=DC),
    M("crop", "crop", as_bool, scope=DS),
    M("crop_style", "crop_style", convert=choice(
        same("center", "random", "corner"), "crop_style {value!r}: flux_ray crops {known}"), scope=DS),
    M("crop_aspect", "crop_aspect", convert=choice(
        {**same("square", "preserve"), "closest": "preserve", "random": "preserve"}, "crop_aspect {value!r}"),
      note="closest / random pick from crop_aspect_buckets, which flux_ray has not: preserve", scope=DS),
    M("repeats", "repeats", as_int, note="same meaning: 0 = each image once per epoch", scope=DS),
    M("is_regularisation_data", "is_regularisation_data", as_bool, scope=DS),
    M("is_regularization_data", "is_regularisation_data", as_bool,
      note="SimpleTuner's other spelling", scope=DS),
    D("cache_dir_vae", CACHE, scope=DS), D("cache_dir", CACHE, scope=DS),
    D("metadata_backend", "flux_ray reads image sizes when it decodes (the cache job)", scope=DS),
    D("skip_file_discovery", "flux_ray's cache is incremental: images already encoded are skipped", scope=DC),
    D("preserve_data_backend_cache", "flux_ray lists the images once per cache job", scope=DS),
    D("vae_cache_clear_each_epoch", CACHE, scope=DS), D("hash_filenames", CACHE, scope=DS),
    D("text_embeds", CACHE, scope=DS), D("image_embeds", CACHE, scope=DS),
    D("conditioning_image_embeds", CACHE, scope=DS), D("default", CACHE, scope=DS),
    D("metadata_update_interval", "flux_ray lists the images when the cache job runs", scope=DS),
    U("crop_aspect_buckets", "flux_ray has no bucket list yet (crop_aspect closest / random -> preserve)", scope=DS),
    U("max_upscale_threshold", "flux_ray has no bucket list to filter yet", scope=DS),
    U("minimum_aspect_ratio", "not implemented in flux_ray yet", scope=DS),
    U("maximum_aspect_ratio", "not implemented in flux_ray yet", scope=DS),
    U("probability", "flux_ray mixes enabled datasets by size x (1 + repeats)", scope=DS),
    U("max_num_samples", "not implemented in flux_ray yet", scope=DS),
    U("start_epoch", "flux_ray trains every enabled dataset from the first step", scope=DS),
    U("start_step", "flux_ray trains every enabled dataset from the first step", scope=DS),
    U("end_epoch", "flux_ray trains every enabled dataset to the last step", scope=DS),
    U("end_step", "flux_ray trains every enabled dataset to the last step", scope=DS),
    U("caption_shuffle", "not implemented in flux_ray yet", scope=DS),
    U("timestep_sampling_offset", "flux_ray samples timesteps per job (flow section), not per dataset", scope=DS),
    U("train_batch_size", "flux_ray has one train.train_batch_size for every dataset", scope=DS),
    M("conditioning_data", "conditioning_data", as_str_list, scope=DS),
    U("conditioning", "flux_ray does not generate conditioning datasets; give a mask dataset", scope=DS),
    U("delete_unwanted_images", "flux_ray never deletes source images", scope=DC),
    U("delete_problematic_images", "flux_ray never deletes source images (bad ones are skipped and counted)",
      scope=DC),
    U("caption_filter_list", "not implemented in flux_ray yet", scope=DS),
)

# The dataset kinds an importer keeps; others are dropped whole (embeds: own mechanism) or unsupported.
DATASET_KINDS_DROPPED = {"text_embeds": "flux_ray caches text embeddings itself (cache.uri); no text_embeds backend",
                         "image_embeds": "flux_ray caches VAE latents itself (cache.uri); no image_embeds backend",
                         "conditioning_image_embeds": "flux_ray caches embeddings itself (cache.uri)"}
DATASET_KINDS_UNSUPPORTED = {"video": "flux_ray trains Flux images only", "audio": "flux_ray trains Flux images only",
                             }
BACKENDS_UNSUPPORTED = ("csv", "huggingface", "memory", "webshart")


def rules_for(scope: str) -> dict[str, Rule]:
    """``config`` -> config.json rules (incl. dataset defaults); ``dataset`` -> dataset-entry rules."""
    if scope == "config":
        return {r.key: r for r in TABLE if r.scope in ("config", DC)}
    return {r.key: r for r in TABLE if r.scope in (DS, DC)}
