"""``output.publish``: copy the final LoRA (chosen formats), a model card and the last validation grid to a
storage prefix (local or s3://) and/or a Hugging Face Hub repo.

The Hub goes through huggingface_hub's own API (``create_repo`` + ``upload_folder``: preupload, then one commit);
its endpoint is HF_ENDPOINT and its token HF_TOKEN (or the saved login), which flux_ray never reads or logs.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from flux_ray import storage
from flux_ray.publish.model_card import render

log = logging.getLogger("flux_ray.publish")


def stage(spec, summary: dict, out: Path) -> list[str]:
    """Write what is published into ``out``; returns the relative paths."""
    lora_root = storage.join(spec.run_uri, "lora")
    formats = set(spec.output.publish.formats or spec.output.export_formats)
    lora = [f for f in storage.list_files(lora_root, spec.storage)
            if ("/" in f.rel_path and f.rel_path.split("/")[0] in formats)
            or ("/" not in f.rel_path and ("diffusers" in formats or spec.lora.lora_type == "lycoris"))]
    validation = _last_validation(spec)
    for f, rel in [(f, f.rel_path) for f in lora] + [(f, "validation/" + f.rel_path) for f in validation]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(storage.read_bytes(f.uri, spec.storage))
    lora_rel = sorted(f.rel_path for f in lora)
    images = sorted("validation/" + f.rel_path for f in validation)
    (out / "README.md").write_text(render(spec, summary, lora_rel, images))
    return [*lora_rel, *images, "README.md"]


def _last_validation(spec) -> list:
    """The newest validation grid (step-NNNNNN.png) and that step's single images."""
    root = storage.join(spec.run_uri, "validation")
    if not storage.exists(root, spec.storage):
        return []
    files = storage.list_files(root, spec.storage)
    grids = sorted(f.rel_path for f in files if "/" not in f.rel_path and f.rel_path.endswith(".png"))
    if not grids:
        return []
    step = grids[-1].removesuffix(".png")
    return [f for f in files if f.rel_path == grids[-1] or f.rel_path.startswith(step + "/")]


def publish(spec, summary: dict) -> dict[str, str]:
    """Deliver to every target of ``output.publish``; returns {target: location}."""
    p = spec.output.publish
    if not (p.uri or p.hub_model_id):
        return {}
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="flux_ray_publish_") as d:
        files = stage(spec, summary, Path(d))
        if p.uri:
            dest = storage.join(p.uri, spec.name)
            storage.ensure_bucket(dest, spec.storage)
            for rel in files:
                storage.write_bytes_atomic(storage.join(dest, rel), (Path(d) / rel).read_bytes(), spec.storage)
            out["storage"] = dest
            log.info("published %d files to %s", len(files), dest)
        if p.hub_model_id:
            out["hub"] = push_to_hub(p.hub_model_id, d, private=p.hub_private,
                                     message=f"flux_ray: {spec.name}, {summary.get('steps')} steps")
            log.info("published %d files to the Hub repo %s", len(files), p.hub_model_id)
    return out


def push_to_hub(repo_id: str, folder: str, *, private: bool, message: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi()  # endpoint: HF_ENDPOINT; token: HF_TOKEN or the saved login
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=message)
    return getattr(info, "commit_url", None) or f"{api.endpoint}/{repo_id}"
