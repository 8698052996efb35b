"""Driver side of training: plans and submits a TorchTrainer, then writes the LoRA and the run summary."""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from flux_ray import storage
from flux_ray.spec import JobSpec

log = logging.getLogger("flux_ray.train")


@dataclass
class TrainOutcome:
    run_uri: str
    lora_uri: str
    checkpoint_uri: str | None
    steps: int
    final_loss: float | None
    eval_loss: float | None
    metrics: dict


def scaling_config(spec: JobSpec):
    from ray.train import ScalingConfig

    resources = spec.scaling.resources_per_worker
    if resources is None and not spec.scaling.use_gpu:
        resources = {"CPU": 1}
    return ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                         resources_per_worker=resources, placement_strategy=spec.scaling.placement_strategy)


def run_config(spec: JobSpec, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    from flux_ray.quiet import is_quiet

    fs, path = storage.resolve(spec.output.uri, spec.storage)
    storage.ensure_bucket(spec.output.uri, spec.storage)
    is_remote = "://" in spec.output.uri and not spec.output.uri.startswith("file://")
    return RunConfig(name=spec.name, storage_path=path, storage_filesystem=fs if is_remote else None,
                     checkpoint_config=CheckpointConfig(num_to_keep=spec.train.checkpoints_total_limit),
                     failure_config=FailureConfig(max_failures=spec.scaling.max_failures), callbacks=callbacks or [],
                     logging_config=LoggingConfig(log_level="WARNING" if is_quiet() else "INFO"))


def build_trainer(spec: JobSpec, callbacks: list | None = None):
    from ray.train.torch import TorchConfig, TorchTrainer

    from flux_ray.train.worker import train_loop_per_worker

    backend = "nccl" if spec.scaling.use_gpu else "gloo"
    return TorchTrainer(train_loop_per_worker, train_loop_config={"spec": spec.model_dump(mode="json")},
                        scaling_config=scaling_config(spec), run_config=run_config(spec, callbacks),
                        torch_config=TorchConfig(backend=backend))


def export_final_lora(spec: JobSpec, checkpoint_dir: str, metrics: dict) -> str:
    """Write the LoRA of a checkpoint in each export format under <run>/lora/; returns the diffusers file URI."""
    from safetensors.torch import load_file

    from flux_ray.core.lora import LORA_WEIGHT_NAME, save_diffusers_lora, to_standard_lora
    from flux_ray.train.checkpoint import LORA_FILE, LORA_INIT_FILE

    peft_sd = load_file(str(Path(checkpoint_dir) / LORA_FILE))
    if spec.lora.lora_type == "lycoris":
        return _export_lycoris(spec, peft_sd, metrics)
    lora_spec = spec.lora
    if (Path(checkpoint_dir) / LORA_INIT_FILE).exists():
        peft_sd, lora_spec = to_standard_lora(peft_sd, load_file(str(Path(checkpoint_dir) / LORA_INIT_FILE)), lora_spec)
        spec = spec.model_copy(update={"lora": lora_spec})
    meta = lora_file_metadata(spec, metrics)
    out_uri = storage.join(spec.run_uri, "lora")
    with tempfile.TemporaryDirectory() as d:
        path = save_diffusers_lora(d, peft_sd, lora_spec, extra_metadata=meta)
        for fmt in spec.output.export_formats:  # each converted from the diffusers file, which moves last
            if fmt == "diffusers":
                continue
            from flux_ray.families import get_family

            p = get_family(spec.model.model_family).export_lora_file(path, fmt, Path(d) / fmt, spec=spec, metadata=meta)
            storage.put_file_atomic(p, storage.join(out_uri, fmt, p.name), spec.storage)
        storage.put_file_atomic(path, storage.join(out_uri, LORA_WEIGHT_NAME), spec.storage)
    return storage.join(out_uri, LORA_WEIGHT_NAME)


def _export_lycoris(spec: JobSpec, state: dict, metrics: dict) -> str:
    """LyCORIS's own format: its network state dict plus its config in the safetensors metadata."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in lora_file_metadata(spec, metrics).items()}
    meta["lycoris_config"] = json.dumps(spec.lora.lycoris_config)
    uri = storage.join(spec.run_uri, "lora", "lycoris_weights.safetensors")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "lycoris_weights.safetensors"
        save_file(state, str(path), metadata=meta)
        storage.write_bytes_atomic(uri, path.read_bytes(), spec.storage)
    return uri


def lora_file_metadata(spec: JobSpec, metrics: dict) -> dict:
    prompts = [d.instance_prompt for d in spec.enabled_datasets() if d.instance_prompt]
    return {"base_model": spec.model.base_path, "model_family": spec.model.model_family,
            "model_flavour": spec.model.model_flavour,
            "lora_rank": spec.lora.lora_rank, "lora_alpha": spec.lora.alpha, "training_steps": metrics.get("step", 0),
            "dataset_ids": [d.id for d in spec.enabled_datasets()], "instance_prompt": prompts[0] if prompts else ""}


def train(spec: JobSpec, *, tracking: tuple[str, str] | None = None, extra_callbacks: list | None = None) -> TrainOutcome:
    """Run Ray Train for the spec (resuming from the run's latest checkpoint) and export the LoRA."""
    from flux_ray.tracking.ray_callback import MlflowReportCallback

    callbacks = list(extra_callbacks or [])
    if tracking:
        callbacks.append(MlflowReportCallback(tracking[0], tracking[1], spec.storage))
    result = build_trainer(spec, callbacks).fit()
    if result.error:
        raise result.error
    metrics = dict(result.metrics or {})
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        lora_uri = export_final_lora(spec, d, metrics)
    return TrainOutcome(run_uri=spec.run_uri, lora_uri=lora_uri, checkpoint_uri=result.checkpoint.path,
                        steps=int(metrics.get("step", 0)), final_loss=metrics.get("train_loss"),
                        eval_loss=metrics.get("eval_loss"), metrics=metrics)


def write_run_summary(spec: JobSpec, summary: dict) -> str:
    uri = storage.join(spec.run_uri, "run_summary.json")
    storage.write_json_atomic(uri, summary, spec.storage)
    return uri


def outcome_dict(o: TrainOutcome) -> dict:
    return json.loads(json.dumps(asdict(o), default=str))
