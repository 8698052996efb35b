"""Every spec option acts or is refused (issue 20): each field of JobSpec is either exercised by a named test that
changes it and observes an effect (or its refusal), documented as having no training effect, or listed as a known
gap with where it acts. A new field fails here until it is registered; a renamed or deleted test fails too."""
from __future__ import annotations

import ast
import typing
from pathlib import Path

from pydantic import BaseModel

from flux_ray.spec import JobSpec

ROOT = Path(__file__).resolve().parents[1]
LOOP, SPEC, REFUSED = "tests/train/test_loop.py", "tests/test_spec.py", \
    "tests/test_spec.py::test_options_that_would_be_ignored_are_refused"
CACHE, DECODE, BUCKETS = "tests/data/test_cache.py", "tests/data/test_decode.py", "tests/data/test_buckets.py"
SOURCES, FLOW, VALID = "tests/data/test_sources.py", "tests/core/test_flow.py", "tests/core/test_validation.py"
AUTO = "tests/data/test_auto_captions.py"

EFFECT_TESTS: dict[str, str] = {
    "model.model_family": "tests/test_families.py::test_model_family_picks_the_family",
    "model.model_flavour": f"{SPEC}::test_schnell_defaults",
    "model.pretrained_model_name_or_path": "tests/core/test_model_and_lora.py::test_components_load_through_model_spec",
    "model.pretrained_transformer_model_name_or_path":
        "tests/core/test_model_and_lora.py::test_components_load_through_model_spec",
    "model.pretrained_transformer_subfolder": "tests/core/test_model_and_lora.py::test_components_load_through_model_spec",
    "model.make_tiny_if_missing": f"{CACHE}::test_killed_cache_job_resumes_with_only_the_missing_work",
    "model.base_model_precision": "tests/core/test_quantize.py::test_lora_step_matches_the_dequantized_base",
    "model.enable_group_offload": "tests/core/test_offload.py::test_trainer_build_offloads_the_base_and_keeps_the_adapter",
    "model.group_offload_type": f"{SPEC}::test_group_offload_options_follow_simpletuner_names",
    "model.group_offload_blocks_per_group": f"{SPEC}::test_group_offload_refuses_what_it_cannot_run",
    "model.group_offload_use_stream": "tests/core/test_offload.py::test_refuses_an_adapter_already_attached_and_streams_on_cpu",
    "model.group_offload_to_disk_path": f"{SPEC}::test_group_offload_options_follow_simpletuner_names",
    "model.enable_model_cpu_offload": f"{SPEC}::test_group_offload_refuses_what_it_cannot_run",
    "model.tokenizer_max_length": f"{CACHE}::test_changing_preprocessing_or_dtype_makes_a_new_cache",
    "model.assistant_lora_path": f"{LOOP}::test_schnell_fast_schedule_without_guidance_and_assistant_lora",
    "lora.lora_type": f"{LOOP}::test_lycoris_lokr_saved_loads_through_lycoris_into_the_pipeline",
    "lora.lora_rank": "tests/core/test_model_and_lora.py::test_saved_lora_loads_in_diffusers_with_alpha",
    "lora.lora_alpha": "tests/core/test_model_and_lora.py::test_saved_lora_loads_in_diffusers_with_alpha",
    "lora.lora_dropout": REFUSED,
    "lora.lora_init_type": f"{LOOP}::test_lora_init_types_start_at_the_base_model",
    "lora.flux_lora_target": "tests/core/test_model_and_lora.py::test_lora_presets_wrap_exactly_their_modules",
    "lora.peft_lora_target_modules": "tests/core/test_model_and_lora.py::test_custom_target_list_overrides_preset",
    "lora.init_lora": f"{LOOP}::test_init_lora_continues_from_a_file",
    "lora.lycoris_config": f"{LOOP}::test_lycoris_lokr_saved_loads_through_lycoris_into_the_pipeline",
    "datasets.type": f"{CACHE}::test_images_and_cache_on_s3_and_training_reads_it",
    "datasets.instance_data_dir": f"{CACHE}::test_adding_images_encodes_only_the_new_ones",
    "datasets.aws_bucket_name": f"{SOURCES}::test_s3_listing_and_captions_against_moto",
    "datasets.aws_data_prefix": f"{SOURCES}::test_s3_listing_and_captions_against_moto",
    "datasets.aws_endpoint_url": f"{SOURCES}::test_s3_listing_and_captions_against_moto",
    "datasets.make_demo_if_missing": f"{CACHE}::test_killed_cache_job_resumes_with_only_the_missing_work",
    "datasets.caption_strategy": f"{SOURCES}::test_filename_and_instanceprompt",
    "datasets.instance_prompt": f"{SOURCES}::test_filename_and_instanceprompt",
    "datasets.prepend_instance_prompt": f"{SOURCES}::test_textfile_with_fallback_and_prepend",
    "datasets.parquet.path": f"{SOURCES}::test_parquet_manifest_by_rel_path_or_base_name",
    "datasets.trigger_word": f"{SOURCES}::test_trigger_word_goes_into_every_caption_once",
    "datasets.captioner.model_name": f"{AUTO}::test_auto_captions_are_computed_once_kept_editable_and_get_the_trigger_word",
    "datasets.captioner.query_str": f"{AUTO}::test_captioner_callable_captions_each_loaded_image",
    "datasets.captioner.max_new_tokens": f"{AUTO}::test_captioner_callable_captions_each_loaded_image",
    "datasets.captioner.output_parquet":
        f"{AUTO}::test_auto_captions_are_computed_once_kept_editable_and_get_the_trigger_word",
    "datasets.parquet.filename_column": f"{SOURCES}::test_parquet_manifest_by_rel_path_or_base_name",
    "datasets.parquet.caption_column": f"{SOURCES}::test_parquet_manifest_by_rel_path_or_base_name",
    "datasets.parquet.fallback_caption_column": f"{SOURCES}::test_jsonl_json_csv_manifests_with_several_captions",
    "datasets.disable_multiline_split": f"{SOURCES}::test_textfile_lines_are_several_captions_unless_split_is_disabled",
    "datasets.caption_dropout_probability": f"{LOOP}::test_flow_options_train",
    "datasets.resolution": f"{BUCKETS}::test_square_crop_aspect_and_dataset_bucket",
    "datasets.resolution_type": f"{BUCKETS}::test_crop_mode_native_scale_and_downsample",
    "datasets.minimum_image_size": f"{DECODE}::test_size_and_aspect_limits",
    "datasets.maximum_image_size": f"{BUCKETS}::test_crop_mode_native_scale_and_downsample",
    "datasets.target_downsample_size": f"{BUCKETS}::test_crop_mode_native_scale_and_downsample",
    "datasets.crop": f"{BUCKETS}::test_crop_mode_native_scale_and_downsample",
    "datasets.crop_style": f"{BUCKETS}::test_crop_styles_place_the_box",
    "datasets.crop_aspect": f"{BUCKETS}::test_square_crop_aspect_and_dataset_bucket",
    "datasets.repeats": "tests/train/test_batch_plan.py",
    "datasets.is_regularisation_data": f"{LOOP}::test_regularisation_data_trains_towards_the_base_prediction",
    "datasets.dataset_type": f"{SPEC}::test_refusals_leave_the_working_forms_alone",
    "datasets.conditioning_type": "tests/data/test_masks.py::test_masks_are_cached_reported_and_weigh_the_training_loss",
    "datasets.conditioning_data": "tests/data/test_masks.py::test_masks_are_cached_reported_and_weigh_the_training_loss",
    "eval.validation_reference_image":
        "tests/data/test_references.py::test_kontext_validation_and_the_exported_lora_load_in_the_kontext_pipeline",
    "storage.aws_endpoint_url": "tests/test_storage.py::test_s3_explicit_endpoint_beats_storage_spec",
    "storage.aws_region_name": "tests/test_storage.py::test_s3_explicit_endpoint_beats_storage_spec",
    "cache.uri": f"{CACHE}::test_adding_images_encodes_only_the_new_ones",
    "cache.latent_dtype": f"{CACHE}::test_changing_preprocessing_or_dtype_makes_a_new_cache",
    "cache.vae_batch_size": "tests/data/test_encoders.py::test_vae_encodes_each_bucket_in_batches_of_batch_size",
    "cache.vae_bucket_window": "tests/data/test_encoders.py::test_vae_encodes_each_bucket_in_batches_of_batch_size",
    "cache.commit_every": f"{CACHE}::test_killed_cache_job_resumes_with_only_the_missing_work",
    "cache.min_rows_per_file": f"{CACHE}::test_killed_cache_job_resumes_with_only_the_missing_work",
    "cache.compile_encoders": "tests/data/test_encoders.py::test_compile_encoders_applies_on_gpu_only",
    "flow.flow_use_uniform_schedule": f"{LOOP}::test_flow_options_train",
    "flow.flow_use_beta_schedule": f"{LOOP}::test_flow_options_train",
    "flow.flow_schedule_shift": f"{LOOP}::test_flow_options_train",
    "flow.flow_schedule_auto_shift": f"{FLOW}::test_auto_shift_uses_scheduler_settings_and_sequence_length",
    "flow.flux_fast_schedule": f"{LOOP}::test_schnell_fast_schedule_without_guidance_and_assistant_lora",
    "flow.flux_guidance_mode": f"{LOOP}::test_flow_options_train",
    "flow.flux_guidance_value": f"{FLOW}::test_guidance_modes",
    "flow.flux_guidance_min": f"{FLOW}::test_guidance_modes",
    "flow.flux_guidance_max": f"{FLOW}::test_guidance_modes",
    "flow.loss_type": f"{LOOP}::test_flow_options_train",
    "flow.flow_beta_schedule_alpha": f"{FLOW}::test_beta_schedule_samples_beta_alpha_beta",
    "flow.flow_beta_schedule_beta": f"{FLOW}::test_beta_schedule_samples_beta_alpha_beta",
    "train.lr_num_cycles": f"{LOOP}::test_lr_schedulers",
    "flow.huber_c": f"{LOOP}::test_more_options_change_the_first_loss",
    "flow.flow_sigmoid_scale": f"{LOOP}::test_more_options_change_the_first_loss",
    "model.base_model_default_dtype": f"{LOOP}::test_base_dtype_is_the_frozen_weights_dtype",
    "train.adam_beta1": f"{LOOP}::test_optimizer_options_change_the_update",
    "train.adam_beta2": f"{LOOP}::test_optimizer_options_change_the_update",
    "train.adam_weight_decay": f"{LOOP}::test_optimizer_options_change_the_update",
    "train.max_grad_norm": f"{LOOP}::test_optimizer_options_change_the_update",
    "train.max_train_steps": "tests/train/test_run_identity.py::test_new_run_then_resume_with_resumable_changes",
    "train.train_batch_size": "tests/train/test_batch_plan.py",
    "train.gradient_accumulation_steps": f"{LOOP}::test_gradient_accumulation_matches_the_larger_batch",
    "train.learning_rate": f"{LOOP}::test_lr_schedulers",
    "train.optimizer": f"{LOOP}::test_cpu_optimizers_lower_the_loss",
    "train.lr_scheduler": f"{LOOP}::test_lr_schedulers",
    "train.lr_warmup_steps": f"{LOOP}::test_lr_schedulers",
    "train.mixed_precision": f"{LOOP}::test_flow_options_train",
    "train.gradient_checkpointing": f"{LOOP}::test_gradient_checkpointing_interval_recomputes_every_nth_block",
    "train.gradient_checkpointing_interval": f"{LOOP}::test_gradient_checkpointing_interval_recomputes_every_nth_block",
    "train.checkpointing_steps": "tests/train/test_distributed.py::test_killed_worker_recovers_from_last_checkpoint",
    "train.resume_from_checkpoint": "tests/train/test_run_identity.py::test_null_resume_over_old_checkpoints_is_refused",
    "train.flux_attention_masked_training": f"{LOOP}::test_masked_attention_ignores_padding",
    "train.attention_backend": f"{SPEC}::test_bad_spec_names_key_and_problem",
    "train.compile": "tests/core/test_step_equivalence.py::test_compiled_blocks_match_plain_step_fp32",
    "model.base_compute_dtype": "tests/core/test_fp8.py::test_lora_trained_on_fp8_base_reaches_bf16_eval_loss_within_1pct",
    "storage.shared_paths": "tests/test_placement.py::test_shared_paths_admit_local_paths_on_multi_node",
    "scaling.placement_strategy": "tests/deploy/test_multi_node.py::test_s3_everywhere_on_two_nodes_submitted_from_a_client_without_files",
    "cache.reader_memory_gib": "tests/train/test_loop.py::test_a_cache_larger_than_the_memory_bound_trains",
    "train.compile_cache": "tests/train/test_compile_cache.py::test_a_fresh_process_loads_the_artifacts_and_a_new_shape_still_compiles",
    "train.tread_config.routes.selection_ratio": "tests/core/test_tread.py",
    "train.tread_config.routes.start_layer_idx": "tests/core/test_tread.py::test_bad_route_indices_name_the_route",
    "train.tread_config.routes.end_layer_idx": "tests/core/test_tread.py::test_bad_route_indices_name_the_route",
    "eval.eval_steps_interval": REFUSED,
    "eval.eval_split_fraction": f"{LOOP}::test_same_lora_same_eval_loss",
    "eval.user_prompt_library": f"{VALID}::test_true_cfg_uses_the_negative_prompt",
    "eval.validation_resolution": f"{VALID}::test_true_cfg_uses_the_negative_prompt",
    "eval.validation_guidance_real": f"{VALID}::test_true_cfg_uses_the_negative_prompt",
    "eval.validation_negative_prompt": f"{VALID}::test_true_cfg_uses_the_negative_prompt",
    "eval.evaluation_type": f"{VALID}::test_clip_scores_of_the_validation_images",
    "eval.pretrained_evaluation_model_name_or_path":
        "tests/core/test_clip_score.py::test_score_is_clip_models_cosine_and_tells_prompts_apart",
    "scaling.num_workers": "tests/train/test_distributed.py::test_strategies_train_the_same_lora",
    "scaling.strategy": "tests/train/test_distributed.py::test_strategies_train_the_same_lora",
    "scaling.gradient_sync": "tests/train/test_distributed.py::test_strategies_train_the_same_lora",
    "scaling.max_failures": "tests/train/test_distributed.py::test_killed_worker_recovers_from_last_checkpoint",
    "tracking.mlflow_tracking_uri": "tests/tracking/test_mlflow_server.py",
    "tracking.experiment_name": "tests/tune/test_sweep.py::test_mlflow_has_one_parent_and_a_nested_run_per_trial",
    "tracking.register_model_name": "tests/tune/test_sweep.py",
    "output.uri": f"{CACHE}::test_images_and_cache_on_s3_and_training_reads_it",
    "output.export_formats": "tests/test_demo_job.py::test_rerun_same_name_resumes_instead_of_retraining",
    "output.publish.uri": "tests/test_delivery.py::test_published_to_s3_with_model_card_and_grid",
    "output.publish.formats": "tests/test_delivery.py::test_published_to_s3_with_model_card_and_grid",
    "output.publish.hub_model_id": "tests/test_delivery.py::test_published_to_the_hub_through_huggingface_hub",
    "output.publish.hub_private": "tests/test_delivery.py::test_published_to_the_hub_through_huggingface_hub",
    "notify.webhook_url": "tests/test_delivery.py::test_webhook_events_arrive_in_order",
    "notify.webhook_type":
        "tests/notify/test_webhooks.py::test_discord_gets_the_validation_image_as_multipart_and_slack_gets_text",
    "notify.message_prefix": "tests/notify/test_webhooks.py::test_the_notify_section_sets_prefix_and_retries",
    "notify.webhook_max_retries": "tests/notify/test_webhooks.py::test_the_notify_section_sets_prefix_and_retries",
    "tune.param_space.type": "tests/tune/test_space.py::test_space_maps_to_tune_domains_and_applies_by_dotted_key",
    "tune.param_space.lower": "tests/tune/test_space.py::test_space_maps_to_tune_domains_and_applies_by_dotted_key",
    "tune.param_space.upper": "tests/tune/test_space.py::test_space_maps_to_tune_domains_and_applies_by_dotted_key",
    "tune.param_space.values": "tests/tune/test_space.py::test_space_maps_to_tune_domains_and_applies_by_dotted_key",
    "tune.num_samples": "tests/tune/test_space.py::test_space_maps_to_tune_domains_and_applies_by_dotted_key",
    "tune.metric": "tests/tune/test_space.py::test_metric_scheduler_and_searcher_are_checked",
    "tune.grace_period": "tests/tune/test_space.py::test_metric_scheduler_and_searcher_are_checked",
    "tune.search_alg": "tests/tune/test_space.py::test_missing_searcher_package_is_a_clear_error",
    "tune.max_concurrent_trials": "tests/tune/test_sweep.py::test_at_most_max_concurrent_trials_ran_at_once",
    "tune.reuse_actors": "tests/tune/test_trial_reuse.py::test_later_trials_reuse_the_process_and_its_model",
    # refusals: tests/test_spec.py::test_cuda_graph_modes_refuse_what_was_not_measured; speed: RESULTS call 25 (gpu)
    "train.dynamo_mode": "tests/train/test_compile_cache.py::test_options_that_change_the_graphs_change_the_key",
}
"""Field path -> the test (module or module::function) that changes it and observes what it does (or its refusal)."""

NO_EFFECT: dict[str, str] = {
    "name": "names the run directory and MLflow run; identity and resume: tests/train/test_run_identity.py",
    "datasets.id": "a label (cache keys, summaries, --set addressing by id)",
    "datasets.disabled": "drops the dataset from enabled_datasets(): every consumer reads that list",
    "datasets.aws_region_name": "passed to the S3 client with the endpoint; moto answers any region",
    "scaling.use_gpu": "device choice (NCCL, CUDA): tests/train/test_distributed.py::test_adamw_bf16_trains_under_nccl (gpu)",
    "scaling.resources_per_worker": "Ray resource request only",
    "scaling.deepspeed_config": "passed to deepspeed.initialize (tests/train/test_distributed.py uses the default ZeRO-2)",
    "train.seed": "fixes the randomness: the pinned losses of test_seeded_regression_pins_the_first_losses depend on it",
    "train.log_every": "report cadence only",
    "train.checkpoints_total_limit": "Ray's CheckpointConfig(num_to_keep)",
    "eval.eval_timesteps": "number of sigmas in the eval loss average",
    "eval.eval_seed": "noise seed of the eval loss",
    "eval.validation_step_interval": "cadence of validation images",
    "eval.validation_prompt": "validation image prompt (tests/core/test_validation.py renders prompts)",
    "eval.validation_num_inference_steps": "validation sampling steps",
    "eval.validation_guidance": "validation guidance",
    "eval.validation_seed": "validation noise seed",
    "cache.text_embed_dtype": "part of the text cache key (cache_layout.text_key)",
    "cache.text_batch_size": "throughput: T5/CLIP batch size",
    "cache.num_vae_actors": "throughput: Ray Data actor pool size",
    "cache.num_text_actors": "throughput: Ray Data actor pool size",
    "cache.gpus_per_actor": "Ray resource request of encoder actors (GPU only)",
    "cache.decode_concurrency": "throughput: concurrent decode tasks",
    "cache.vae_channels_last": "GPU only memory format (bench/cache_bench.py)",
    "datasets.captioner.batch_size": "throughput: images per generate() call",
    "datasets.captioner.num_actors": "throughput: Ray Data actor pool size of the captioner",
    "datasets.captioner.gpus_per_actor": "Ray resource request of captioner actors (GPU only)",
    "datasets.captioner.precision": "GPU only: the captioner's dtype (a CPU runs fp32); range checked in "
                                    "tests/test_spec.py::test_captioning_trigger_word_and_archive_options_are_checked",
    "tune.mode": "min or max of tune.metric: Tune's own option",
    "tune.scheduler": "asha or fifo: Tune's own scheduler",
    "tune.reduction_factor": "ASHA's own option",
}
"""Fields without a training effect to observe (cadence, throughput, labels, resources): what they do instead."""

KNOWN_GAPS: dict[str, str] = {
    "model.revision": "hub revision of from_pretrained (no hub in tests)",
    "model.pretrained_vae_model_name_or_path": "core/model.py load_vae_config / load_vae: no second VAE in tests",
    "model.quantize_via": "core/quantize.py: cpu vs accelerator placement while quantizing (needs CUDA to differ)",
}
"""Fields that act (where, in code) but have no test observing their effect yet: shrink this list."""


def spec_field_paths(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field (sub-models, their lists and dicts walked; list items have no index)."""
    out = []
    for name, field in model.model_fields.items():
        args = [field.annotation, *typing.get_args(field.annotation)]
        args += [b for a in list(args) for b in typing.get_args(a)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        out += spec_field_paths(models[0], f"{prefix}{name}.") if models else [prefix + name]
    return out


def _test_functions(module: str) -> set[str]:
    tree = ast.parse((ROOT / module).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_spec_field_is_registered_once():
    fields = set(spec_field_paths())
    lists = {"effect": set(EFFECT_TESTS), "no effect": set(NO_EFFECT), "known gap": set(KNOWN_GAPS)}
    unregistered = fields - set().union(*lists.values())
    assert not unregistered, f"spec fields with no test, no-effect reason or known gap: {sorted(unregistered)}"
    for kind, keys in lists.items():
        assert keys <= fields, f"{kind}: not spec fields (renamed or removed?): {sorted(keys - fields)}"
    assert not (lists["effect"] & lists["no effect"]) and not (lists["effect"] & lists["known gap"])
    assert all(reason.strip() for reason in [*NO_EFFECT.values(), *KNOWN_GAPS.values()])


def test_registered_tests_exist():
    """The registry cannot rot: every named module exists and every named test function is defined in it."""
    missing = []
    for field, node in EFFECT_TESTS.items():
        module, _, func = node.partition("::")
        if not (ROOT / module).is_file():
            missing.append(f"{field}: {module}")
        elif func and func not in _test_functions(module):
            missing.append(f"{field}: {node}")
    assert not missing, "registered tests that do not exist:\n  " + "\n  ".join(missing)
