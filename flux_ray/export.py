"""``flux-ray export``: find a run's LoRA (run dir, checkpoint or file) and its job spec, then export or merge it.

The command-line half of LoRA export; the key maps and tensor conversion it calls live in
``flux_ray/core/lora_export.py`` (pure torch).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from flux_ray.core.lora import LORA_WEIGHT_NAME
from flux_ray.core.lora_export import lora_info, read_lora
from flux_ray.families import get_family
from flux_ray.spec import ModelSpec, load_spec
from flux_ray.train.checkpoint import LORA_FILE, STATE_FILE

log = logging.getLogger("flux_ray.export")


def export_cli(args) -> int:
    """``flux-ray export SOURCE --format F [--out PATH] [--merge] [--spec YAML]``."""
    src = resolve_source(args.source)
    spec = load_spec(args.spec_path, check_paths=False) if args.spec_path else find_run_spec(src.run_dir)
    metadata = {"training_steps": src.steps} if src.steps is not None else {}
    if args.merge:
        if spec is not None:
            model_spec = spec.model
        else:  # the file names its base model (flux_ray.base_model), written at training time
            info = lora_info(*read_lora(src.lora_file))
            if not info.get("base_model"):
                raise ValueError("--merge needs the base model: pass the job spec with --spec")
            model_spec = ModelSpec(pretrained_model_name_or_path=info["base_model"],
                                   model_family=info.get("model_family", "flux"),
                                   model_flavour=info.get("model_flavour", "krea"))
        out = Path(args.out) if args.out else default_out(src, "merged_transformer")
        print(get_family(model_spec.model_family).merge_and_save(src.lora_file, model_spec, out, spec=spec))
        return 0
    out = Path(args.out) if args.out else default_out(src, args.format)
    filename = None
    if out.suffix == ".safetensors":
        out, filename = out.parent, out.name
    family = get_family(spec.model.model_family if spec is not None else ModelSpec().model_family)
    print(family.export_lora_file(src.lora_file, args.format, out, spec=spec, metadata=metadata, filename=filename))
    return 0


@dataclass
class ExportSource:
    lora_file: Path
    run_dir: Path | None = None
    checkpoint_dir: Path | None = None
    steps: int | None = None


def resolve_source(source: str | os.PathLike) -> ExportSource:
    """A run dir (<output>/<name>), a Ray checkpoint dir or a LoRA file -> the file to export and its run."""
    p = Path(source).expanduser().resolve()
    if p.is_file():
        if p.name == LORA_FILE:
            return resolve_source(p.parent)
        run = p.parent.parent if p.parent.name == "lora" else None
        return ExportSource(p, run_dir=run if run and _is_run_dir(run) else None)
    if (p / LORA_FILE).is_file():
        state = json.loads((p / STATE_FILE).read_text()) if (p / STATE_FILE).is_file() else {}
        return ExportSource(p / LORA_FILE, run_dir=p.parent if _is_run_dir(p.parent) else None, checkpoint_dir=p,
                            steps=state.get("position", {}).get("step"))
    if (p / "lora" / LORA_WEIGHT_NAME).is_file():
        summary = p / "run_summary.json"
        steps = json.loads(summary.read_text()).get("steps") if summary.is_file() else None
        return ExportSource(p / "lora" / LORA_WEIGHT_NAME, run_dir=p, steps=steps)
    checkpoints = sorted(c for c in p.glob("checkpoint_*") if (c / LORA_FILE).is_file())
    if checkpoints:  # a run without a final export yet: its newest checkpoint
        return resolve_source(max(checkpoints, key=lambda c: (_checkpoint_step(c, STATE_FILE), c.name)))
    raise FileNotFoundError(f"{p}: not a LoRA file, a checkpoint dir ({LORA_FILE}) or a run dir "
                            f"(lora/{LORA_WEIGHT_NAME} or checkpoint_*)")


def _checkpoint_step(c: Path, state_file: str) -> int:
    try:
        return int(json.loads((c / state_file).read_text())["position"]["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _is_run_dir(p: Path) -> bool:
    return (p / "run_summary.json").is_file() or (p / "lora").is_dir() or any(p.glob("checkpoint_*"))


def default_out(src: ExportSource, what: str) -> Path:
    """<run>/lora/<what> for a run, <run>/exports/<checkpoint>/<what> for a checkpoint, else beside the file."""
    if src.checkpoint_dir is not None:
        return src.checkpoint_dir.parent / "exports" / src.checkpoint_dir.name / what
    if src.run_dir is not None:
        return src.run_dir / "lora" / what
    return src.lora_file.parent / what


def find_run_spec(run_dir: Path | None):
    """The run's job_spec.yaml as logged to MLflow in the local store (<output>/mlartifacts), or None."""
    if run_dir is None:
        return None
    summary_file = run_dir / "run_summary.json"
    tracking = json.loads(summary_file.read_text()).get("mlflow", {}) if summary_file.is_file() else {}
    run_id, uri = tracking.get("run_id"), tracking.get("tracking_uri") or ""
    roots = [Path(uri.removeprefix("sqlite:///")).parent] if uri.startswith("sqlite:///") else []
    roots.append(run_dir.parent)  # default store: <output>/mlflow.db with artifacts in <output>/mlartifacts
    # artifacts live at <location>/<run_id>/artifacts, location = mlartifacts or mlartifacts/<experiment id>
    layouts = ["mlartifacts/{}/artifacts/job_spec.yaml", "mlartifacts/*/{}/artifacts/job_spec.yaml"]
    if run_id:
        for f in (f for root in roots for pattern in layouts for f in root.glob(pattern.format(run_id))):
            return load_spec(f, check_paths=False)
    # no run_summary.json yet (still training): the newest spec logged under this run's name
    named = [f for root in roots for pattern in layouts for f in root.glob(pattern.format("*"))
             if _yaml_name(f) == run_dir.name]
    if named:
        return load_spec(max(named, key=lambda f: f.stat().st_mtime), check_paths=False)
    if run_id and uri and not uri.startswith("sqlite:///"):
        log.warning("run %s logs to %s: pass --spec (export reads only a local MLflow store)", run_id, uri)
    return None


def _yaml_name(f: Path) -> str | None:
    import yaml

    try:
        return (yaml.safe_load(f.read_text()) or {}).get("name")
    except (OSError, yaml.YAMLError):
        return None
