"""A finished sweep as rows: one per trial (params, best and final metric, steps, status), and the best one."""
from __future__ import annotations

import posixpath

from flux_ray import storage

COMPLETED, STOPPED, ERROR, UNFINISHED = "completed", "stopped_early", "error", "unfinished"


def tune_statuses(results, sweep_name: str) -> dict[str, str]:
    """Trial name -> Tune status (TERMINATED, ERROR, RUNNING, PENDING ...) of a finished or interrupted fit."""
    from ray.tune import ExperimentAnalysis

    from flux_ray.tune.trial import trial_name

    analysis = ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem)
    return {trial_name(sweep_name, t.trial_id): t.status for t in analysis.trials}


def trial_rows(results, ctx, metric: str, mode: str, statuses: dict[str, str]) -> list[dict]:
    """Rows of a Tune ResultGrid: completed when the trial wrote its run_summary.json, stopped_early
    when Tune ended it before that, unfinished when the sweep was interrupted while it ran."""
    from flux_ray.tune.trial import read_run_ref

    pick = min if mode == "min" else max
    rows = []
    for r in results:
        name = posixpath.basename(r.path.replace("\\", "/").rstrip("/"))
        summary_uri = storage.join(ctx.trials_uri, name, "run_summary.json")
        run_summary = storage.read_json(summary_uri, ctx.storage) if storage.exists(summary_uri, ctx.storage) else {}
        df, last = r.metrics_dataframe, r.metrics or {}
        history = [float(v) for v in df[metric].dropna()] if df is not None and metric in df.columns else []
        diverged = bool(df is not None and "diverged" in df.columns and df["diverged"].fillna(False).astype(bool).any())
        status = COMPLETED if run_summary else ERROR if r.error else \
            STOPPED if statuses.get(name) == "TERMINATED" else UNFINISHED
        rows.append({"trial": name, "status": status, "params": dict(r.config or {}),
                     "steps": last.get("step"), f"best_{metric}": pick(history) if history else None,
                     f"final_{metric}": last.get(metric) if history else None, "diverged": diverged,
                     "reports": len(history), "mlflow_run_id": last.get("mlflow_run_id") or read_run_ref(ctx, name),
                     "lora": run_summary.get("lora"), "error": str(r.error)[:2000] if r.error else None})
    return sorted(rows, key=lambda row: row["trial"])


def best_trial(rows: list[dict], mode: str) -> dict | None:
    """The completed, non-diverged trial with the best final metric (its exported LoRA is that state)."""
    metric_key = next((k for k in (rows[0] if rows else {}) if k.startswith("final_")), None)
    ok = [r for r in rows if r["status"] == COMPLETED and not r["diverged"] and r.get(metric_key) is not None]
    if not ok:
        return None
    best = (min if mode == "min" else max)(ok, key=lambda r: r[metric_key])
    return {"trial": best["trial"], "params": best["params"], "value": best[metric_key], "steps": best["steps"],
            "mlflow_run_id": best["mlflow_run_id"], "lora": best["lora"],
            "chosen_by": f"{metric_key} of completed trials"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def format_table(rows: list[dict], metric: str, keys: list[str], best_name: str | None) -> str:
    head = ["", "trial", "status", "steps", f"best {metric}", f"final {metric}", *keys]
    body = [["*" if r["trial"] == best_name else "", r["trial"], r["status"], _fmt(r["steps"]),
             _fmt(r[f"best_{metric}"]), _fmt(r[f"final_{metric}"]), *(_fmt(r["params"].get(k)) for k in keys)]
            for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
