"""The job's webhook events, built on the driver: started, validation, checkpoint, finished, failed."""
from __future__ import annotations

import logging

from flux_ray.notify.messages import Event

log = logging.getLogger("flux_ray.notify")


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def started(spec, message: str) -> Event:
    return Event("started", spec.name, f"started: {message}",
                 {"run_uri": spec.run_uri, "max_train_steps": spec.train.max_train_steps,
                  "base_model": spec.model.base_path})


def from_report(spec, metrics: dict, checkpoint_path: str | None) -> list[Event]:
    """A Ray Train report -> a validation event (with the grid image) and/or a checkpoint event."""
    step, total = int(metrics.get("step", 0)), spec.train.max_train_steps
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
    out = []
    grid = metrics.get("validation_grid")
    if grid:
        from flux_ray import storage

        try:
            png = storage.read_bytes(grid, spec.storage)
        except Exception as e:  # an event without its image rather than none
            log.warning("validation grid %s unreadable for the webhook: %s", grid, e)
            png = None
        out.append(Event("validation", spec.name, f"validation at step {step}/{total}",
                         {"step": step, "image_uri": grid, "metrics": scalars}, png, grid.rsplit("/", 1)[-1]))
    if checkpoint_path:
        loss = metrics.get("train_loss")
        out.append(Event("checkpoint", spec.name, f"checkpoint at step {step}/{total}"
                         + (f", loss {_fmt(loss)}" if loss is not None else ""),
                         {"step": step, "checkpoint": checkpoint_path, "metrics": scalars}))
    return out


def finished(spec, summary: dict) -> Event:
    metrics = {k: summary.get(k) for k in ("steps", "final_loss", "eval_loss", "seconds")}
    where = ", ".join(summary.get("published", {}).values()) or summary["lora"]
    text = (f"finished: {metrics['steps']} steps, loss {_fmt(metrics['final_loss'])}"
            + (f", eval loss {_fmt(metrics['eval_loss'])}" if metrics["eval_loss"] is not None else "")
            + f"; LoRA at {where}")
    return Event("finished", spec.name, text, {"lora": summary["lora"], "run_uri": summary["run_uri"],
                                                "published": summary.get("published", {}), "metrics": metrics})


def failed(spec, error: BaseException) -> Event:
    text = f"{type(error).__name__}: {error}"
    return Event("failed", spec.name, f"failed: {text[:1500]}", {"error": text[:4000], "run_uri": spec.run_uri})
