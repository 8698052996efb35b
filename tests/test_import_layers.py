"""Imports run only down the floors: a module may import its own floor or a lower one, never a higher one.

The floors, lowest first (README "Layout" lists the same order):

0. spec      ``spec.py``, ``job_home.py`` (where a job's relative paths resolve; the spec calls it) and
             ``quiet.py`` (the console's quiet switch; no flux_ray imports)
1. storage   ``storage.py`` and ``node_cache.py`` (per-node copies of storage inputs)
2. core      ``core/`` (pure torch) and ``families/`` (one module per model family over core)
3. data      ``data/``
4. train     ``train/`` and ``tracking/`` (MLflow driver-side callbacks that Ray Train calls)
5. job       ``job.py``, ``placement.py`` (where a job's processes run), ``progress.py``, ``notify/``
             (webhooks) and ``publish/`` (delivery of the finished LoRA): what a job does around training
6. tune      ``tune/``
7. cli       ``cli.py``, ``export.py``, ``jobs_client.py``, ``simpletuner/`` (command-line front ends)

Every import counts: top-level, inside functions and under ``TYPE_CHECKING`` alike, so a lazy
import cannot hide an upward edge. ``core/`` and ``families/`` must also not import Ray.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import flux_ray

PACKAGE = Path(flux_ray.__file__).parent
FLOORS = {  # first path part under flux_ray/ (module or package name) -> floor
    "__init__": 0, "spec": 0, "job_home": 0, "quiet": 0,
    "storage": 1, "node_cache": 1,
    "core": 2, "families": 2,
    "data": 3,
    "train": 4, "tracking": 4,
    "job": 5, "placement": 5, "progress": 5, "notify": 5, "publish": 5,
    "tune": 6,
    "cli": 7, "export": 7, "jobs_client": 7, "simpletuner": 7,
}
NAMES = {v: k for k, v in {"spec": 0, "storage": 1, "core": 2, "data": 3, "train": 4, "job": 5, "tune": 6,
                           "cli": 7}.items()}
RAY_FREE = ("core", "families")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def top_part(dotted: str) -> str:
    """flux_ray.data.loader -> data; flux_ray -> __init__."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in the file; ``from flux_ray import storage`` gives flux_ray.storage."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "flux_ray":
                found += [(node.lineno, f"flux_ray.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def floor_of(path: Path) -> int:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return FLOORS[rel.parts[0]]


def test_every_module_has_a_floor():
    unplaced = {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in modules()} - FLOORS.keys()
    assert not unplaced, f"place these in FLOORS (and the README's layout order): {sorted(unplaced)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_down(path):
    here = floor_of(path)
    tree = ast.parse(path.read_text(), str(path))
    upward = [f"line {line}: {mod} ({NAMES.get(FLOORS[top_part(mod)], FLOORS[top_part(mod)])} floor)"
              for line, mod in imported(tree)
              if mod.startswith("flux_ray.") and FLOORS[top_part(mod)] > here]
    assert not upward, f"{path.relative_to(PACKAGE)} (floor {here}) imports up: {upward}"
    if path.relative_to(PACKAGE).parts[0] in RAY_FREE:
        rays = [f"line {line}: {mod}" for line, mod in imported(tree) if mod == "ray" or mod.startswith("ray.")]
        assert not rays, f"{path.relative_to(PACKAGE)} must stay Ray-free: {rays}"


def test_an_upward_import_is_caught():
    """The checker itself: a core module importing train is reported, one importing spec is not."""
    tree = ast.parse("from flux_ray.train.checkpoint import LORA_FILE\n"
                     "def f():\n    from flux_ray import spec\n")
    mods = [m for _, m in imported(tree)]
    assert mods == ["flux_ray.train.checkpoint", "flux_ray.spec"]
    assert [FLOORS[top_part(m)] > FLOORS["core"] for m in mods] == [True, False]
