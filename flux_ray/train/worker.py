"""Per-worker entry point of the TorchTrainer: the only module that calls ``ray.train``."""
from __future__ import annotations

import logging
import time

import torch

from flux_ray.spec import JobSpec

log = logging.getLogger("flux_ray.worker")
_IMPORTED_AT = time.time()  # on a worker: when Ray unpickled the train function (start-up timeline)


def _report(metrics: dict, checkpoint_dir: str | None) -> None:
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=ckpt)


def train_loop_per_worker(config: dict) -> None:
    started_at = time.time()
    import ray.train
    import ray.train.torch

    from flux_ray.train.build import build_loop_parts
    from flux_ray.train.checkpoint import load_checkpoint
    from flux_ray.train.loop import train_loop
    from flux_ray.train.startup import worker_timeline

    imports_s = time.time() - started_at
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    parts = build_loop_parts(spec, device, ctx.get_world_rank(), ctx.get_world_size(),
                             wrap=lambda m: _wrap(spec, m, device))
    # Ray's checkpoint is this run's own: a restart after a worker failure, or the run resumed by name (the driver
    # checked its identity, and refuses resume_from_checkpoint: null over old checkpoints). Always take it.
    ckpt = ray.train.get_checkpoint()
    explicit = spec.train.resume_from_checkpoint not in (None, "latest")
    if ckpt is not None:
        with ckpt.as_directory() as d:
            parts.position = load_checkpoint(d, state_io=parts.state_io, lr_scheduler=parts.lr_scheduler)
    elif explicit:  # an s3:// checkpoint is fetched once per node, like the other s3:// inputs
        from flux_ray.node_cache import local_path

        parts.position = load_checkpoint(local_path(spec.train.resume_from_checkpoint, spec.storage),
                                         state_io=parts.state_io, lr_scheduler=parts.lr_scheduler)
    parts.startup.update(worker_timeline(started_at, _IMPORTED_AT), startup_imports_s=imports_s)
    from flux_ray.train.profile import StepProfiler

    profiler = StepProfiler.from_env(parts.rank, device)
    hooks = [h for h in (parts.after_step, profiler.after_step if profiler else None) if h]

    def after_step(step: int) -> None:
        for hook in hooks:
            hook(step)
    parts.after_step = after_step if hooks else None
    if parts.position.step:
        # warning: Ray's workers show WARNING and above in the job's logs, and a resume should be seen there
        log.warning("rank %d resumes at step %d (epoch %d, batch %d)", parts.rank, parts.position.step,
                    parts.position.epoch, parts.position.batch_index)
    train_loop(parts, _report)


def _wrap(spec: JobSpec, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Distribute the LoRA-wrapped transformer by the spec's strategy."""
    import ray.train
    import ray.train.torch

    if spec.model.enable_group_offload:  # one worker (spec-checked); build_transformer placed every tensor
        return model
    if ray.train.get_context().get_world_size() == 1 or spec.scaling.strategy == "deepspeed":
        return model.to(device)  # DeepSpeed wraps the model itself after the optimizer exists
    if spec.scaling.strategy == "fsdp":
        from flux_ray.train.fsdp import shard_transformer

        return shard_transformer(model.to(device))
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
