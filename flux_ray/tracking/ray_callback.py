"""A Ray Train callback that forwards rank 0's reports to MLflow (runs in Train's controller); a one-worker
sweep trial calls :func:`log_report` itself."""
from __future__ import annotations

from ray.train import UserCallback

from flux_ray.tracking import mlflow_run


class MlflowReportCallback(UserCallback):
    def __init__(self, tracking_uri: str, run_id: str, storage_spec=None):
        self.uri, self.run_id, self.storage = tracking_uri, run_id, storage_spec

    def after_report(self, run_context, metrics, checkpoint):
        log_report(self.uri, self.run_id, metrics[0] if metrics else {}, self.storage)


def log_report(uri: str, run_id: str, metrics: dict, storage_spec=None) -> None:
    """One worker report into the run: its metrics at its step, and validation files as artifacts."""
    if not metrics:
        return
    mlflow_run.log_metrics(uri, run_id, {k: v for k, v in metrics.items() if k != "step"}, int(metrics["step"]))
    for key in ("validation_grid", "validation_clip_scores"):  # the scores' JSON lands beside the grid
        if metrics.get(key):
            mlflow_run.log_storage_file(uri, run_id, metrics[key], storage_spec, "validation")
