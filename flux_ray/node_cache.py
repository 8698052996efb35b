"""Inputs given as s3:// URIs, fetched once per node into a node-local directory.

A model folder (`model.pretrained_model_name_or_path: s3://bucket/flux`), a LoRA to start from or to
fuse (`lora.init_lora`, `model.assistant_lora_path`), a prompt library (`eval.user_prompt_library`) and a CLIP
model for validation scores (`eval.pretrained_evaluation_model_name_or_path`) are read with local-path APIs (`from_pretrained`, safetensors, json). Every process that needs one
calls `localize(spec)` / `localize_model(model_spec, storage)`: the first process of a node downloads
into `$FLUX_RAY_NODE_CACHE` (default `/tmp/flux_ray_node_cache`) under an exclusive file lock, the
others of that node wait on the lock and reuse the copy (marked complete by a `.complete` file).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import shutil
from pathlib import Path

from flux_ray import storage as st
from flux_ray.spec import JobSpec, ModelSpec, StorageSpec

CACHE_ENV = "FLUX_RAY_NODE_CACHE"
DEFAULT_CACHE = "/tmp/flux_ray_node_cache"
MODEL_KEYS = ("pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path",
              "pretrained_vae_model_name_or_path", "assistant_lora_path")


def node_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def local_path(uri: str, storage: StorageSpec | None = None) -> str:
    """A path local-path APIs can open: the node-local copy of an s3:// file or folder, else ``uri`` itself."""
    return fetch(uri, storage) if st.is_s3(uri) else uri


def fetch(uri: str, storage: StorageSpec | None = None) -> str:
    """The node-local copy of a file or folder at `uri` (downloaded at most once per node)."""
    name = posixpath.basename(uri.rstrip("/")) or "root"
    root = node_cache_dir() / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    dest, done = root / name, root / ".complete"
    if done.exists():
        return str(dest)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other processes wait here, then find .complete
        if done.exists():
            return str(dest)
        files = st.list_files(uri, storage)
        if not files:
            raise FileNotFoundError(f"{uri}: no such object or prefix")
        tmp = root / f".partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        single = len(files) == 1 and files[0].uri.rstrip("/") == uri.rstrip("/")
        for f in files:
            target = tmp / name if single else tmp / name / f.rel_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(st.read_bytes(f.uri, storage))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp / name, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        done.write_text(uri)
    return str(dest)


def _local(value: str | None, storage: StorageSpec | None) -> str | None:
    return fetch(value, storage) if value and st.is_s3(value) else value


def localize_model(model_spec: ModelSpec, storage: StorageSpec | None = None) -> ModelSpec:
    """A copy of the model spec whose s3:// folders and files are node-local paths."""
    if not any(st.is_s3(getattr(model_spec, k) or "") for k in MODEL_KEYS):
        return model_spec
    return model_spec.model_copy(update={k: _local(getattr(model_spec, k), storage) for k in MODEL_KEYS})


def localize(spec: JobSpec) -> JobSpec:
    """A copy of the job spec whose s3:// model, LoRA and prompt-library inputs are node-local paths."""
    out = spec.model_copy(deep=True)
    out.model = localize_model(spec.model, spec.storage)
    out.lora.init_lora = _local(spec.lora.init_lora, spec.storage)
    out.eval.user_prompt_library = _local(spec.eval.user_prompt_library, spec.storage)
    if spec.eval.evaluation_type == "clip":
        out.eval.pretrained_evaluation_model_name_or_path = _local(spec.eval.pretrained_evaluation_model_name_or_path,
                                                                   spec.storage)
    return out
