"""Per-worker entry point of the TorchTrainer: the only module that calls ``ray.train``."""
from __future__ import annotations

import time

import torch

from flux_ray.spec import JobSpec

_IMPORTED_AT = time.time()  # on a worker: when Ray unpickled the train function (start-up timeline)


def _report(metrics: dict, checkpoint_dir: str | None) -> None:
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=ckpt)


def train_loop_per_worker(config: dict) -> None:
    started_at = time.time()
    import ray.train
    import ray.train.torch

    from flux_ray.train.startup import worker_timeline
    from flux_ray.train.worker_loop import run_worker

    imports_s = time.time() - started_at
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    # Ray's checkpoint is this run's own: a restart after a worker failure, or the run resumed by name.
    run_worker(spec, device, ctx.get_world_rank(), ctx.get_world_size(), checkpoint=ray.train.get_checkpoint(),
               report=_report, wrap=lambda m: _wrap(spec, m, device), started_at=started_at,
               startup={**worker_timeline(started_at, _IMPORTED_AT), "startup_imports_s": imports_s})


def _wrap(spec: JobSpec, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Distribute the LoRA-wrapped transformer by the spec's strategy and ``scaling.gradient_sync``."""
    import ray.train
    import ray.train.torch

    if spec.model.enable_group_offload:  # one worker (spec-checked); build_transformer placed every tensor
        return model
    if ray.train.get_context().get_world_size() == 1 or spec.scaling.strategy == "deepspeed":
        return model.to(device)  # DeepSpeed wraps the model itself after the optimizer exists
    if spec.scaling.strategy == "fsdp":
        from flux_ray.train.fsdp import shard_transformer

        return shard_transformer(model.to(device))
    if spec.syncs_gradients_by_allreduce:  # no DDP: train/stepper.py's FlatAllReduceStepper syncs the replicas
        return model.to(device)
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
