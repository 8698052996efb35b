"""One sweep trial: a Tune function trainable that drives a whole Ray Train run for its sampled spec.

Runs in the Tune trial's actor (driver side): it builds the trial's spec, opens the trial's nested
MLflow run, runs the TorchTrainer with a callback that forwards reports to Tune, then exports and
logs like a single job. Workers never see Tune or MLflow.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ray.tune.integration.ray_train import TuneReportCallback

from flux_ray import storage
from flux_ray.spec import StorageSpec

RUN_REF_FILE = "mlflow_run.json"
DIVERGED = 1e30
"""Stand-in for a NaN/inf metric: ASHA's cutoffs cannot rank NaN, and inf breaks its percentiles."""


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one sweep shares (passed to the trainable with tune.with_parameters)."""
    sweep_name: str
    trials_uri: str          # trial runs go to <trials_uri>/<trial name>
    tracking_uri: str
    parent_run_id: str
    metric: str
    mode: str
    cache_keys: dict = field(default_factory=dict)
    storage: StorageSpec | None = None


def trial_name(sweep_name: str, trial_id: str) -> str:
    """The trial's spec name and run directory name (also Tune's trial name and directory)."""
    return f"{sweep_name}_{trial_id}"


def run_ref_uri(ctx: SweepContext, name: str) -> str:
    return storage.join(ctx.trials_uri, name, RUN_REF_FILE)


def read_run_ref(ctx: SweepContext, name: str) -> str | None:
    uri = run_ref_uri(ctx, name)
    return storage.read_json(uri, ctx.storage)["run_id"] if storage.exists(uri, ctx.storage) else None


def tune_metrics(metrics: dict, metric: str, mode: str, extra: dict) -> dict:
    """A report as Tune sees it: a NaN/inf sweep metric becomes a finite worst value, plus ``extra``."""
    m = {**metrics, **extra}
    if metric in m and not math.isfinite(float(m[metric])):
        m[metric], m["diverged"] = (DIVERGED if mode == "min" else -DIVERGED), True
    return m


def goes_to_tune(metrics: dict, metric: str, last_step: int) -> bool:
    """Whether a report goes to Tune now: it carries the sweep metric (Tune's strict metric check) and is not
    the last one, which the trial sends itself once its LoRA is exported (see TrialReportCallback)."""
    return metric in metrics and metrics.get("step", 0) < last_step


class TrialReportCallback(TuneReportCallback):
    """Forward to Tune the reports that carry the sweep metric, except the last one.

    Reports without the metric (train loss between evals) still reach MLflow through the MLflow
    callback; forwarding them would trip Tune's strict metric check. The last report is held back
    and sent by the trial function once the LoRA is exported and logged: ASHA stops a trial whose
    ``step`` reaches max_t, and a stop kills the trial's actor, export or not.
    """

    def __init__(self, metric: str, mode: str, last_step: int, extra: dict):
        super().__init__()
        self.metric, self.mode, self.last_step, self.extra = metric, mode, last_step, extra

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0] if metrics else {}
        if not goes_to_tune(m, self.metric, self.last_step):
            return
        super().after_report(run_context, [tune_metrics(m, self.metric, self.mode, self.extra)], checkpoint)


def _open_run(spec, ctx: SweepContext, name: str, trial_id: str, config: dict) -> str:
    """The trial's nested MLflow run: reopened when a resumed sweep restarts the trial."""
    from flux_ray.tracking import mlflow_run

    run_id = read_run_ref(ctx, name)
    if run_id:
        mlflow_run.client(ctx.tracking_uri).update_run(run_id, status="RUNNING")
        return run_id
    tags = mlflow_run.run_tags(spec, ctx.cache_keys, {"flux_ray.sweep": ctx.sweep_name, "flux_ray.trial_id": trial_id,
                                                      "flux_ray.swept_keys": ",".join(sorted(config))})
    _, run_id = mlflow_run.start_run(spec, run_name=name, parent_run_id=ctx.parent_run_id, tags=tags,
                                     uri=ctx.tracking_uri)
    storage.write_json_atomic(run_ref_uri(ctx, name), {"tracking_uri": ctx.tracking_uri, "run_id": run_id},
                              ctx.storage)
    return run_id


def run_trial(config: dict, *, base_spec: dict, ctx: SweepContext) -> None:
    """Tune function trainable: sampled {dotted key: value} -> one Train run of the trial's spec."""
    import ray.tune

    from flux_ray.tracking.ray_callback import MlflowReportCallback
    from flux_ray.train.driver import train

    t0 = time.time()
    spec, trial_id, run_id, extra = start_trial(config, base_spec, ctx)
    report = TrialReportCallback(ctx.metric, ctx.mode, spec.train.max_train_steps, extra)
    # MLflow first: once the Tune callback hands a report over, ASHA may stop (kill) this trial.
    # A stop can surface here as an error too, so the sweep's Tune callback, which knows which
    # it was, closes the run of a trial that does not finish (KILLED or FAILED).
    outcome = train(spec, extra_callbacks=[MlflowReportCallback(ctx.tracking_uri, run_id, spec.storage), report])
    ray.tune.report(finish_trial(spec, ctx, config, trial_id, run_id, outcome, t0))  # must come last


def start_trial(config: dict, base_spec: dict, ctx: SweepContext):
    """The trial's spec (its run under ``ctx.trials_uri``) and MLflow run: (spec, trial id, run id, the ids
    every Tune report carries)."""
    import ray.tune

    from flux_ray.tune.space import trial_spec

    trial_id = ray.tune.get_context().get_trial_id()
    name = trial_name(ctx.sweep_name, trial_id)
    spec = trial_spec(base_spec, config, name=name, overrides={"output.uri": ctx.trials_uri})
    run_id = _open_run(spec, ctx, name, trial_id, config)
    return spec, trial_id, run_id, {"mlflow_run_id": run_id, "trial_name": name}


def finish_trial(spec, ctx: SweepContext, config: dict, trial_id: str, run_id: str, outcome, t0: float) -> dict:
    """A trained trial's run_summary.json and MLflow outputs, its run closed; returns its final Tune report,
    which the trial sends last (ASHA may stop it at max_t)."""
    from flux_ray.tracking import mlflow_run
    from flux_ray.train.driver import write_run_summary

    uri, name = ctx.tracking_uri, spec.name
    summary = {"name": name, "sweep": ctx.sweep_name, "trial_id": trial_id, "params": config, "run_uri": spec.run_uri,
               "lora": outcome.lora_uri, "cache_uri": spec.cache.uri, "cache_keys": ctx.cache_keys,
               "checkpoint": outcome.checkpoint_uri,
               "mlflow": {"tracking_uri": uri, "run_id": run_id, "parent_run_id": ctx.parent_run_id},
               "steps": outcome.steps, "final_loss": outcome.final_loss, "eval_loss": outcome.eval_loss,
               "seconds": round(time.time() - t0, 1)}
    if "clip_score" in outcome.metrics:
        summary["clip_score"] = outcome.metrics["clip_score"]
    summary_uri = write_run_summary(spec, summary)
    mlflow_run.log_run_outputs(uri, run_id, spec, summary_uri)
    if outcome.final_loss is not None:
        mlflow_run.log_metrics(uri, run_id, {"final_train_loss": outcome.final_loss}, outcome.steps)
    mlflow_run.set_tags(uri, run_id, {"flux_ray.trial_status": "completed"})
    mlflow_run.finish_run(uri, run_id)
    final = {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float, str, bool))}
    return tune_metrics(final, ctx.metric, ctx.mode, {"mlflow_run_id": run_id, "trial_name": name, "completed": True})
