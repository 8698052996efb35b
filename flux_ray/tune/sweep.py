"""`flux-ray tune`: cache once, then a Ray Tune sweep whose trials each train the trial's spec: one-worker
trials in their own Tune actor, which the next trial reuses with its loaded model (tune/local_trial.py),
multi-worker trials through a Ray Train run each (tune/trial.py).

    <output>/<name>/                 Tune's experiment (restorable), sweep_state.json, sweep_summary.json
    <output>/<name>/<trial>/         a one-worker trial (trained in its Tune actor): Tune's checkpoints, lora/,
                                     run_summary.json
    <output>/<name>/trials/<trial>/  a multi-worker trial's Train run: checkpoints, lora/, run_summary.json
    <output>/<name>/best/            the best trial's LoRA files

MLflow: one parent run for the sweep, one nested run per trial. Rerunning a sweep of the same name
with the same spec restores it: finished trials are kept, unfinished ones resume from their last
Train checkpoint.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time

from flux_ray import storage
from flux_ray.spec import JobSpec, SpecError, flatten
from flux_ray.tune import space
from flux_ray.tune.report import UNFINISHED, best_trial, format_table, trial_rows, tune_statuses

log = logging.getLogger("flux_ray.tune")
TRIAL_DRIVER_CPUS = 0.1
"""A trial's driver function only waits on its Train controller; its workers hold the real resources."""
STATE_FILE = "sweep_state.json"
SUMMARY_FILE = "sweep_summary.json"


def run_sweep(spec: JobSpec) -> dict:
    """Run (or resume) the spec's sweep; returns what sweep_summary.json holds."""
    from flux_ray import job
    from flux_ray.families import get_family
    from flux_ray.tracking import mlflow_run

    t0 = time.time()
    space.check_space(spec)
    if spec.notify.webhook_url or spec.output.publish.uri or spec.output.publish.hub_model_id:
        raise SpecError("notify.webhook_url and output.publish act on `flux-ray run` and `train`, not yet on a sweep "
                        "(its best LoRA is under <sweep>/best/): remove them from the sweep's spec")
    spec = spec.model_copy(deep=True)
    spec.tracking.mlflow_tracking_uri = mlflow_run.tracking_uri(spec)  # trials log to the sweep's store
    storage.ensure_bucket(spec.output.uri, spec.storage)
    state = _saved_state(spec)
    job.init_ray()
    get_family(spec.model.model_family).ensure_base(spec.model)
    space.check_cache_identity(spec, cache_identity)
    cache_summary = job.cache(spec)  # the sweep's only cache pass: trials read, never encode
    cache = {"uri": spec.cache.uri, "keys": {k: v["key"] for k, v in cache_summary.datasets.items()},
             "text_key": cache_summary.text_key, "manifests": manifest_state(spec, cache_summary)}
    ctx = _context(spec, cache["keys"], _parent_run(spec, cache["keys"], state))
    results = _tuner(spec, ctx).fit()
    rows = trial_rows(results, ctx, spec.tune.metric, spec.tune.mode, tune_statuses(results, spec.name))
    interrupted = any(r["status"] == UNFINISHED for r in rows) or len(rows) < space.num_trials(spec)
    best = best_trial(rows, spec.tune.mode)
    summary = {"name": spec.name, "sweep_uri": spec.run_uri, "metric": spec.tune.metric, "mode": spec.tune.mode,
               "scheduler": spec.tune.scheduler, "search_alg": spec.tune.search_alg, "interrupted": interrupted,
               "param_space": {k: d.model_dump(exclude_none=True) for k, d in spec.tune.param_space.items()},
               "trials": rows, "best": best if interrupted else _publish_best(spec, ctx, best), "cache": cache,
               "mlflow": {"tracking_uri": ctx.tracking_uri, "parent_run_id": ctx.parent_run_id,
                          "experiment": spec.tracking.experiment_name},
               "seconds": round(time.time() - t0, 1)}
    print(format_table(rows, spec.tune.metric, list(spec.tune.param_space), best and best["trial"]))
    if interrupted:
        print(f"sweep {spec.name} was interrupted: run the same command again to resume it")
    summary_uri = storage.join(spec.run_uri, SUMMARY_FILE)
    storage.write_json_atomic(summary_uri, summary, spec.storage)
    _finish_parent(spec, ctx, summary, summary_uri)
    return summary


def cache_identity(spec: JobSpec) -> tuple:
    """What a spec reads from the cache: its root, every enabled dataset's key and the text key."""
    from flux_ray.data.cache_layout import dataset_key, text_key

    vae = _vae_config(spec.model.model_family, spec.model.pretrained_vae_model_name_or_path, spec.model.base_path,
                      spec.model.revision)
    keys = tuple(sorted((d.id, dataset_key(d, spec.model, vae, spec.cache.latent_dtype))
                        for d in spec.latent_datasets()))
    return spec.cache.uri, keys, text_key(spec.model, spec.cache.text_embed_dtype)


@functools.lru_cache(maxsize=8)
def _vae_config(family, vae_path, base_path, revision) -> dict:
    from flux_ray.families import get_family
    from flux_ray.node_cache import localize_model
    from flux_ray.spec import ModelSpec

    model_spec = ModelSpec(model_family=family, pretrained_model_name_or_path=base_path, revision=revision,
                           pretrained_vae_model_name_or_path=vae_path)
    return get_family(family).load_vae_config(localize_model(model_spec))


def manifest_state(spec: JobSpec, cache_summary) -> dict:
    """{cache-relative manifest dir: {version, shards}} of every cache the sweep reads."""
    from flux_ray.data.cache_layout import CachePaths

    paths = CachePaths(spec.cache.uri)
    dirs = [paths.latents(d["key"]) for d in cache_summary.datasets.values()] + [paths.text(cache_summary.text_key)]
    out = {}
    for d in dirs:
        m = storage.read_json(storage.join(d, "manifest.json"), spec.storage)
        out[d[len(spec.cache.uri.rstrip("/")) + 1:]] = {"version": m["version"], "shards": len(m["shards"])}
    return out


def spec_digest(spec: JobSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _saved_state(spec: JobSpec) -> dict | None:
    """The state of an earlier sweep of this name; refuses one that was started from another spec."""
    state_uri = storage.join(spec.run_uri, STATE_FILE)
    if not storage.exists(state_uri, spec.storage):
        return None
    state = storage.read_json(state_uri, spec.storage)
    if state["spec_digest"] != spec_digest(spec):
        raise SpecError(f"sweep {spec.name!r} at {spec.run_uri} was started from a different spec; rerun it "
                        "with the same spec to resume, or give this sweep another name")
    return state


def _parent_run(spec: JobSpec, cache_keys: dict, state: dict | None) -> str:
    """The sweep's MLflow run: created once, reopened when the sweep is rerun with the same spec."""
    from flux_ray.tracking import mlflow_run

    uri = spec.tracking.mlflow_tracking_uri
    if state:
        mlflow_run.client(uri).update_run(state["parent_run_id"], status="RUNNING")
        log.info("resuming sweep %s (MLflow run %s)", spec.name, state["parent_run_id"])
        return state["parent_run_id"]
    tags = mlflow_run.run_tags(spec, cache_keys, {"flux_ray.sweep": spec.name, "flux_ray.role": "sweep"})
    _, run_id = mlflow_run.start_run(spec, run_name=spec.name, tags=tags, uri=uri)
    mlflow_run.log_params(uri, run_id, flatten({"tune": spec.tune.model_dump(mode="json")}))
    storage.write_json_atomic(storage.join(spec.run_uri, STATE_FILE),
                              {"parent_run_id": run_id, "tracking_uri": uri, "spec_digest": spec_digest(spec)},
                              spec.storage)
    return run_id


def _context(spec: JobSpec, cache_keys: dict, parent_run_id: str):
    from flux_ray.tune.trial import SweepContext

    # A trial that trains in its Tune actor has one directory: Tune's, where its checkpoints go.
    trials_uri = spec.run_uri if space.trains_in_trial(spec) else storage.join(spec.run_uri, "trials")
    return SweepContext(sweep_name=spec.name, trials_uri=trials_uri,
                        tracking_uri=spec.tracking.mlflow_tracking_uri, parent_run_id=parent_run_id,
                        metric=spec.tune.metric, mode=spec.tune.mode, cache_keys=cache_keys, storage=spec.storage)


def _trial_name(sweep_name: str, trial) -> str:
    from flux_ray.tune.trial import trial_name

    return trial_name(sweep_name, trial.trial_id)


def _tuner(spec: JobSpec, ctx):
    """A new Tuner, or the sweep's saved one restored (finished trials kept, unfinished resumed)."""
    import ray
    from ray import tune

    from flux_ray.quiet import is_quiet
    from flux_ray.tune.mlflow_callback import MlflowTrialStatusCallback
    from flux_ray.tune.progress_callback import TrialProgressCallback
    from flux_ray.tune.local_trial import run_local_trial
    from flux_ray.tune.trial import run_trial

    base = spec.model_dump(mode="json")
    in_trial = space.trains_in_trial(spec)
    trainable = tune.with_resources(tune.with_parameters(run_local_trial if in_trial else run_trial, base_spec=base,
                                                         ctx=ctx),
                                    space.trial_resources(spec, TRIAL_DRIVER_CPUS) if in_trial
                                    else {"CPU": TRIAL_DRIVER_CPUS})
    fs, root = storage.resolve(spec.output.uri, spec.storage)
    remote_fs = fs if storage.is_s3(spec.output.uri) else None
    exp_path = storage.join(root, spec.name) if remote_fs else spec.run_uri
    if tune.Tuner.can_restore(exp_path, storage_filesystem=remote_fs):
        log.info("restoring the Tune experiment at %s", exp_path)
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=remote_fs)
    concurrency = spec.tune.max_concurrent_trials or space.default_concurrency(
        spec, ray.cluster_resources(), TRIAL_DRIVER_CPUS)
    log.info("sweep %s: %d trials, at most %d at once, each needs %s", spec.name, space.num_trials(spec),
             concurrency, space.trial_resources(spec, TRIAL_DRIVER_CPUS))
    name_fn = functools.partial(_trial_name, spec.name)
    tune_config = tune.TuneConfig(metric=spec.tune.metric, mode=spec.tune.mode, num_samples=spec.tune.num_samples,
                                  search_alg=space.build_searcher(spec, concurrency),
                                  scheduler=space.build_scheduler(spec), trial_name_creator=name_fn,
                                  trial_dirname_creator=name_fn, reuse_actors=in_trial)
    run_config = tune.RunConfig(name=spec.name, storage_path=root, storage_filesystem=remote_fs,
                                checkpoint_config=tune.CheckpointConfig(
                                    num_to_keep=spec.train.checkpoints_total_limit) if in_trial else None,
                                # a trial trained in its actor is restarted by Tune from its last checkpoint, as
                                # Train restarts its workers (a Train trial's retries are Train's own)
                                failure_config=tune.FailureConfig(
                                    max_failures=spec.scaling.max_failures) if in_trial else None,
                                callbacks=[MlflowTrialStatusCallback(ctx),
                                           TrialProgressCallback(spec.train.max_train_steps)],
                                verbose=0 if is_quiet() else 1)  # quiet: our lines instead of Tune's tables
    return tune.Tuner(trainable, param_space=space.param_space(spec), tune_config=tune_config, run_config=run_config)


def _publish_best(spec: JobSpec, ctx, best: dict | None) -> dict | None:
    """Copy the best trial's LoRA files to <sweep>/best/ (and register them when asked)."""
    from flux_ray.tracking import mlflow_run

    if best is None:
        log.warning("no trial finished with a %s value: no best LoRA", spec.tune.metric)
        return None
    src, dst = storage.join(ctx.trials_uri, best["trial"], "lora"), storage.join(spec.run_uri, "best")
    storage.delete(dst, spec.storage)
    storage.copy_dir(src, dst, spec.storage)
    info = {**best, "lora_dir": dst, "source_lora_dir": src}
    storage.write_json_atomic(storage.join(dst, "best_trial.json"), info, spec.storage)
    name = spec.tracking.register_model_name
    if name and best.get("mlflow_run_id"):
        info["registered_model"] = {"name": name, "version": mlflow_run.register_lora(
            ctx.tracking_uri, best["mlflow_run_id"], name)}
    return info


def _finish_parent(spec: JobSpec, ctx, summary: dict, summary_uri: str) -> None:
    from flux_ray.tracking import mlflow_run

    uri, run_id, best = ctx.tracking_uri, ctx.parent_run_id, summary["best"]
    if summary["interrupted"]:  # a rerun reopens these runs
        for r in summary["trials"]:
            if r["status"] == UNFINISHED and r["mlflow_run_id"]:
                mlflow_run.finish_run(uri, r["mlflow_run_id"], "KILLED")
        mlflow_run.set_tags(uri, run_id, {"flux_ray.sweep_status": "interrupted"})
        mlflow_run.finish_run(uri, run_id, "KILLED")
        return
    counts: dict[str, int] = {}
    for r in summary["trials"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    mlflow_run.log_metrics(uri, run_id, {f"trials_{k}": v for k, v in counts.items()}, 0)
    if best:
        mlflow_run.log_metrics(uri, run_id, {f"best_{spec.tune.metric}": best["value"]}, best["steps"] or 0)
        mlflow_run.set_tags(uri, run_id, {"flux_ray.best_trial": best["trial"],
                                          "flux_ray.best_run_id": best.get("mlflow_run_id") or ""})
    mlflow_run.log_storage_file(uri, run_id, summary_uri, spec.storage, None)
    mlflow_run.set_tags(uri, run_id, {"flux_ray.sweep_status": "finished"})
    mlflow_run.finish_run(uri, run_id, "FINISHED" if best else "FAILED")
