"""`flux-ray import-simpletuner`: the key table row by row, the Flux quickstart's files end to end, errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from flux_ray.cli import main
from flux_ray.simpletuner import import_simpletuner
from flux_ray.simpletuner.table import TABLE
from flux_ray.spec import SpecError, load_spec

FIXTURES = Path(__file__).parent / "fixtures" / "simpletuner"
BASE_CONFIG = {"model_family": "flux", "model_type": "lora", "max_train_steps": 10}
BASE_DATASET = {"id": "d", "type": "local", "instance_data_dir": "data"}
LYCORIS = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 12}
TREAD = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}
EITHER = "mapped, or refused by the spec"


def w(rel: str):
    """An expected path: ``rel`` under the SimpleTuner working dir."""
    return lambda workdir: str((workdir / rel).resolve())


# One sample per mapped row: key -> (SimpleTuner value, expected flux_ray value[, extra keys[, expected status]]).
# Extra keys go where the row's key goes (config.json or the dataset). A row without a sample fails
# test_every_mapped_row_has_a_sample, so the table cannot grow untested.
SAMPLES = {
    "model_family": ("flux", "flux"),
    "model_type": ("lora", None, {}, "dropped"),
    "model_flavour": ("krea", "krea"),
    "pretrained_model_name_or_path": ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-dev"),
    "revision": ("main", "main"),
    "pretrained_transformer_model_name_or_path": ("./transformer", w("transformer")),
    "pretrained_transformer_subfolder": ("transformer", "transformer"),
    "pretrained_vae_model_name_or_path": ("/models/vae", "/models/vae"),
    "base_model_precision": ("nf4-bnb", "nf4-bnb"),
    "quantize_via": ("cpu", "cpu"),
    "base_model_default_dtype": ("fp32", "fp32"),
    "enable_group_offload": ("true", True, {"gradient_checkpointing": True}),
    "group_offload_type": ("leaf_level", "leaf_level"),
    "group_offload_blocks_per_group": ("2", 2),
    "group_offload_use_stream": (True, True),
    "group_offload_to_disk_path": ("offload", w("offload")),
    "enable_model_cpu_offload": (False, False),
    "tokenizer_max_length": (256, 256),
    "assistant_lora_path": ("ostris/FLUX.1-schnell-training-adapter", "ostris/FLUX.1-schnell-training-adapter"),
    "lora_type": ("lycoris", "lycoris"),
    "lora_rank": ("32", 32),
    "lora_alpha": (8, 8.0),
    "lora_dropout": ("0.1", 0.1),
    "lora_init_type": ("gaussian", "gaussian"),
    "flux_lora_target": ("mmdit", "mmdit"),
    "peft_lora_target_modules": ("to_q,to_k", ["to_q", "to_k"]),
    "init_lora": ("./lora.safetensors", w("lora.safetensors")),
    "lycoris_config": ("config/lycoris_config.json", LYCORIS),
    "max_train_steps": ("250", 250),
    "num_train_epochs": (0, None, {}, "dropped"),
    "train_batch_size": (2, 2),
    "gradient_accumulation_steps": (2, 2),
    "learning_rate": ("3e-4", 3e-4),
    "optimizer": ("optimi-lion", "optimi-lion"),
    "optimizer_beta1": (0.8, 0.8),
    "optimizer_beta2": (0.99, 0.99),
    "adam_beta1": ("0.8", 0.8),
    "adam_beta2": ("0.99", 0.99),
    "adam_weight_decay": (0.1, 0.1),
    "lr_scheduler": ("cosine_with_restarts", "cosine_with_restarts"),
    "lr_num_cycles": (2, 2, {"lr_scheduler": "cosine_with_restarts"}),
    "lr_warmup_steps": (10, 10),
    "max_grad_norm": (2, 2.0),
    "mixed_precision": ("no", "no", {"base_model_default_dtype": "fp32"}),
    "gradient_checkpointing": ("false", False),
    "gradient_checkpointing_interval": (2, 2),
    "seed": ("7", 7),
    "checkpoint_step_interval": (100, 100),
    "checkpointing_steps": (100, 100),
    "checkpoints_total_limit": (3, 3),
    "resume_from_checkpoint": ("latest", "latest"),
    "flux_attention_masked_training": (True, True),
    "attention_mechanism": ("diffusers", "auto"),
    "tread_config": (json.dumps(TREAD), TREAD),
    "flow_sigmoid_scale": (1.5, 1.5),
    "flow_use_uniform_schedule": (True, True),
    "flow_use_beta_schedule": (True, True),
    "flow_beta_schedule_alpha": (3, 3.0, {"flow_use_beta_schedule": True}),
    "flow_beta_schedule_beta": ("1.5", 1.5, {"flow_use_beta_schedule": True}),
    "flow_schedule_shift": (3, 3.0),
    "flow_schedule_auto_shift": ("true", True),
    "flux_fast_schedule": (True, True),
    "flux_guidance_mode": ("random-range", "random-range"),
    "flux_guidance_value": (3.5, 3.5),
    "flux_guidance_min": (1, 1.0),
    "flux_guidance_max": (5, 5.0),
    "loss_type": ("l2", "mse"),
    "huber_c": (0.2, 0.2),
    "validation_prompt": ("a cat", "a cat"),
    "user_prompt_library": ("config/prompts.json", w("config/prompts.json")),
    "validation_step_interval": (100, 100),
    "validation_steps": (100, 100),
    "validation_disable": (True, None),
    "validation_resolution": ("1020x512,768", "1024x512,768x768"),
    "validation_num_inference_steps": ("20", 20),
    "validation_guidance": (3.5, 3.5),
    "validation_guidance_real": (1.5, 1.5),
    "validation_negative_prompt": ("blurry", "blurry"),
    "validation_seed": (1, 1),
    "evaluation_type": ("clip", "clip", {"validation_prompt": "a cat", "validation_step_interval": 10}),
    "pretrained_evaluation_model_name_or_path": ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32",
                                                 {"evaluation_type": "clip", "validation_prompt": "a cat",
                                                  "validation_step_interval": 10}),
    "eval_steps_interval": (50, 50, {}, EITHER),  # refused without eval data
    "eval_timesteps": (10, 10),
    "cache_dir": ("cache", w("cache")),
    "vae_batch_size": (8, 8),
    "text_encoder_batch_size": (32, 32),
    "output_dir": ("output/models", w("output/models")),
    "tracker_run_name": ("my run!", "my-run"),
    "tracker_project_name": ("proj", "proj"),
    # dataset keys
    "id": ("my data", "my-data"),
    "type": ("aws", "s3", {"aws_bucket_name": "b"}),
    "dataset_type": ("image", "image"),
    "instance_data_dir": ("data", w("data")),
    "aws_bucket_name": ("b", "b", {"type": "aws"}),
    "aws_data_prefix": ("p/", "p/", {"type": "aws", "aws_bucket_name": "b"}),
    "aws_endpoint_url": ("http://127.0.0.1:9000", "http://127.0.0.1:9000", {"type": "aws", "aws_bucket_name": "b"}),
    "aws_region_name": ("us-east-1", "us-east-1", {"type": "aws", "aws_bucket_name": "b"}),
    "disabled": (False, False),
    "disable": ("false", False),
    "caption_strategy": ("filename", "filename"),
    "instance_prompt": ("sks", "sks"),
    "prepend_instance_prompt": (True, True),
    "only_instance_prompt": (True, "instanceprompt", {"instance_prompt": "sks"}),
    "parquet": ({"path": "captions.jsonl", "filename_column": "id", "caption_column": ["c", "d"],
                 "fallback_caption_column": "t", "width_column": "w"},
                lambda wd: {"path": str((wd / "captions.jsonl").resolve()), "filename_column": "id",
                            "caption_column": ["c", "d"], "fallback_caption_column": "t"}),
    "disable_multiline_split": ("true", True),
    "caption_dropout_probability": (0.1, 0.1),
    "resolution_type": ("pixel", "pixel"),
    "resolution": (1.05, 1025, {"resolution_type": "area"}),  # megapixels -> the edge of the same area
    "minimum_image_size": (0.5, 707, {"resolution_type": "area"}),
    "maximum_image_size": (2048, 2048, {}, EITHER),  # refused without crop
    "target_downsample_size": (1536, 1536, {}, EITHER),
    "crop": (True, True),
    "crop_style": ("random", "random"),
    "crop_aspect": ("closest", "preserve"),
    "repeats": ("9", 9),
    "conditioning_type": ("mask", "mask", {}, EITHER),  # alone on an image dataset: refused by the spec
    "conditioning_data": ("masks", ["masks"], {}, EITHER),  # no dataset 'masks' here: refused by the spec
    "is_regularisation_data": (True, True, {}, EITHER),
    "is_regularization_data": (True, True, {}, EITHER),
}


def write_files(tmp_path: Path, config: dict, datasets: list) -> tuple[Path, Path]:
    cfg = tmp_path / "config" / "config.json"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps(config))
    (tmp_path / "config" / "lycoris_config.json").write_text(json.dumps(LYCORIS))
    (tmp_path / "config" / "prompts.json").write_text(json.dumps({"cat": "a cat on a mat"}))
    backend = cfg.parent / "multidatabackend.json"
    backend.write_text(json.dumps(datasets))
    return cfg, backend


def entries_for(result, key: str):
    return [e for e in result.entries if e.key.lstrip("-") == key]


def dig(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        node = node[part]
    return node


def rule_id(rule) -> str:
    return f"{rule.scope}:{rule.key}"


@pytest.mark.parametrize("rule", TABLE, ids=rule_id)
def test_table_row(rule, tmp_path):
    """Each row, alone on a minimal config: mapped rows land at their target with the converted value; drop and
    unsupported rows are reported as such, with the row's reason."""
    in_config = rule.scope == "config"
    value, expected, *rest = SAMPLES[rule.key] if rule.action == "map" else ("x", None, {}, rule.action)
    extra, status = (rest + [{}, "mapped"][len(rest):])[:2]
    config, dataset = dict(BASE_CONFIG), dict(BASE_DATASET)
    (config if in_config else dataset).update({**extra, rule.key: value})
    if dataset.get("type") == "aws":
        dataset.pop("instance_data_dir")
    result = import_simpletuner(*write_files(tmp_path, config, [dataset]))
    [entry] = [e for e in entries_for(result, rule.key) if (e.where == "") == in_config]
    expected_status = {"drop": "dropped"}.get(status, status)
    if expected_status == EITHER:
        assert entry.status == "mapped" or entry.status == "unsupported" and "refuses" in entry.note
        expected_status = entry.status
    assert entry.status == expected_status, entry.line()
    if expected_status in ("dropped", "unsupported"):
        assert entry.note
        if rule.action != "map":
            assert entry.note == rule.note
        return
    expected = expected(tmp_path) if callable(expected) else expected
    section = result.data if in_config else result.data["datasets"][0]
    assert dig(section, rule.target) == expected
    load_spec(data=result.data, check_paths=False)  # the written spec validates


def test_every_mapped_row_has_a_sample():
    assert {r.key for r in TABLE if r.action == "map"} == set(SAMPLES)


def test_unknown_keys_are_reported_not_dropped(tmp_path):
    result = import_simpletuner(*write_files(tmp_path, {**BASE_CONFIG, "--frobnicate": 3},
                                             [{**BASE_DATASET, "sparkle": True}]))
    for key in ("--frobnicate", "sparkle"):
        [entry] = [e for e in result.entries if e.key == key]
        assert entry.status == "unsupported" and "does not know" in entry.note
        assert key in result.report()


def test_unsupported_values_say_what_applies(tmp_path):
    config = {**BASE_CONFIG, "lr_scheduler": "rex", "base_model_precision": "fp8-quanto",
              "mixed_precision": "fp16"}
    result = import_simpletuner(*write_files(tmp_path, config, [{**BASE_DATASET, "crop_style": "face"}]))
    notes = {e.key: e.note for e in result.entries if e.status == "unsupported"}
    assert notes["lr_scheduler"].endswith("flux_ray's default 'constant' applies")
    assert notes["base_model_precision"].startswith("'fp8-quanto'")
    assert notes["base_model_precision"].endswith("'no_change' applies")
    assert notes["mixed_precision"].endswith("'bf16' applies")
    assert notes["crop_style"].endswith("'center' applies")
    assert result.data["train"] == {"max_train_steps": 10} and result.data["datasets"] == [{"id": "d", "type": "local",
                                                                       "instance_data_dir": str(tmp_path / "data")}]


def test_config_keys_are_defaults_for_datasets(tmp_path):
    """config.json's resolution / resolution_type apply to datasets that do not set their own (area: megapixels)."""
    config = {**BASE_CONFIG, "--resolution_type": "area", "--resolution": 0.25, "caption_dropout_probability": 0.2}
    datasets = [{**BASE_DATASET, "id": "a"}, {**BASE_DATASET, "id": "b", "resolution": 1.0}]
    data = import_simpletuner(*write_files(tmp_path, config, datasets)).data
    assert [d["resolution"] for d in data["datasets"]] == [500, 1000]
    assert {d["resolution_type"] for d in data["datasets"]} == {"pixel_area"}
    assert {d["caption_dropout_probability"] for d in data["datasets"]} == {0.2}


def test_spec_refusals_become_unsupported(tmp_path):
    """A mapped value the spec refuses (here: whole-model CPU offload, and group offload without gradient
    checkpointing) is reported as not supported yet with the spec's reason, and the spec still validates."""
    config = {**BASE_CONFIG, "enable_model_cpu_offload": True}
    result = import_simpletuner(*write_files(tmp_path, config, [BASE_DATASET]))
    [entry] = entries_for(result, "enable_model_cpu_offload")
    assert entry.status == "unsupported" and "not supported for training" in entry.note
    assert "enable_model_cpu_offload" not in result.data.get("model", {})
    config = {**BASE_CONFIG, "enable_group_offload": True, "group_offload_type": "leaf_level"}
    result = import_simpletuner(*write_files(tmp_path, config, [BASE_DATASET]))
    [entry] = entries_for(result, "enable_group_offload")
    assert entry.status == "unsupported" and "gradient_checkpointing" in entry.note
    assert result.data["model"] == {"model_family": "flux", "group_offload_type": "leaf_level"}
    load_spec(data=result.data, check_paths=False)


def test_refusal_messages_blame_the_key_they_name(tmp_path):
    """Refusals that reach the importer only as text (load_spec's checks after the model) or as a model-level
    error are pinned on the mapped key whose spec path the message names, e.g. maximum_image_size."""
    from flux_ray.simpletuner.convert import _blame, _blame_text

    datasets = [{**BASE_DATASET, "repeats": 2}, {**BASE_DATASET, "id": "big", "maximum_image_size": 2048}]
    result = import_simpletuner(*write_files(tmp_path, BASE_CONFIG, datasets))
    [reg] = [e for e in result.entries if e.key == "maximum_image_size"]
    assert reg.status == "unsupported" and "refuses" in reg.note  # the spec's own refusal, pinned on its key
    [rep] = [e for e in result.entries if e.key == "repeats" and e.status == "mapped"]
    text = f"invalid job spec (dict):\n  {'.'.join(map(str, rep.path))}: not supported yet"
    assert [e for e, _ in _blame_text(text, result.entries)] == [rep]
    assert _blame_text("train.max_train_steps: too many", result.entries)[0][0].key == "max_train_steps"
    model_level = {"loc": rep.path[:2], "msg": "Value error, repeats is not supported yet"}
    assert _blame(model_level, result.entries)[0] is rep
    assert _blame({"loc": rep.path[:2], "msg": "Value error, something else"}, result.entries) is None


def test_a_mask_dataset_carries_over(tmp_path):
    datasets = [{**BASE_DATASET, "conditioning_data": ["masks"]},
                {**BASE_DATASET, "id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask"}]
    result = import_simpletuner(*write_files(tmp_path, BASE_CONFIG, datasets))
    image, masks = result.data["datasets"]
    assert image["conditioning_data"] == ["masks"]
    assert (masks["dataset_type"], masks["conditioning_type"]) == ("conditioning", "mask")
    load_spec(data=result.data, check_paths=False)


def test_aws_dataset_keeps_credentials_out(tmp_path):
    dataset = {"id": "s3data", "type": "aws", "aws_bucket_name": "bucket", "aws_data_prefix": "imgs/",
               "aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "wJalrXUtnFEMIEXAMPLE"}
    result = import_simpletuner(*write_files(tmp_path, BASE_CONFIG, [dataset]))
    assert result.data["datasets"] == [{"id": "s3data", "type": "s3", "aws_bucket_name": "bucket",
                                        "aws_data_prefix": "imgs/"}]
    text = result.to_yaml() + result.report()
    assert "AKIDEXAMPLE" not in text and "wJalrXUtnFEMIEXAMPLE" not in text
    assert [e.status for e in result.entries if e.key.startswith("aws_") and "access" in e.key] == ["dropped"] * 2


def test_working_dir_option(tmp_path):
    cfg, backend = write_files(tmp_path, {**BASE_CONFIG, "output_dir": "out"}, [BASE_DATASET])
    default = import_simpletuner(cfg, backend).data
    assert default["datasets"][0]["instance_data_dir"] == str(tmp_path / "data")
    elsewhere = import_simpletuner(cfg, backend, working_dir=tmp_path / "st").data
    assert elsewhere["datasets"][0]["instance_data_dir"] == str(tmp_path / "st" / "data")
    assert elsewhere["output"]["uri"] == str(tmp_path / "st" / "out")


def test_backend_path_from_config(tmp_path):
    cfg, _ = write_files(tmp_path, {"model_family": "flux", "--data_backend_config": "config/multidatabackend.json"},
                         [BASE_DATASET])
    result = import_simpletuner(cfg)
    assert result.data["datasets"][0]["id"] == "d"
    assert any("sets no max_train_steps: flux_ray's default 100 applies" in w for w in result.warnings)


@pytest.mark.parametrize("config, datasets, words", [
    ({**BASE_CONFIG, "lora_rank": "sixteen"}, [BASE_DATASET], ["config.json", "lora_rank", "integer", "sixteen"]),
    ({**BASE_CONFIG, "--gradient_checkpointing": "maybe"}, [BASE_DATASET],
     ["config.json", "--gradient_checkpointing", "true or false"]),
    (BASE_CONFIG, [{**BASE_DATASET, "repeats": "many"}], ["multidatabackend.json", "datasets[0] d", "repeats"]),
    (BASE_CONFIG, [BASE_DATASET, {"type": "local", "instance_data_dir": "x"}],
     ["multidatabackend.json", "datasets[1]", "id"]),
    (BASE_CONFIG, {"id": "d"}, ["multidatabackend.json", "JSON list"]),
    ({**BASE_CONFIG, "lora_rank": 4, "--lora_rank": 8}, [BASE_DATASET], ["config.json", "lora_rank", "--lora_rank"]),
    ({**BASE_CONFIG, "model_type": "full"}, [BASE_DATASET], ["config.json", "model_type", "full fine-tune"]),
    ({**BASE_CONFIG, "model_family": "sdxl"}, [BASE_DATASET], ["model_family", "Flux.1 only"]),
    ({"model_family": "flux", "num_train_epochs": 10}, [BASE_DATASET], ["num_train_epochs", "max_train_steps"]),
    ({**BASE_CONFIG, "lycoris_config": "config/missing.json"}, [BASE_DATASET], ["lycoris_config", "missing.json"]),
    (BASE_CONFIG, [{"id": "t", "dataset_type": "text_embeds"}], ["multidatabackend.json", "dataset_type: image"]),
    (BASE_CONFIG, [{"id": "d", "type": "local"}], ["datasets.0", "instance_data_dir"]),
], ids=["wrong-int", "wrong-bool", "dataset-wrong-int", "dataset-without-id", "backend-not-a-list", "key-twice",
        "full-finetune", "not-flux", "epochs-only", "unreadable-lycoris", "no-image-dataset", "no-source"])
def test_errors_name_file_and_key(tmp_path, config, datasets, words):
    with pytest.raises(SpecError) as e:
        import_simpletuner(*write_files(tmp_path, config, datasets))
    for word in words:
        assert word in str(e.value)


def test_unreadable_files(tmp_path):
    cfg, backend = write_files(tmp_path, BASE_CONFIG, [BASE_DATASET])
    with pytest.raises(SpecError, match="cannot read SimpleTuner config .*nope.json"):
        import_simpletuner(tmp_path / "nope.json", backend)
    with pytest.raises(SpecError, match="cannot read SimpleTuner data backend config .*gone.json"):
        import_simpletuner(cfg, tmp_path / "gone.json")
    backend.write_text("[{")
    with pytest.raises(SpecError, match="multidatabackend.json is not valid JSON"):
        import_simpletuner(cfg, backend)
    with pytest.raises(SpecError, match="cannot read .*absent.json"):
        import_simpletuner(cfg, tmp_path / "config" / "prompts.json", user_prompt_library=tmp_path / "absent.json")
    backend.write_text(json.dumps([BASE_DATASET]))
    (tmp_path / "lib.json").write_text('["not", "a", "mapping"]')
    with pytest.raises(SpecError, match="user-prompt-library.*lib.json must hold a JSON object"):
        import_simpletuner(cfg, backend, user_prompt_library=tmp_path / "lib.json")


# ---------------------------------------------------------------- the Flux quickstart's files

@pytest.fixture
def quickstart(tmp_path, demo_data_dir) -> Path:
    """The quickstart tree (config/config.json, config/multidatabackend.json, config/user_prompt_library.json)
    with its datasets/ folders pointed at the demo images."""
    root = tmp_path / "simpletuner"
    shutil.copytree(FIXTURES, root)
    (root / "datasets").mkdir()
    for name in ("pseudo-camera-10k", "dreambooth-subject"):
        (root / "datasets" / name).symlink_to(demo_data_dir, target_is_directory=True)
    return root


def test_quickstart_import_and_validate_cli(quickstart, capsys):
    cfg, backend = quickstart / "config" / "config.json", quickstart / "config" / "multidatabackend.json"
    out = quickstart / "spec.yaml"
    assert main(["import-simpletuner", str(cfg), "--data-backend-config", str(backend), "-o", str(out)]) == 0
    report = capsys.readouterr().err
    assert main(["validate", str(out)]) == 0
    assert "pseudo-camera-10k-flux" in capsys.readouterr().out
    spec = load_spec(out)
    assert [d.id for d in spec.datasets] == ["pseudo-camera-10k-flux", "dreambooth-subject", "dreambooth-subject-512"]
    assert [(d.resolution, d.repeats, d.caption_strategy) for d in spec.datasets] == [
        (512, 0, "filename"), (1024, 1000, "instanceprompt"), (512, 1000, "instanceprompt")]
    assert {d.instance_prompt for d in spec.datasets[1:]} == {"a photo of sks subject"}
    assert (spec.lora.flux_lora_target, spec.lora.lora_rank) == ("all", 16)
    assert spec.model.base_model_precision == "int8-quanto"
    assert spec.eval.user_prompt_library == str(quickstart / "config" / "user_prompt_library.json")
    assert spec.output.uri == str(quickstart / "output" / "models")
    # every key of both files is in the report, once per place it applies
    config = json.loads(cfg.read_text())
    for key in config:
        assert f"config.json: {key} = " in report or f"config.json: datasets[" in report and f": {key} = " in report
    for i, d in enumerate(json.loads(backend.read_text())):
        for key in d:
            assert f"multidatabackend.json: datasets[{i}] {d['id']}: {key} = " in report, key
    assert "--report_to = 'wandb': flux_ray logs to MLflow" in report
    assert "cache_dir_vae" in report and "dataset_type text_embeds" in report
    reg = [line for line in report.splitlines() if "is_regularisation_data" in line]
    assert len(reg) == 1 and ("-> datasets.pseudo-camera-10k-flux.is_regularisation_data = True" in reg[0]
                              or "refuses it" in reg[0])
    # without -o the spec goes to stdout
    assert main(["import-simpletuner", str(cfg), "--data-backend-config", str(backend)]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(out.read_text())


def test_quickstart_prompt_library_option(quickstart, tmp_path):
    lib = tmp_path / "mine.json"
    lib.write_text(json.dumps({"a": "b"}))
    result = import_simpletuner(quickstart / "config" / "config.json", user_prompt_library=lib)
    assert result.data["eval"]["user_prompt_library"] == str(lib)
    [old] = [e for e in result.entries if e.key == "--user_prompt_library"]
    assert old.status == "dropped" and "overridden" in old.note


TINY = ["model.model_flavour=dev", "model.pretrained_vae_model_name_or_path=null", "model.tokenizer_max_length=32",
        "model.base_model_precision=no_change", "model.base_model_default_dtype=fp32", 'train.mixed_precision="no"',
        "train.max_train_steps=2", "train.checkpointing_steps=2", "train.log_every=1",
        "train.gradient_checkpointing=false", "eval.validation_step_interval=2", "eval.validation_resolution=64x64",
        "eval.validation_num_inference_steps=2"]


@pytest.mark.slow
def test_quickstart_trains_on_tiny_model(quickstart, ray_session, tiny_model_dir, shared_demo_cache, tmp_path):
    """The imported quickstart spec trains: its three image datasets (regularisation 512 crop-square, DreamBooth
    1024 and 512 with repeats 1000) at tiny sizes on the demo images, 2 steps, prompt-library validation."""
    from flux_ray import job

    result = import_simpletuner(quickstart / "config" / "config.json")
    sizes = {"pseudo-camera-10k-flux": 64, "dreambooth-subject": 128, "dreambooth-subject-512": 64}
    overrides = [*TINY, f"model.pretrained_model_name_or_path={tiny_model_dir}", f"cache.uri={shared_demo_cache}",
                 f"output.uri={tmp_path / 'out'}"]
    for ds, size in sizes.items():
        overrides += [f"datasets.{ds}.resolution={size}", f"datasets.{ds}.minimum_image_size=null",
                      f"datasets.{ds}.maximum_image_size=null", f"datasets.{ds}.target_downsample_size=null"]
    spec = load_spec(data=result.data, overrides=overrides)
    summary = job.run(spec)
    assert summary["steps"] == 2 and Path(summary["lora"]).is_file()
    assert {k: v["usable"] for k, v in summary["cache"]["datasets"].items()} == dict.fromkeys(sizes, 24)
    rendered = {p.name for p in Path(spec.run_uri).rglob("*.png")}
    assert any("just_sks" in name for name in rendered), rendered
