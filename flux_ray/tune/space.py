"""The sweep's search space: spec dimensions -> Ray Tune domains, and trial specs from sampled values.

Driver side, and mostly Ray-free: every check here runs before Ray starts or the cache is built,
so a sweep that cannot run fails in seconds with the dotted key that is wrong.
"""
from __future__ import annotations

import copy
import importlib.util
import math
from typing import Any

from flux_ray.spec import JobSpec, SearchDimension, SpecError, load_spec, set_dotted

# Keys a trial may not change: they name the sweep, where it writes, or how it is tracked and tuned.
FIXED_PREFIXES = ("name", "output", "tracking", "tune", "cache")
SEARCHERS = {  # search_alg -> (module that must be importable, Ray Tune class path)
    "optuna": ("optuna", "ray.tune.search.optuna.OptunaSearch"),
    "hyperopt": ("hyperopt", "ray.tune.search.hyperopt.HyperOptSearch"),
    "bayesopt": ("bayes_opt", "ray.tune.search.bayesopt.BayesOptSearch"),
}
SEARCHER_TYPES = {"optuna": {"loguniform", "uniform", "choice", "randint"},
                  "hyperopt": {"loguniform", "uniform", "choice", "randint"},
                  "bayesopt": {"loguniform", "uniform"}}


def candidate_values(dim: SearchDimension) -> list[Any]:
    """Values that bound what the dimension can sample: every choice, or both ends of a range."""
    if dim.type in ("choice", "grid"):
        return list(dim.values)
    if dim.type == "randint":  # Ray's randint excludes the upper bound
        return [int(dim.lower), int(dim.upper) - 1]
    return [dim.lower, dim.upper]


def trial_spec(base: dict, config: dict[str, Any], *, name: str | None = None,
               overrides: dict[str, Any] | None = None) -> JobSpec:
    """Apply sampled values by dotted key to the base spec dump and re-validate (SpecError names the key)."""
    data = copy.deepcopy(base)
    for key, value in {**config, **(overrides or {})}.items():
        set_dotted(data, key.split("."), value)
    if name is not None:
        data["name"] = name
    data["tune"] = None
    return load_spec(data=data, check_paths=False)


def check_space(spec: JobSpec) -> None:
    """Refuse a tune section that cannot run; raises SpecError naming tune.<key>."""
    tune = spec.tune
    if tune is None:
        raise SpecError("the job spec has no tune: section (param_space, num_samples, metric ...)")
    base = spec.model_dump(mode="json")
    for key, dim in tune.param_space.items():
        where = f"tune.param_space.{key}"
        if key.split(".")[0] in FIXED_PREFIXES:
            raise SpecError(f"{where}: {key.split('.')[0]}.* is fixed for the whole sweep and cannot be searched")
        for value in candidate_values(dim):
            try:
                trial_spec(base, {key: value})
            except SpecError as e:
                raise SpecError(f"{where}: value {value!r} makes an invalid spec:\n{e}") from None
    _check_metric(spec)
    _check_scheduler(spec)
    searcher_class(spec)  # fails early when the package is missing or the space does not fit


def _check_metric(spec: JobSpec) -> None:
    metric = spec.tune.metric
    if metric == "eval_loss":
        if not spec.eval.eval_steps_interval:
            raise SpecError("tune.metric eval_loss needs eval.eval_steps_interval (eval loss is never computed)")
        if not spec.enabled_datasets("eval") and spec.eval.eval_split_fraction <= 0:
            raise SpecError("tune.metric eval_loss needs eval data: a dataset_type: eval dataset or "
                            "eval.eval_split_fraction > 0")
    elif metric == "clip_score":
        if spec.eval.evaluation_type != "clip":
            raise SpecError("tune.metric clip_score needs a CLIP model: set eval.evaluation_type: clip (and "
                            "eval.pretrained_evaluation_model_name_or_path), with validation images "
                            "(eval.validation_step_interval, eval.validation_prompt)")
        if spec.tune.mode != "max":
            raise SpecError("tune.metric clip_score: a higher CLIP score is better, so tune.mode must be max")
    elif metric not in ("train_loss", "learning_rate", "samples_per_s", "step_time_s"):
        raise SpecError(f"tune.metric {metric!r}: workers report eval_loss, clip_score (eval.evaluation_type: "
                        "clip), train_loss, learning_rate, samples_per_s and step_time_s")


def _check_scheduler(spec: JobSpec) -> None:
    t = spec.tune
    if t.scheduler == "asha" and t.grace_period >= max_steps(spec):
        raise SpecError(f"tune.grace_period {t.grace_period} must be below train.max_train_steps "
                        f"({max_steps(spec)}): ASHA would never compare trials")


def max_steps(spec: JobSpec) -> int:
    """The most steps any trial can run (max_train_steps may itself be searched)."""
    dim = spec.tune.param_space.get("train.max_train_steps")
    values = candidate_values(dim) if dim else [spec.train.max_train_steps]
    return int(max(values))


def check_cache_identity(spec: JobSpec, identity) -> None:
    """Refuse a dimension whose values would need a different cache than the base spec's.

    ``identity(spec) -> hashable`` gives the cache keys a spec reads (model files must exist).
    """
    base = spec.model_dump(mode="json")
    want = identity(spec)
    for key, dim in spec.tune.param_space.items():
        for value in candidate_values(dim):
            if identity(trial_spec(base, {key: value})) != want:
                raise SpecError(f"tune.param_space.{key}: value {value!r} changes the cache key (it changes "
                                "what is encoded); a sweep reads one cache. Fix the key in the spec, or cache "
                                "and sweep each value as its own job")


def tune_domain(dim: SearchDimension):
    from ray import tune

    if dim.type == "loguniform":
        return tune.loguniform(dim.lower, dim.upper)
    if dim.type == "uniform":
        return tune.uniform(dim.lower, dim.upper)
    if dim.type == "randint":
        return tune.randint(int(dim.lower), int(dim.upper))
    if dim.type == "grid":
        return tune.grid_search(list(dim.values))
    return tune.choice(list(dim.values))


def param_space(spec: JobSpec) -> dict[str, Any]:
    """Flat {dotted key: Tune domain}; trials receive {dotted key: value}."""
    return {key: tune_domain(dim) for key, dim in spec.tune.param_space.items()}


def num_trials(spec: JobSpec) -> int:
    grid = math.prod(len(d.values) for d in spec.tune.param_space.values() if d.type == "grid")
    return spec.tune.num_samples * grid


def searcher_class(spec: JobSpec):
    """None for random search (Tune's BasicVariantGenerator), else the Ray Tune searcher class."""
    alg = spec.tune.search_alg
    if alg == "random":
        return None
    module, path = SEARCHERS[alg]
    if importlib.util.find_spec(module) is None:
        raise SpecError(f"tune.search_alg {alg} needs the {module!r} package, which is not installed "
                        f"(pip install {module.replace('_', '-')}), or use search_alg: random")
    bad = {k: d.type for k, d in spec.tune.param_space.items() if d.type not in SEARCHER_TYPES[alg]}
    if bad:
        raise SpecError(f"tune.search_alg {alg} cannot search {bad}; it supports "
                        f"{sorted(SEARCHER_TYPES[alg])}")
    mod, cls = path.rsplit(".", 1)
    return getattr(importlib.import_module(mod), cls)


def build_searcher(spec: JobSpec, max_concurrent: int):
    """Random search (seeded by train.seed) or a Ray Tune searcher, limited to max_concurrent live trials."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    cls = searcher_class(spec)
    seed = spec.train.seed
    if cls is None:  # Tune ignores TuneConfig.max_concurrent_trials for a ready-made BasicVariantGenerator
        return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed)
    # metric and mode come from TuneConfig: Tune refuses a searcher that already has its own.
    seed_arg = {"optuna": "seed", "hyperopt": "random_state_seed", "bayesopt": "random_state"}[spec.tune.search_alg]
    return ConcurrencyLimiter(cls(**{seed_arg: seed}), max_concurrent=max_concurrent)


def build_scheduler(spec: JobSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = spec.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    # time_attr "step": rungs are optimizer steps whatever the report cadence.
    return ASHAScheduler(time_attr="step", max_t=max_steps(spec), grace_period=t.grace_period,
                         reduction_factor=t.reduction_factor)


def worker_resources(spec: JobSpec) -> dict[str, float]:
    """What one Train worker reserves (mirrors train.driver.scaling_config)."""
    res = spec.scaling.resources_per_worker
    if res is None:
        res = {"GPU": 1.0} if spec.scaling.use_gpu else {"CPU": 1.0}
    return {k: float(v) for k, v in res.items() if v}


def trains_in_trial(spec: JobSpec) -> bool:
    """Trials train in their reused Tune actor (tune.reuse_actors; by default when they have one worker)."""
    reuse = spec.tune.reuse_actors
    return spec.scaling.num_workers == 1 if reuse is None else reuse


def trial_resources(spec: JobSpec, driver_cpus: float) -> dict[str, float]:
    """Everything one trial holds: its driver function plus its Train workers, or, training in the trial,
    one worker's resources (at least one CPU)."""
    if trains_in_trial(spec):
        out = worker_resources(spec)
        out["CPU"] = max(out.get("CPU", 0.0), 1.0)
        return out
    out = {k: v * spec.scaling.num_workers for k, v in worker_resources(spec).items()}
    out["CPU"] = out.get("CPU", 0.0) + driver_cpus
    return out


def default_concurrency(spec: JobSpec, cluster: dict[str, float], driver_cpus: float) -> int:
    """How many trials fit in the cluster at once (at least 1, at most the number of trials)."""
    need = trial_resources(spec, driver_cpus)
    fits = min(int(cluster.get(k, 0.0) // v) for k, v in need.items() if v > 0)
    return max(1, min(fits, num_trials(spec)))
