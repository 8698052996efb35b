"""A Ray Train callback that forwards rank 0's reports to MLflow (runs in Train's controller)."""
from __future__ import annotations

from ray.train import UserCallback

from flux_ray.tracking import mlflow_run


class MlflowReportCallback(UserCallback):
    def __init__(self, tracking_uri: str, run_id: str, storage_spec=None):
        self.uri, self.run_id, self.storage = tracking_uri, run_id, storage_spec

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0] if metrics else {}
        if not m:
            return
        mlflow_run.log_metrics(self.uri, self.run_id, {k: v for k, v in m.items() if k != "step"}, int(m["step"]))
        for key in ("validation_grid", "validation_clip_scores"):  # the scores' JSON lands beside the grid
            if m.get(key):
                mlflow_run.log_storage_file(self.uri, self.run_id, m[key], self.storage, "validation")
