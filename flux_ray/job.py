"""A whole job on the driver: Ray up, cache, MLflow run, train, LoRA export, run_summary.json."""
from __future__ import annotations

import logging
import os
import time

from flux_ray.spec import JobSpec

log = logging.getLogger("flux_ray")


def init_ray(num_cpus: int | None = None, verbose: bool = True) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local one.

    A local Ray gets more logical CPUs than the machine has cores: each Train worker holds one and
    Ray Data's budget excludes it, so a 2-core machine would otherwise stall. ``verbose=False`` (``flux-ray``
    without ``-v``): Ray's own INFO lines off, the workers quiet (flux_ray/quiet.py); their errors still show.
    """
    import ray

    if ray.is_initialized():
        return
    quiet = {} if verbose else {"logging_level": logging.ERROR, "logging_config": ray.LoggingConfig(log_level="ERROR")}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, **quiet)
        _quiet_ray_data(verbose)
        return
    # Train v2 workers block in report() until the controller polls (default every 2 s).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    context = ray.init(address="local", num_cpus=num_cpus or max(8, os.cpu_count() or 1),
                       log_to_driver=True, runtime_env={"worker_process_setup_hook": "flux_ray.job.setup_worker"},
                       **quiet)
    if not context.dashboard_url:
        # Train v2's PlacementGroupCleaner polls the State API, which the dashboard serves: without it every
        # poll logs "Failed to query Ray Train Controller actor state" (seen on a GPU image without ray[default]).
        log.warning("Ray's dashboard is not running (is ray[default] installed?): Ray Train's placement-group "
                    "cleaner cannot read actor state and will log a warning every second")
    _quiet_ray_data(verbose)


def _quiet_ray_data(verbose: bool) -> None:
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if not verbose:
        from flux_ray.quiet import quiet_process

        quiet_process()  # after Ray Data's import configured its loggers


def setup_worker() -> None:
    """Worker setup hook: pin Ray's address; quiet the worker when the driver is (FLUX_RAY_QUIET)."""
    from flux_ray.quiet import is_quiet, quiet_process, quiet_train_worker

    pin_ray_address()
    if is_quiet():
        import torch  # noqa: F401  (torch sets its loggers' levels at import: quiet them after)

        quiet_process()
        quiet_train_worker()


def pin_ray_address() -> None:
    """Worker setup hook: make Ray's address auto-detection in workers find their own cluster.

    Train's PlacementGroupCleaner (which frees the workers of a Tune trial that was stopped) looks
    the controller up through the state API without an address; with a second Ray instance on the
    host that lookup fails and the stopped trial's placement group is never removed.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def cache(spec: JobSpec):
    from flux_ray.data.cache import run_cache

    summary = run_cache(spec)
    for ds_id, d in summary.datasets.items():
        log.info("cache %s: %d usable, %d encoded now, skipped %s, buckets %s", ds_id, d["usable"],
                 d["encoded_this_run"], d["skipped"] or "none", d["buckets"])
    return summary


def run(spec: JobSpec, *, do_cache: bool = True, parent_run_id: str | None = None,
        extra_callbacks: list | None = None, run_name: str | None = None, restart: str | None = None,
        progress: bool = True) -> dict:
    """Cache (unless told not to), train, export, publish; returns the run summary (also written to the run dir).

    A rerun under the same name resumes when it trains the same thing (train/run_identity.py), re-exports only
    when it is complete, and is refused when its spec differs; ``restart`` (keep | discard) starts it afresh.
    ``progress`` prints one line per report; ``notify.webhook_url`` gets the job's events (notify/)."""
    from flux_ray.notify import events
    from flux_ray.notify.sender import WebhookSender

    sender = WebhookSender.from_spec(spec)
    try:
        summary = _run(spec, sender, do_cache=do_cache, parent_run_id=parent_run_id,
                       extra_callbacks=extra_callbacks, run_name=run_name, restart=restart, progress=progress)
        if sender:
            sender.send(events.finished(spec, summary))
        return summary
    except BaseException as e:
        if sender:
            sender.send(events.failed(spec, e))
        raise
    finally:
        if sender:
            sender.close()


def _report_handlers(spec: JobSpec, sender, progress: bool) -> list:
    from flux_ray.notify import events
    from flux_ray.progress import ProgressPrinter

    handlers = [ProgressPrinter(spec.train.max_train_steps)] if progress else []
    if sender:
        handlers.append(lambda metrics, ckpt: [sender.send(e) for e in events.from_report(spec, metrics, ckpt)])
    return handlers


def _run(spec: JobSpec, sender, *, do_cache: bool, parent_run_id: str | None, extra_callbacks: list | None,
         run_name: str | None, restart: str | None, progress: bool) -> dict:
    from flux_ray.families import get_family
    from flux_ray.notify import events
    from flux_ray.tracking import mlflow_run
    from flux_ray.tracking.report_relay import ReportRelay
    from flux_ray.train import run_identity
    from flux_ray.train.driver import train, write_run_summary

    t0 = time.time()
    plan = run_identity.plan_run(spec, restart)  # before any Ray work: a refused rerun costs nothing
    log.info("%s", plan.message)
    if sender:
        sender.send(events.started(spec, plan.message))
    get_family(spec.model.model_family).ensure_base(spec.model)
    cache_summary = cache(spec) if do_cache else None
    cache_keys = {k: v["key"] for k, v in cache_summary.datasets.items()} if cache_summary else {}
    run_identity.record_identity(spec, cache_keys)
    if plan.action == "complete":
        summary = _complete_rerun(spec, plan, cache_summary, cache_keys, t0)
        return _publish(spec, summary)
    uri, run_id = mlflow_run.start_run(spec, run_name=run_name, parent_run_id=parent_run_id,
                                       tags=mlflow_run.run_tags(spec, cache_keys))
    try:
        with ReportRelay(_report_handlers(spec, sender, progress)) as relay:
            outcome = train(spec, tracking=(uri, run_id), extra_callbacks=[*(extra_callbacks or []), relay.callback])
    except BaseException:
        mlflow_run.finish_run(uri, run_id, "FAILED")
        raise
    summary = {"name": spec.name, "run_uri": spec.run_uri, "lora": outcome.lora_uri, "cache_uri": spec.cache.uri,
               "cache_keys": cache_keys, "checkpoint": outcome.checkpoint_uri, "rerun": plan.action,
               "rerun_message": plan.message,
               "mlflow": {"tracking_uri": uri, "run_id": run_id, "experiment": spec.tracking.experiment_name},
               "steps": outcome.steps, "final_loss": outcome.final_loss, "eval_loss": outcome.eval_loss,
               "seconds": round(time.time() - t0, 1)}
    if "clip_score" in outcome.metrics:  # the last validation's mean (eval.evaluation_type: clip)
        summary["clip_score"] = outcome.metrics["clip_score"]
    if cache_summary:
        summary["cache"] = cache_summary.to_dict()
    summary_uri = write_run_summary(spec, summary)
    mlflow_run.log_run_outputs(uri, run_id, spec, summary_uri)  # every LoRA file under lora/, run_summary.json
    if spec.tracking.register_model_name:
        name = spec.tracking.register_model_name
        summary["registered_model"] = {"name": name, "version": mlflow_run.register_lora(uri, run_id, name)}
        write_run_summary(spec, summary)
    if outcome.final_loss is not None:
        mlflow_run.log_metrics(uri, run_id, {"final_train_loss": outcome.final_loss}, outcome.steps)
    summary = _publish(spec, summary)
    mlflow_run.finish_run(uri, run_id)
    return summary


def _publish(spec: JobSpec, summary: dict) -> dict:
    """output.publish's targets, recorded in the summary as {"storage": uri, "hub": commit url}."""
    from flux_ray.publish.deliver import publish
    from flux_ray.train.driver import write_run_summary

    published = publish(spec, summary)
    if published:
        summary["published"] = published
        write_run_summary(spec, summary)
    return summary


def _complete_rerun(spec: JobSpec, plan, cache_summary, cache_keys: dict, t0: float) -> dict:
    """A finished run rerun: no Ray Train run, the LoRA re-exported from the latest checkpoint (export formats
    may have changed); the summary keeps the training's MLflow run and metrics and says what happened."""
    import json
    import tempfile

    from flux_ray import storage
    from flux_ray.train.driver import export_final_lora, write_run_summary
    from flux_ray.train.run_identity import latest_checkpoint

    step, ckpt_uri, state = latest_checkpoint(spec)
    metrics = dict(state.get("metrics") or {})
    with tempfile.TemporaryDirectory(prefix="flux_ray_ckpt_") as d:
        storage.copy_dir(ckpt_uri, d, spec.storage)
        lora_uri = export_final_lora(spec, d, metrics)
    summary_uri = storage.join(spec.run_uri, "run_summary.json")
    old = storage.read_json(summary_uri, spec.storage) if storage.exists(summary_uri, spec.storage) else {}
    summary = {**old, "name": spec.name, "run_uri": spec.run_uri, "lora": lora_uri, "cache_uri": spec.cache.uri,
               "cache_keys": cache_keys or old.get("cache_keys", {}), "checkpoint": ckpt_uri,
               "mlflow": old.get("mlflow", {"tracking_uri": None, "run_id": None,
                                            "experiment": spec.tracking.experiment_name}),
               "steps": step, "steps_trained_now": 0, "final_loss": metrics.get("train_loss"),
               "eval_loss": metrics.get("eval_loss", old.get("eval_loss")), "rerun": plan.action,
               "rerun_message": plan.message, "seconds": round(time.time() - t0, 1)}
    if cache_summary:
        summary["cache"] = cache_summary.to_dict()
    write_run_summary(spec, json.loads(json.dumps(summary, default=str)))
    return summary
