"""Run identity: what a run trains, recorded in ``<run>/run_identity.json``, checked before a rerun starts.

A run is resumed by name (Ray Train finds its checkpoints under ``<output.uri>/<name>``). A rerun under the
same name must train the same thing, or its checkpoint would be loaded into another model (a different LoRA
shape fails inside torch) or silently continued with other hyper-parameters. The identity is every spec key
except ``RESUMABLE_KEYS``: options a run may change between attempts and still resume (more steps, cadence of
logs, checkpoints, eval and validation, where tracking and outputs go, encoder throughput knobs).

``plan_run`` decides, before any Ray work: ``fresh`` (no checkpoint), ``resume`` (same identity, steps left),
``complete`` (same identity, the latest checkpoint already reached max_train_steps: the LoRA is re-exported,
nothing trains) or refuses with the keys that differ. ``restart`` gives a fresh run version in the same place:
``keep`` moves the old contents aside to ``<run>/previous-<UTC time>/``, ``discard`` deletes them.
Driver side; no Ray import.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from flux_ray import storage
from flux_ray.data.cache_layout import digest as cache_digest
from flux_ray.spec import JobSpec, SpecError, flatten

log = logging.getLogger("flux_ray.train")

IDENTITY_FILE = "run_identity.json"
PREVIOUS_PREFIX = "previous-"
RESTART_MODES = ("keep", "discard")
RESUMABLE_KEYS = (
    "name", "tune", "tune.*", "output.*", "notify.*", "tracking.*", "storage.*",
    "train.max_train_steps", "train.log_every", "train.checkpointing_steps", "train.checkpoints_total_limit",
    "train.resume_from_checkpoint", "train.compile", "train.attention_backend", "train.gradient_checkpointing",
    "train.gradient_checkpointing_interval",
    "eval.eval_steps_interval", "eval.eval_timesteps", "eval.eval_seed", "eval.validation_*",
    "eval.user_prompt_library", "eval.evaluation_type", "eval.pretrained_evaluation_model_name_or_path",
    "cache.uri", "cache.vae_batch_size", "cache.vae_bucket_window", "cache.text_batch_size", "cache.num_vae_actors",
    "cache.num_text_actors", "cache.gpus_per_actor", "cache.commit_every", "cache.min_rows_per_file",
    "cache.decode_concurrency", "cache.vae_channels_last", "cache.compile_encoders",
    "scaling.max_failures", "scaling.resources_per_worker", "scaling.use_gpu",
    "model.make_tiny_if_missing", "model.quantize_via", "model.enable_group_offload", "model.group_offload_*",
    "datasets.*.make_demo_if_missing",
)
"""Dotted keys (fnmatch patterns) a rerun may change and still resume; every other key is the run's identity.
Kept in the identity on purpose: scaling.num_workers (the global batch) and scaling.strategy (DeepSpeed keeps no
optimizer moments), mixed_precision and the base's precision (the numbers trained)."""


def is_resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


def split_keys(spec: JobSpec) -> tuple[dict, dict]:
    """(identity keys, resumable keys) of the spec, flattened to dotted keys (credentials dropped)."""
    flat = flatten(spec.model_dump(mode="json"))
    identity = {k: v for k, v in flat.items() if not is_resumable(k)}
    return identity, {k: v for k, v in flat.items() if is_resumable(k)}


def digest(identity: dict) -> str:
    return cache_digest(identity)  # the cache keys' hash: sha256 of the sorted JSON


@dataclass
class RunPlan:
    action: str              # fresh | resume | complete
    message: str
    steps_done: int = 0
    checkpoint_uri: str | None = None
    changed_resumable: dict = field(default_factory=dict)


def _uri(spec: JobSpec, *parts: str) -> str:
    return storage.join(spec.run_uri, *parts)


def latest_checkpoint(spec: JobSpec) -> tuple[int, str | None, dict]:
    """(step, URI, trainer state) of the run's latest checkpoint directly under the run dir; (0, None, {})."""
    from flux_ray.train.checkpoint import STATE_FILE

    best: tuple[int, str | None, dict] = (0, None, {})
    for f in storage.list_files(spec.run_uri, spec.storage, suffixes=(STATE_FILE,)):
        if f.rel_path.count("/") != 1 or f.rel_path.startswith(PREVIOUS_PREFIX):
            continue
        state = json.loads(storage.read_bytes(f.uri, spec.storage))
        step = int(state["position"]["step"])
        if best[1] is None or step > best[0]:
            best = (step, f.uri.rsplit("/", 1)[0], state)
    return best


def read_identity(spec: JobSpec) -> dict | None:
    uri = _uri(spec, IDENTITY_FILE)
    return storage.read_json(uri, spec.storage) if storage.exists(uri, spec.storage) else None


def _show(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    missing = object()
    return [f"{k}: {_show(old.get(k, missing)) if k in old else '(absent)'} -> "
            f"{_show(new[k]) if k in new else '(absent)'}" for k in keys if old.get(k, missing) != new.get(k, missing)]


def plan_run(spec: JobSpec, restart: str | None = None) -> RunPlan:
    """Decide how this attempt of the run starts (see the module docstring); raises SpecError to refuse."""
    if restart is not None:
        if restart not in RESTART_MODES:
            raise SpecError(f"--restart={restart}: expected one of {', '.join(RESTART_MODES)}")
        where = set_aside(spec, restart)
        return RunPlan("fresh", f"run {spec.name}: restarted from step 0" + (
            f"; the previous contents are kept in {where}" if where else
            "; the previous contents were deleted" if restart == "discard" else ""))
    step, ckpt_uri, state = latest_checkpoint(spec)
    if ckpt_uri is None:
        return RunPlan("fresh", f"run {spec.name}: new, training {spec.train.max_train_steps} steps")
    ways_out = (f"give the job a new name (--set name=...), or pass --restart to start {spec.run_uri} afresh "
                f"(old contents moved to {spec.run_uri}/{PREVIOUS_PREFIX}<time>/; --restart=discard deletes them)")
    if spec.train.resume_from_checkpoint is None:
        raise SpecError(f"train.resume_from_checkpoint is null (start fresh) but run {spec.name} already holds a "
                        f"checkpoint at step {step} ({ckpt_uri}): {ways_out}")
    identity, resumable = split_keys(spec)
    prior = read_identity(spec)
    changed: dict = {}
    if prior is None:
        log.warning("run %s has checkpoints but no %s (an older flux_ray wrote it): resuming without an identity "
                    "check", spec.name, IDENTITY_FILE)
    elif prior["digest"] != digest(identity):
        diffs = _differences(prior["identity"], identity)
        raise SpecError(f"run {spec.name} at {spec.run_uri} was trained with a different spec (checkpoint at "
                        f"step {step}); these keys define what is trained and differ:\n  " + "\n  ".join(diffs) +
                        f"\nTo train the new spec, {ways_out}")
    else:
        changed = {k: v for k, v in resumable.items() if prior.get("resumable", {}).get(k) != v and k != "name"}
    note = f" (changed since the last attempt: {', '.join(sorted(changed))})" if changed else ""
    if step >= spec.train.max_train_steps:
        return RunPlan("complete", f"run {spec.name} is complete: its latest checkpoint is at step {step} "
                       f"(train.max_train_steps={spec.train.max_train_steps}); nothing is trained, the LoRA is "
                       f"re-exported from {ckpt_uri}. Raise train.max_train_steps to continue it{note}",
                       step, ckpt_uri, changed)
    return RunPlan("resume", f"run {spec.name}: resuming at step {step} of {spec.train.max_train_steps} from "
                   f"{ckpt_uri}{note}", step, ckpt_uri, changed)


def record_identity(spec: JobSpec, cache_keys: dict | None = None) -> str:
    """Write ``<run>/run_identity.json``; cache keys recorded earlier must match the ones given."""
    identity, resumable = split_keys(spec)
    prior = read_identity(spec) or {}
    old_keys = prior.get("cache_keys") or {}
    if cache_keys and old_keys and prior.get("digest") == digest(identity) and old_keys != cache_keys:
        raise SpecError(f"run {spec.name}: the cache keys changed since the run started ({old_keys} -> {cache_keys}; "
                        "the model's VAE config or the cache format differs): give the job a new name or pass "
                        "--restart")
    uri = _uri(spec, IDENTITY_FILE)
    storage.write_json_atomic(uri, {"digest": digest(identity), "identity": identity, "resumable": resumable,
                                    "cache_keys": cache_keys or old_keys}, spec.storage)
    return uri


def set_aside(spec: JobSpec, mode: str) -> str | None:
    """Move (keep) or delete (discard) everything under the run dir except earlier ``previous-*`` folders;
    returns where it went (None when there was nothing, or it was deleted)."""
    top = {f.rel_path.split("/", 1)[0] for f in storage.list_files(spec.run_uri, spec.storage)}
    top = sorted(t for t in top if not t.startswith(PREVIOUS_PREFIX))
    if not top:
        return None
    dest = _uri(spec, PREVIOUS_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    for name in top:
        src = _uri(spec, name)
        if mode == "keep" and not storage.is_s3(src):
            Path(dest).mkdir(parents=True, exist_ok=True)
            os.rename(src, os.path.join(dest, name))
            continue
        if mode == "keep":
            for f in storage.list_files(src, spec.storage):
                rel = f.uri[len(spec.run_uri.rstrip("/")) + 1:]
                storage.write_bytes_atomic(storage.join(dest, rel), storage.read_bytes(f.uri, spec.storage),
                                           spec.storage)
        storage.delete(src, spec.storage)
    return dest if mode == "keep" else None
