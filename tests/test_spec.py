"""The job spec: defaults, overrides, and clear errors for bad input before any work starts."""
from __future__ import annotations

import glob
import os

import pytest
import yaml

from flux_ray.spec import JobSpec, SpecError, flat_params, load_spec, spec_to_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, data) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def _minimal(tmp_path, demo_data_dir) -> dict:
    return {"name": "t", "datasets": [{"id": "d", "instance_data_dir": demo_data_dir}],
            "output": {"uri": str(tmp_path / "out")}, "cache": {"uri": str(tmp_path / "cache")}}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "jobs", "*.yaml"))))
def test_every_shipped_job_spec_parses(path):
    spec = load_spec(path, check_paths=False)
    assert isinstance(spec, JobSpec)
    assert spec.enabled_datasets("image")


def test_defaults_follow_simpletuner_names(tmp_path, demo_data_dir):
    spec = load_spec(_write(tmp_path, _minimal(tmp_path, demo_data_dir)))
    assert spec.lora.lora_rank == 16 and spec.lora.alpha == 16.0
    assert spec.model.model_flavour == "krea"
    assert spec.model.base_path == "black-forest-labs/FLUX.1-Krea-dev"
    assert spec.lora.target_modules == ["to_k", "to_q", "to_v", "add_k_proj", "add_q_proj", "add_v_proj",
                                        "to_out.0", "to_add_out"]
    text = spec_to_yaml(spec)
    assert "max_train_steps: 100" in text and "caption_strategy: textfile" in text


def test_simpletuner_spellings_are_aliases(tmp_path, demo_data_dir):
    """type: aws is an S3 dataset and loss_type: l2 the mean squared error, as in SimpleTuner's configs."""
    data = _minimal(tmp_path, demo_data_dir)
    data["datasets"].append({"id": "remote", "type": "aws", "aws_bucket_name": "b"})
    data["flow"] = {"loss_type": "l2"}
    spec = load_spec(_write(tmp_path, data))
    assert spec.datasets[1].type == "s3" and spec.flow.loss_type == "mse"
    assert "type: s3" in spec_to_yaml(spec) and "loss_type: mse" in spec_to_yaml(spec)


def test_schnell_defaults(tmp_path, demo_data_dir):
    data = _minimal(tmp_path, demo_data_dir)
    data["model"] = {"model_flavour": "schnell"}
    spec = load_spec(_write(tmp_path, data))
    assert spec.model.t5_max_length == 256 and spec.fast_schedule
    assert spec.model.base_path == "black-forest-labs/FLUX.1-schnell"


def test_set_overrides_any_key_by_dotted_path(tmp_path, demo_data_dir):
    path = _write(tmp_path, _minimal(tmp_path, demo_data_dir))
    spec = load_spec(path, ["train.learning_rate=3e-4", "lora.lora_rank=4", "datasets.d.repeats=2",
                            "datasets.0.resolution=512"])
    assert spec.train.learning_rate == 3e-4 and spec.lora.lora_rank == 4
    assert spec.datasets[0].repeats == 2 and spec.datasets[0].resolution == 512


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["train"].update(learnign_rate=1), "train.learnign_rate: unknown key"),
    (lambda d: d.update(trian={}), "trian: unknown key"),
    (lambda d: d["train"].update(max_train_steps="many"), "train.max_train_steps: Input should be a valid integer"),
    (lambda d: d["lora"].update(flux_lora_target="everything"), "lora.flux_lora_target"),
    (lambda d: d["datasets"][0].update(caption_strategy="instanceprompt"), "needs instance_prompt"),
    (lambda d: d.update(datasets=[]), "datasets: List should have at least 1 item"),
    (lambda d: (d["model"].update(base_model_precision="int8-quanto"), d["lora"].update(lora_init_type="loftq")),
     "loftq cannot be used with a quantized base"),
    (lambda d: d["train"].update(tread_config={"routes": []}), "train.tread_config.routes: List should have at least 1"),
    (lambda d: d["train"].update(tread_config={"routes": [{"selection_ratio": 1.0, "start_layer_idx": 2,
                                                           "end_layer_idx": -2}]}),
     "train.tread_config.routes.0.selection_ratio: Input should be less than 1"),
    (lambda d: d["train"].update(tread_config={"routes": [{"selection_ratio": 0.5, "start_layer_idx": 5,
                                                           "end_layer_idx": 2}]}),
     "start_layer_idx (5) comes after end_layer_idx (2)"),
    (lambda d: d["train"].update(attention_backend="cudnn"), "train: train.attention_backend cudnn needs train.compile"),
    (lambda d: d["train"].update(mixed_precision="no"), "train.mixed_precision 'no' runs the step in fp32, but "
                                                        "model.base_model_default_dtype is bf16"),
])
def test_bad_spec_names_key_and_problem(tmp_path, demo_data_dir, mutate, expected):
    data = _minimal(tmp_path, demo_data_dir)
    data.update(train={}, lora={}, model={})
    mutate(data)
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, data))
    assert expected in str(e.value)
    assert "job.yaml" in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_missing_and_empty_dataset_dirs_fail_fast(tmp_path, demo_data_dir):
    data = _minimal(tmp_path, demo_data_dir)
    data["datasets"][0]["instance_data_dir"] = str(tmp_path / "nope")
    with pytest.raises(SpecError, match=r"datasets\.0\.instance_data_dir: directory .*nope.* does not exist"):
        load_spec(_write(tmp_path, data))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    data["datasets"][0]["instance_data_dir"] = str(empty)
    with pytest.raises(SpecError, match=r"datasets\.0\.instance_data_dir: .* holds no images"):
        load_spec(_write(tmp_path, data))
    assert not (tmp_path / "out").exists()


def test_cli_validate_reports_bad_spec_without_traceback(tmp_path, demo_data_dir, capsys):
    from flux_ray.cli import main

    data = _minimal(tmp_path, demo_data_dir)
    data["lora"] = {"lora_rnak": 4}
    assert main(["validate", _write(tmp_path, data)]) == 2
    err = capsys.readouterr().err
    assert "lora.lora_rnak: unknown key" in err and "Traceback" not in err


def test_flat_params_drop_secrets(tmp_path, demo_data_dir):
    data = _minimal(tmp_path, demo_data_dir)
    spec = load_spec(_write(tmp_path, data))
    flat = flat_params(spec)
    assert flat["train.learning_rate"] == 1e-4
    assert flat["datasets.d.resolution"] == 1024
    from flux_ray.spec import is_secret_key

    assert not any(is_secret_key(part) for k in flat for part in k.split("."))
    assert flat["model.tokenizer_max_length"] == spec.model.tokenizer_max_length  # a "token" word, not a secret


def test_tread_config_parses_simpletuner_form(tmp_path, demo_data_dir):
    data = _minimal(tmp_path, demo_data_dir)
    data["train"] = {"tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}}
    route = load_spec(_write(tmp_path, data)).train.tread_config.routes[0]
    assert (route.selection_ratio, route.start_layer_idx, route.end_layer_idx) == (0.5, 2, -2)


OFFLOAD = {"enable_group_offload": True}


@pytest.mark.parametrize("model, train, scaling, lora, expected", [
    (dict(OFFLOAD, enable_model_cpu_offload=True), {}, {}, {},
     "model.enable_group_offload and model.enable_model_cpu_offload are exclusive"),
    ({"enable_model_cpu_offload": True}, {}, {}, {},
     "model.enable_model_cpu_offload is not supported for training"),
    (dict(OFFLOAD, base_model_precision="nf4-bnb"), {"gradient_checkpointing": True}, {}, {},
     "model.enable_group_offload needs an unquantized base (model.base_model_precision='nf4-bnb'"),
    (dict(OFFLOAD, group_offload_use_stream=True, group_offload_blocks_per_group=2), {}, {}, {},
     "set model.group_offload_blocks_per_group to 1"),
    (OFFLOAD, {}, {}, {}, "model.enable_group_offload needs train.gradient_checkpointing"),
    (OFFLOAD, {"gradient_checkpointing": True}, {"strategy": "fsdp"}, {},
     "model.enable_group_offload cannot be used with scaling.strategy fsdp"),
    (OFFLOAD, {"gradient_checkpointing": True}, {"strategy": "deepspeed"}, {},
     "model.enable_group_offload cannot be used with scaling.strategy deepspeed"),
    (OFFLOAD, {"gradient_checkpointing": True}, {"num_workers": 2}, {},
     "model.enable_group_offload runs on one worker (scaling.num_workers=2)"),
    (OFFLOAD, {"gradient_checkpointing": True, "compile": True}, {}, {},
     "model.enable_group_offload cannot be used with train.compile"),
    (OFFLOAD, {"gradient_checkpointing": True}, {}, {"lora_init_type": "pissa"},
     "model.enable_group_offload cannot be used with lora.lora_init_type pissa"),
])
def test_group_offload_refuses_what_it_cannot_run(tmp_path, demo_data_dir, model, train, scaling, lora, expected):
    data = dict(_minimal(tmp_path, demo_data_dir), model=model, train=train, scaling=scaling, lora=lora)
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, data))
    assert expected in str(e.value)


@pytest.mark.parametrize("model, train, scaling, expected", [
    ({}, {"dynamo_mode": "reduce-overhead"}, {}, "train.dynamo_mode reduce-overhead needs train.compile: true"),
    ({}, {"compile": True, "dynamo_mode": "reduce-overhead"}, {"use_gpu": False}, "scaling.use_gpu is false"),
    ({}, {"compile": True, "dynamo_mode": "max-autotune"}, {"use_gpu": True, "strategy": "fsdp"},
     "scaling.strategy is fsdp"),
    ({}, {"compile": True, "dynamo_mode": "reduce-overhead"}, {"use_gpu": True, "num_workers": 2,
                                                               "gradient_sync": "ddp"},
     "scaling.num_workers is 2 with scaling.gradient_sync ddp (two DDP workers under CUDA graphs gave no first report"),
    ({}, {"compile": True, "dynamo_mode": "reduce-overhead"}, {"use_gpu": True, "strategy": "deepspeed"},
     "scaling.strategy is deepspeed"),
    ({"base_model_precision": "int8-quanto"}, {"compile": True, "dynamo_mode": "reduce-overhead"},
     {"use_gpu": True}, "model.base_model_precision is int8-quanto"),
    ({}, {"compile": True, "dynamo_mode": "reduce-overhead",
          "tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": -1}]}},
     {"use_gpu": True}, "train.tread_config routes"),
])
def test_cuda_graph_modes_refuse_what_was_not_measured(tmp_path, demo_data_dir, model, train, scaling, expected):
    data = dict(_minimal(tmp_path, demo_data_dir), model=model, train=train, scaling=scaling)
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, data))
    assert expected in str(e.value)
    data["train"]["dynamo_mode"] = "max-autotune-no-cudagraphs"  # no CUDA graphs: nothing to refuse but compile
    data["train"]["compile"] = True
    spec = load_spec(_write(tmp_path, data))
    assert spec.train.dynamo_mode == "max-autotune-no-cudagraphs" and not spec.train.uses_cuda_graphs
    data["train"].update(dynamo_mode="reduce-overhead", tread_config=None)
    data.update(model={}, scaling={"use_gpu": True})
    assert load_spec(_write(tmp_path, data)).train.uses_cuda_graphs


@pytest.mark.parametrize("train, scaling, allreduce", [
    ({"compile": True, "dynamo_mode": "reduce-overhead"}, {"use_gpu": True, "num_workers": 2}, True),
    ({"compile": True, "dynamo_mode": "max-autotune"},
     {"use_gpu": True, "num_workers": 4, "gradient_sync": "allreduce"}, True),
    ({"compile": True, "dynamo_mode": "reduce-overhead"}, {"use_gpu": True, "num_workers": 1}, False),
    ({"compile": True, "dynamo_mode": "max-autotune-no-cudagraphs"}, {"use_gpu": True, "num_workers": 2}, False),
    ({}, {"num_workers": 2}, False),
    ({}, {"num_workers": 2, "gradient_sync": "allreduce"}, True),
    ({}, {"num_workers": 2, "strategy": "fsdp"}, False),
])
def test_gradient_sync_resolves_to_allreduce_under_cuda_graphs(tmp_path, demo_data_dir, train, scaling, allreduce):
    """auto: several workers under a CUDA-graph mode sync by one flat all-reduce (the refusal of call 33 is lifted
    for them), DDP otherwise; allreduce can be forced without graphs (the CPU tests run it)."""
    data = dict(_minimal(tmp_path, demo_data_dir), train=train, scaling=scaling)
    assert load_spec(_write(tmp_path, data)).syncs_gradients_by_allreduce is allreduce


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
@pytest.mark.parametrize("sync", ["ddp", "allreduce"])
def test_gradient_sync_is_refused_with_other_strategies(tmp_path, demo_data_dir, strategy, sync):
    data = dict(_minimal(tmp_path, demo_data_dir),
                scaling={"num_workers": 2, "strategy": strategy, "gradient_sync": sync})
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, data))
    assert f"scaling.gradient_sync {sync} cannot be used with scaling.strategy {strategy}" in str(e.value)


def test_group_offload_options_follow_simpletuner_names(tmp_path, demo_data_dir):
    data = _minimal(tmp_path, demo_data_dir)
    data["model"] = dict(OFFLOAD, group_offload_type="leaf_level", group_offload_use_stream=True,
                         group_offload_to_disk_path=str(tmp_path / "spill"))
    data["train"] = {"gradient_checkpointing": True}
    m = load_spec(_write(tmp_path, data)).model
    assert (m.group_offload_type, m.group_offload_blocks_per_group, m.group_offload_use_stream) == ("leaf_level", 1, True)
    assert not m.enable_model_cpu_offload


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["datasets"][0].update(is_regularisation_data=True), "the adapter would only learn to stay the base"),
    (lambda d: d["datasets"].append(dict(d["datasets"][0], id="r", is_regularisation_data=True))
     or d["lora"].update(lora_init_type="pissa"), "is_regularisation_data cannot be used with lora.lora_init_type pissa"),
    (lambda d: d["datasets"].append(dict(d["datasets"][0], id="r", is_regularisation_data=True, dataset_type="eval")),
     "is_regularisation_data applies to dataset_type image"),
    (lambda d: d["datasets"][0].update(conditioning_data="nope"), "conditioning_data 'nope' is not the id of a"),
    (lambda d: d["datasets"].append(dict(d["datasets"][0], id="m", dataset_type="conditioning",
                                         conditioning_type="mask")), "are not linked by any image dataset"),
    (lambda d: d["datasets"].append(dict(d["datasets"][0], id="m", dataset_type="conditioning")),
     "needs conditioning_type"),
    (lambda d: d["datasets"][0].update(conditioning_data="m") or d["datasets"].append(dict(
        d["datasets"][0], id="m", dataset_type="conditioning", conditioning_type="controlnet",
        conditioning_data=None)), "conditioning_type controlnet is not supported"),
    (lambda d: d["datasets"][0].update(conditioning_data="m") or d["datasets"].append(dict(
        d["datasets"][0], id="m", dataset_type="conditioning", conditioning_type="reference_strict",
        conditioning_data=None)), "link reference (conditioning) images, which only Kontext reads"),
    (lambda d: d["datasets"][0].update(conditioning_data=["m", "n"]) or d["datasets"].extend([dict(
        d["datasets"][0], id=i, dataset_type="conditioning", conditioning_type="reference_strict",
        conditioning_data=None) for i in "mn"]) or d["model"].update(model_flavour="kontext"),
     "conditioning_data links two reference datasets"),
    (lambda d: d["datasets"][0].update(conditioning_data="m") or d["datasets"].append(dict(
        d["datasets"][0], id="m", dataset_type="conditioning", conditioning_type="reference_loose",
        conditioning_data=None)) or d["model"].update(model_flavour="kontext") or d.update(
        train={"train_batch_size": 2}), "use train.train_batch_size 1"),
    (lambda d: d["datasets"][0].update(conditioning_data="m") or d["datasets"].append(dict(
        d["datasets"][0], id="m", dataset_type="conditioning", conditioning_type="reference_strict",
        conditioning_data=None)) or d["model"].update(model_flavour="kontext") or d.update(
        eval={"validation_step_interval": 5, "validation_prompt": "x"}), "set eval.validation_reference_image"),
    (lambda d: d["datasets"][0].update(conditioning_data="m") or d["datasets"].append(dict(
        d["datasets"][0], id="m", dataset_type="conditioning", conditioning_type="reference_strict",
        conditioning_data=None)) or d["model"].update(model_flavour="kontext") or d.update(
        eval={"validation_reference_image": "/no/such.png"}), "eval.validation_reference_image '/no/such.png'"),
    (lambda d: d["datasets"][0].update(conditioning_data="m") or d["datasets"].append(dict(
        d["datasets"][0], id="m", dataset_type="conditioning", conditioning_type="reference_strict",
        conditioning_data=None)) or d["model"].update(model_flavour="kontext") or d.update(
        train={"tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 1}]}}),
     "TREAD's token routing does not know the reference tokens"),
    (lambda d: d.update(eval={"validation_reference_image": "x.png"}), "is the reference image of Kontext"),
    (lambda d: d["datasets"][0].update(conditioning_data="m") or d["datasets"].append(dict(
        d["datasets"][0], id="m", dataset_type="conditioning", conditioning_type="mask", conditioning_data=None,
        crop=True)), "crop: a mask dataset takes its crop"),
    (lambda d: d["datasets"][0].update(conditioning_type="mask"), "conditioning_type applies to dataset_type"),
    (lambda d: d["datasets"][0].update(crop=True, crop_aspect="closest"), "crop_aspect closest needs"),
    (lambda d: d["datasets"][0].update(crop=True, crop_aspect="random"), "crop_aspect random needs"),
    (lambda d: d["datasets"][0].update(crop_aspect="square"), "crop_aspect square acts only with crop: true"),
    (lambda d: d["datasets"][0].update(maximum_image_size=2048, target_downsample_size=1024),
     "maximum_image_size and target_downsample_size act only with crop: true"),
    (lambda d: d["datasets"][0].update(crop=True, maximum_image_size=2048), "maximum_image_size needs target_downsample"),
    (lambda d: d["model"].update(model_flavour="kontext"), "link no reference dataset; Kontext trains on"),
    (lambda d: d.update(flow={"flow_schedule_auto_shift": True, "flow_schedule_shift": 3.0}),
     "flow.flow_schedule_shift is ignored when flow.flow_schedule_auto_shift is true"),
    (lambda d: d["lora"].update(lora_type="lycoris", lora_rank=4), "lora.lora_rank: LyCORIS takes its shape"),
    (lambda d: d["lora"].update(lora_type="lycoris", lora_dropout=0.1, flux_lora_target="mmdit"),
     "lora.lora_dropout, lora.flux_lora_target: LyCORIS"),
    (lambda d: d["lora"].update(lora_type="lycoris", init_lora="x.safetensors"), "lora.init_lora: LyCORIS"),
    (lambda d: d.update(eval={"eval_steps_interval": 10}), "eval.eval_steps_interval needs eval data"),
    (lambda d: d["datasets"][0].update(captioner={"model_name": "org/blip"}),
     "datasets.0: captioner is used only by caption_strategy auto (got 'textfile')"),
    (lambda d: d.update(flow={"flow_beta_schedule_alpha": 3.0}), "act only with flow.flow_use_beta_schedule"),
    (lambda d: d["train"].update(lr_scheduler="sine"), "sine takes its period from train.lr_warmup_steps"),
    (lambda d: d["train"].update(lr_num_cycles=3, lr_scheduler="cosine"), "lr_num_cycles acts only with"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path, demo_data_dir, mutate, expected):
    """Issue 20 case 2 and 3: every option acts or is refused, with the reason and the alternative."""
    data = _minimal(tmp_path, demo_data_dir)
    data.update(train={}, lora={}, model={})
    mutate(data)
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, data))
    assert expected in str(e.value)


def test_a_mask_dataset_links_by_conditioning_data(tmp_path, demo_data_dir):
    data = _minimal(tmp_path, demo_data_dir)
    data["datasets"][0]["conditioning_data"] = ["m"]  # SimpleTuner allows a list
    data["datasets"].append({"id": "m", "instance_data_dir": demo_data_dir, "dataset_type": "conditioning",
                             "conditioning_type": "mask"})
    spec = load_spec(_write(tmp_path, data))
    assert spec.mask_dataset(spec.datasets[0]).id == "m"
    assert [d.id for d in spec.latent_datasets()] == ["d"]  # the masks are not VAE-encoded


def test_refusals_leave_the_working_forms_alone(tmp_path, demo_data_dir):
    data = _minimal(tmp_path, demo_data_dir)
    data["datasets"][0].update(crop=True, crop_aspect="square", maximum_image_size=2048, target_downsample_size=1024)
    data["datasets"].append({"id": "ev", "instance_data_dir": demo_data_dir, "dataset_type": "eval"})
    data.update(lora={"lora_type": "lycoris", "lora_rank": 16}, flow={"flow_schedule_shift": 3.0},
                eval={"eval_steps_interval": 10})
    spec = load_spec(_write(tmp_path, data))
    again = JobSpec.model_validate(spec.model_dump(mode="json"))  # what a Ray worker does: every default dumped
    assert again.lora.lora_type == "lycoris" and again.flow.flow_schedule_shift == 3.0
    data["datasets"].pop()
    data["eval"]["eval_split_fraction"] = 0.1
    assert load_spec(_write(tmp_path, data)).eval.eval_steps_interval == 10


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["datasets"][0].update(trigger_word=" "), "datasets.0: trigger_word must be a non-empty word"),
    (lambda d: d["datasets"][0].update(trigger_word="[trigger]"), "without '[trigger]'"),
    (lambda d: d["datasets"][0].update(caption_strategy="auto", captioner={"num_actors": 0}),
     "datasets.0.captioner.num_actors: Input should be greater than or equal to 1 (got 0)"),
    (lambda d: d["datasets"][0].update(caption_strategy="auto", captioner={"gpus_per_actor": 2}),
     "datasets.0.captioner.gpus_per_actor: Input should be less than or equal to 1 (got 2)"),
    (lambda d: d["datasets"][0].update(caption_strategy="auto", captioner={"precision": "int8"}),
     "datasets.0.captioner.precision"),
    (lambda d: d["datasets"][0].update(caption_strategy="auto", captioner={"max_new_tokens": 0}),
     "datasets.0.captioner.max_new_tokens"),
    (lambda d: d["datasets"][0].update(caption_strategy="auto", captioner={"batch_size": 0}),
     "datasets.0.captioner.batch_size"),
    (lambda d: d["datasets"][0].update(caption_strategy="auto", captioner={"querystr": "x"}),
     "datasets.0.captioner.querystr: unknown key"),
    (lambda d: d["datasets"][0].update(caption_strategy="auto", captioner={"model_name": "s3://b/m"}),
     "captioner.model_name: an s3:// captioner"),
    (lambda d: d["datasets"][0].update(instance_data_dir="/no/such/photos.zip"),
     "datasets.0.instance_data_dir: archive '/no/such/photos.zip' does not exist"),
    (lambda d: d["datasets"][0].update(type="s3", instance_data_dir=None, aws_bucket_name="b",
                                       aws_data_prefix="in/photos.tar", caption_strategy="parquet",
                                       parquet={"path": "m.parquet"}),
     "an archive dataset cannot use caption_strategy parquet"),
    (lambda d: (d["datasets"].append({**d["datasets"][0], "id": "e", "trigger_word": "zkz"}),
                d["datasets"][0].update(trigger_word="ohwx"), d.update(eval={"validation_prompt": "[trigger] dog"})),
     "eval.validation_prompt has [trigger] but the image datasets have several trigger_word values ['ohwx', 'zkz']"),
])
def test_captioning_trigger_word_and_archive_options_are_checked(tmp_path, demo_data_dir, mutate, expected):
    data = _minimal(tmp_path, demo_data_dir)
    mutate(data)
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, data))
    assert expected in str(e.value) and "job.yaml" in str(e.value)


def test_auto_captioning_and_archive_specs_parse(tmp_path, demo_data_dir):
    archive = tmp_path / "photos.zip"
    archive.write_bytes(b"PK")
    data = _minimal(tmp_path, demo_data_dir)
    data["datasets"][0].update(instance_data_dir=str(archive), caption_strategy="auto", trigger_word="ohwx",
                               captioner={"model_name": "./models/blip", "num_actors": 2, "gpus_per_actor": 0.5})
    ds = load_spec(_write(tmp_path, data)).datasets[0]
    assert ds.archive_suffix == ".zip" and ds.trigger_word == "ohwx"
    assert os.path.isabs(ds.captioner.model_name) and ds.captioner.model_name.endswith("models/blip")
    assert ds.captioner.query_str == "<MORE_DETAILED_CAPTION>" and ds.captioner.num_actors == 2


@pytest.mark.parametrize("section, value, expected", [
    ("output", {"export_formats": ["diffusers"], "publish": {"uri": "s3://b/p", "formats": ["kohya"]}},
     "output.publish.formats ['kohya'] are not exported: add them to output.export_formats"),
    ("output", {"publish": {"hub_model_id": "just-a-name"}}, "expected 'owner/name'"),
    ("notify", {"webhook_url": "discord.com/api/webhooks/1/abc"}, "notify.webhook_url: must be an http"),
    ("notify", {"webhook_url": "https://x", "webhook_type": "teams"}, "notify.webhook_type: Input should be"),
    ("notify", {"webhook_max_retries": -1}, "notify.webhook_max_retries"),
])
def test_publish_and_notify_refuse_bad_values(tmp_path, demo_data_dir, section, value, expected):
    data = _minimal(tmp_path, demo_data_dir)
    data.setdefault(section, {}).update(value)
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, data))
    assert expected in str(e.value)


def test_webhook_url_never_reaches_params_identity_or_logged_spec(tmp_path, demo_data_dir):
    from flux_ray.train.run_identity import split_keys

    data = _minimal(tmp_path, demo_data_dir)
    url = "https://discord.com/api/webhooks/123/SECRET-TOKEN"
    data["notify"] = {"webhook_url": url, "webhook_type": "discord", "message_prefix": "team-a"}
    spec = load_spec(_write(tmp_path, data))
    assert spec.notify.webhook_url == url
    params = flat_params(spec)
    assert "notify.webhook_url" not in params and params["notify.webhook_type"] == "discord"
    assert "SECRET-TOKEN" not in str(split_keys(spec))
    logged = spec_to_yaml(spec, redact=True)
    assert "SECRET-TOKEN" not in logged and "webhook_url: null" in logged
    # the logged spec still loads (flux-ray export reads it back), and only credentials were dropped
    from flux_ray.spec import is_secret_key

    again = JobSpec.model_validate(yaml.safe_load(logged))
    assert again.notify.webhook_url is None and again.model.tokenizer_max_length == spec.model.tokenizer_max_length
    assert "model.tokenizer_max_length" in params
    assert [k for k in ("hf_token", "aws_secret_access_key", "aws_access_key_id", "password", "max_new_tokens",
                        "tokenizer_max_length", "webhook_url") if is_secret_key(k)] == \
        ["hf_token", "aws_secret_access_key", "aws_access_key_id", "password", "webhook_url"]
    assert "SECRET-TOKEN" in spec_to_yaml(spec)  # `flux-ray validate` shows the user's own spec


def test_flux2_family_flavours_presets_and_refusals(tmp_path, demo_data_dir):
    """model_family flux2: SimpleTuner's flavours and hub ids, FLUX.2 LoRA presets, FLUX.1 names refused both
    ways, FLUX.1-only options refused with the key named; validation images are accepted."""
    from flux_ray.core.flux2.flavours import FLAVOURS
    from pydantic import ValidationError

    from flux_ray.spec import FLUX2_FLAVOUR_HUB_IDS, FLUX2_LORA_TARGET_PRESETS, LORA_TARGET_PRESETS, ModelSpec

    assert FLUX2_FLAVOUR_HUB_IDS == {k: v.hub_id for k, v in FLAVOURS.items()}
    assert ModelSpec(model_family="flux2").model_flavour == "klein-9b"
    m = ModelSpec(model_family="flux2", model_flavour="klein-4b")
    assert m.base_path == "black-forest-labs/FLUX.2-klein-base-4B"
    assert ModelSpec(model_family="flux2", model_flavour="dev").base_path == "black-forest-labs/FLUX.2-dev"
    assert ModelSpec(model_flavour="dev").base_path == "black-forest-labs/FLUX.1-dev"  # FLUX.1 unchanged
    with pytest.raises(ValidationError, match="not a flavour of model_family flux2"):
        ModelSpec(model_family="flux2", model_flavour="krea")
    with pytest.raises(ValidationError, match="not a flavour of model_family flux "):
        ModelSpec(model_flavour="klein-4b")

    def load(model, lora=None, extra=None):
        data = _minimal(tmp_path, demo_data_dir)
        data["model"] = model
        if lora:
            data["lora"] = lora
        data.update(extra or {})
        return load_spec(_write(tmp_path, data))

    with pytest.raises(SpecError, match=r"lora.flux_lora_target 'attention' is not a preset of model_family flux "):
        load({}, {"flux_lora_target": "attention"})
    f2 = {"model_family": "flux2", "model_flavour": "klein-4b"}
    with pytest.raises(SpecError, match=r"'all\+ffs' is not a preset of model_family flux2"):
        load(f2, {"flux_lora_target": "all+ffs"})
    with pytest.raises(SpecError, match=r"flux_attention_masked_training.*export_formats comfyui/kohya"):
        load(f2, extra={"output": {"export_formats": ["diffusers", "kohya"]},
                        "train": {"flux_attention_masked_training": True}})
    # the memory and speed levers FLUX.2 [dev] needs are wired (tests/core/flux2/test_flux2_levers.py)
    tread = {"tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 1}]}}
    assert load(f2, extra={"train": tread}).train.tread_config.routes[0].end_layer_idx == 1
    for precision in ("int8-quanto", "int4-quanto", "int2-quanto", "nf4-bnb", "int8-torchao", "fp8-torchao"):
        assert load({**f2, "base_model_precision": precision}).model.base_model_precision == precision
    fp8 = load({**f2, "base_compute_dtype": "fp8"}, extra={"scaling": {"use_gpu": True}})
    assert fp8.model.base_compute_dtype == "fp8"
    offload = load({**f2, "enable_group_offload": True}, extra={"train": {"gradient_checkpointing": True}})
    assert offload.model.enable_group_offload
    assert load(f2, extra={"scaling": {"num_workers": 2, "strategy": "fsdp"}}).scaling.strategy == "fsdp"
    spec = load(f2, {"flux_lora_target": "attention"})
    assert spec.lora.target_modules == FLUX2_LORA_TARGET_PRESETS["attention"]
    validation = {"validation_step_interval": 5, "validation_prompt": "x", "evaluation_type": "clip"}
    assert load(f2, extra={"eval": validation}).eval.validation_step_interval == 5  # wired for FLUX.2 (issue #23)
    with pytest.raises(SpecError, match=r"eval.validation_guidance_real \(FLUX.1's true CFG"):
        load(f2, extra={"eval": {**validation, "validation_guidance_real": 4.0}})
    assert load({}, {"flux_lora_target": "tiny"}).lora.target_modules == LORA_TARGET_PRESETS["tiny"]  # FLUX.1's
