"""Multi-worker training on CPU: strategies agree, a killed worker or driver resumes from the checkpoint."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

STEPS, CKPT = 16, 6


@pytest.fixture(scope="module")
def dist_env(ray_session, tiny_model_dir, demo_data_dir, tmp_path_factory, demo_spec):
    from flux_ray import job

    out = tmp_path_factory.mktemp("dist")

    def spec_for(name, strategy="ddp", num_workers=2, gradient_sync="auto", use_gpu=False, **train):
        return demo_spec(tiny_model_dir, demo_data_dir, out, name=name,
                         train={"max_train_steps": STEPS, "checkpointing_steps": CKPT, "log_every": 1, **train},
                         eval={"eval_steps_interval": CKPT, "validation_step_interval": None},
                         scaling={"num_workers": num_workers, "strategy": strategy, "max_failures": 1,
                                  "gradient_sync": gradient_sync, "use_gpu": use_gpu})

    job.cache(spec_for("cache-only"))
    return spec_for, job


def _history(summary, key="train_loss"):
    c = MlflowClient(summary["mlflow"]["tracking_uri"])
    return [(m.step, m.value) for m in sorted(c.get_metric_history(summary["mlflow"]["run_id"], key),
                                              key=lambda m: (m.step, m.timestamp))]


@pytest.fixture(scope="module")
def ddp_run(dist_env):
    spec_for, job = dist_env
    return job.run(spec_for("ddp"), do_cache=False)


@pytest.mark.parametrize("strategy, gradient_sync", [("fsdp", "auto"), ("deepspeed", "auto"), ("ddp", "allreduce")])
def test_strategies_train_the_same_lora(dist_env, ddp_run, strategy, gradient_sync):
    """Each step's loss (the mean over both ranks) and the eval losses (each rank scores its half of the eval set
    with its own replica) are the DDP run's. gradient_sync allreduce (no DDP wrapper: rank 0's LoRA broadcast at
    the start, one flat all-reduce of the gradients per step) matches to float rounding, so both of its replicas
    hold DDP's LoRA; rank 0's exported LoRA is DDP's."""
    from safetensors.torch import load_file

    spec_for, job = dist_env
    name = strategy if gradient_sync == "auto" else f"{strategy}-{gradient_sync}"
    spec = spec_for(name, strategy, gradient_sync=gradient_sync)
    assert spec.syncs_gradients_by_allreduce is (gradient_sync == "allreduce")
    other = job.run(spec, do_cache=False)
    tol = 1e-6 if gradient_sync == "allreduce" else 1e-4
    assert other["steps"] == ddp_run["steps"] == STEPS
    for key in ("train_loss", "eval_loss"):
        base, hist = dict(_history(ddp_run, key)), _history(other, key)
        assert [s for s, _ in hist] == sorted(base) and len(set(base.values())) > 1, key
        for step, value in hist:
            assert value == pytest.approx(base[step], abs=tol), (key, step)
    if gradient_sync == "allreduce":
        lora, ddp_lora = load_file(other["lora"]), load_file(ddp_run["lora"])
        assert lora.keys() == ddp_lora.keys()
        for k, v in lora.items():
            torch.testing.assert_close(v, ddp_lora[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_adamw_bf16_trains_under_ddp_and_fsdp(dist_env, ddp_run, strategy):
    """adamw_bf16 casts the LoRA to bf16 before DDP builds its buckets / FSDP2 its sharded parameters: two gloo
    workers train, the checkpointed LoRA is bf16, and the losses follow the fp32 DDP run within bf16 error."""
    _check_adamw_bf16(dist_env, ddp_run, strategy, use_gpu=False)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_adamw_bf16_trains_under_nccl(dist_env, ddp_run, strategy):
    _check_adamw_bf16(dist_env, ddp_run, strategy, use_gpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_two_gpu_workers_under_cuda_graphs_sync_by_flat_all_reduce(dist_env, ddp_run):
    """Two NCCL workers with compiled blocks replayed as CUDA graphs (reduce-overhead): gradient_sync auto takes
    the flat all-reduce (no DDP wrapper; DDP gave no first report here, bench/RESULTS.md call 33), the run finishes, and each
    step's loss follows the eager CPU DDP run within compile's rounding."""
    spec_for, job = dist_env
    steps = 4
    spec = spec_for("graphs-2gpu", use_gpu=True, compile=True, dynamo_mode="reduce-overhead", max_train_steps=steps)
    assert spec.train.uses_cuda_graphs and spec.syncs_gradients_by_allreduce
    run = job.run(spec, do_cache=False)
    assert run["steps"] == steps
    base, hist = dict(_history(ddp_run)), _history(run)
    assert [s for s, _ in hist] == list(range(1, steps + 1))
    for step, value in hist:
        assert value == pytest.approx(base[step], abs=1e-3), step


def _check_adamw_bf16(dist_env, ddp_run, strategy: str, use_gpu: bool) -> None:
    import glob as g

    from safetensors.torch import load_file

    spec_for, job = dist_env
    steps = 4
    spec = spec_for(f"bf16-{strategy}-{'gpu' if use_gpu else 'cpu'}", strategy, optimizer="adamw_bf16",
                    max_train_steps=steps)
    spec.scaling.use_gpu = use_gpu
    run = job.run(spec, do_cache=False)
    assert run["steps"] == steps
    base = dict(_history(ddp_run))
    hist = _history(run)
    assert [s for s, _ in hist] == list(range(1, steps + 1))
    for step, value in hist:
        assert value == pytest.approx(base[step], abs=3e-2), step
    (ckpt,) = g.glob(f"{run['run_uri']}/checkpoint_*/lora_peft.safetensors")
    lora = load_file(ckpt)
    assert lora and {str(t.dtype) for t in lora.values()} == {"torch.bfloat16"}
    if use_gpu:  # memory per GPU: the steps' peak within the process's, the max over the two ranks at least rank 0's
        step, whole, step_max, whole_max = (dict(_history(run, k)) for k in (
            "step_peak_gpu_mem_gib", "peak_gpu_mem_gib", "step_peak_gpu_mem_gib_max", "peak_gpu_mem_gib_max"))
        assert sorted(step) == sorted(step_max) == list(range(1, steps + 1))
        assert all(0 < step[s] <= min(whole[s], step_max[s]) and step_max[s] <= whole_max[s] for s in step)


F2_STEPS = 3


@pytest.fixture(scope="module")
def flux2_dist(dist_env, demo_data_dir, tmp_path_factory, demo_spec):
    """FLUX.2 [dev] (tiny: guidance embeddings, Mistral3 text encoder) on two gloo workers: the spec factory and
    the DDP run the other strategies are compared with."""
    from flux_ray.core.flux2.tiny import write_tiny_flux2

    _, job = dist_env
    out = tmp_path_factory.mktemp("dist-flux2")
    model_dir = str(write_tiny_flux2(out / "tiny-flux2-dev", "dev"))

    def spec_for(name, strategy="ddp"):
        return demo_spec(model_dir, demo_data_dir, out, name=name,
                         model={"model_family": "flux2", "model_flavour": "dev"}, lora={"flux_lora_target": "all"},
                         train={"max_train_steps": F2_STEPS, "checkpointing_steps": F2_STEPS, "log_every": 1},
                         eval={"eval_steps_interval": F2_STEPS, "validation_step_interval": None},
                         scaling={"num_workers": 2, "strategy": strategy, "max_failures": 0})

    job.cache(spec_for("flux2-cache-only"))
    return spec_for, job.run(spec_for("flux2-ddp"), do_cache=False)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_flux2_dev_trains_the_same_lora_under_fsdp_and_deepspeed(dist_env, flux2_dist, strategy):
    """FSDP2 shards FLUX.2's double and single blocks (core/checkpointing.transformer_blocks), DeepSpeed ZeRO-2 its
    LoRA's optimizer state: each step's loss is the DDP run's, and the checkpointed and exported LoRA hold
    FLUX.2's module names (the fused single-block QKV + MLP projection among them)."""
    from safetensors import safe_open

    _, job = dist_env
    spec_for, ddp = flux2_dist
    run = job.run(spec_for(f"flux2-{strategy}", strategy), do_cache=False)
    assert run["steps"] == ddp["steps"] == F2_STEPS
    base, hist = dict(_history(ddp)), _history(run)
    assert [s for s, _ in hist] == list(range(1, F2_STEPS + 1)) and len(set(base.values())) > 1
    for step, value in hist:
        assert value == pytest.approx(base[step], abs=1e-4), step
    assert run["eval_loss"] == pytest.approx(ddp["eval_loss"], abs=1e-4)
    (ckpt,) = glob.glob(f"{run['run_uri']}/checkpoint_*/lora_peft.safetensors")
    for path, prefix in ((ckpt, ""), (run["lora"], "transformer.")):
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
        assert any(k.startswith(f"{prefix}single_transformer_blocks.1.attn.to_qkv_mlp_proj.lora_A") for k in keys), path
        assert any(k.startswith(f"{prefix}transformer_blocks.0.ff_context.linear_out.lora_B") for k in keys), path
        assert not any("lora_" in k and ("modulation" in k or "time_guidance" in k) for k in keys)


def _train_workers() -> list[psutil.Process]:
    """This session's Train workers: descendants of this process (its local Ray's raylet spawned them),
    so a parallel test process's cluster is never touched."""
    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in p.cmdline()):
                procs.append(p)
        except psutil.Error:
            continue
    return procs


def _latest_logged_step(spec) -> int:
    from flux_ray.tracking.mlflow_run import tracking_uri

    c = MlflowClient(tracking_uri(spec))
    exp = c.get_experiment_by_name(spec.tracking.experiment_name)
    runs = c.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{spec.name}'") if exp else []
    hist = c.get_metric_history(runs[0].info.run_id, "train_loss") if runs else []
    return max((m.step for m in hist), default=0)


def test_killed_worker_recovers_from_last_checkpoint(dist_env, ddp_run):
    """SIGKILL one of two workers mid-run: Ray Train restarts the group from the last checkpoint and the
    rest of the loss curve equals the uninterrupted run's (randomness is keyed by step and rank)."""
    spec_for, job = dist_env
    spec = spec_for("killed", resume_from_checkpoint=None)  # null: no earlier run to resume; Ray's restart still must
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(job.run(spec, do_cache=False)))
    thread.start()
    # Kill after the first checkpoint is committed: the controller logs a report to MLflow only after
    # its checkpoint is persisted and registered, so a metric past CKPT means checkpoint CKPT is the latest.
    deadline = time.time() + 300
    while time.time() < deadline and _latest_logged_step(spec) <= CKPT:
        time.sleep(0.05)
    victims = _train_workers()
    assert len(victims) == 2
    victims[1].send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    assert result["steps"] == STEPS
    hist = _history(result)
    steps = [s for s, _ in hist]
    assert steps.count(CKPT + 1) == 2, "steps after the last checkpoint are redone"
    assert steps.count(1) == 1 and steps.count(CKPT) == 1, "steps up to the checkpoint are not redone"
    base = dict(_history(ddp_run))
    for step, value in hist:
        assert value == pytest.approx(base[step], abs=1e-5), step
    assert result["eval_loss"] == pytest.approx(ddp_run["eval_loss"], abs=1e-5)


def test_killed_driver_resumes_with_same_run_name(dist_env, tmp_path):
    """SIGKILL `flux-ray train` after its first checkpoint; rerunning the same job continues from it."""
    import yaml

    spec_for, job = dist_env
    spec = spec_for("driver-killed", num_workers=1)  # the driver is what dies; one worker is enough
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, RAY_AUTH_MODE="token")
    proc = subprocess.Popen([sys.executable, "-m", "flux_ray.cli", "train", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and _latest_logged_step(spec) <= CKPT:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert glob.glob(f"{spec.run_uri}/checkpoint_*"), "the first run should have left a checkpoint"
    summary = job.run(spec, do_cache=False)
    steps = [s for s, _ in _history(summary)]
    assert summary["steps"] == STEPS
    assert min(steps) > CKPT - 1, f"the rerun restarted from scratch: {steps[:5]}"
