"""A Tune callback (in the sweep's driver) that closes the nested MLflow runs of stopped or failed trials.

A trial that ASHA stops is killed with its actor, so it cannot close its own run; this marks it
KILLED with the step it reached, and a trial that errored FAILED.
"""
from __future__ import annotations

import logging

from ray.tune import Callback

from flux_ray.tracking import mlflow_run
from flux_ray.tune.trial import read_run_ref, trial_name

log = logging.getLogger("flux_ray.tune")


class MlflowTrialStatusCallback(Callback):
    def __init__(self, ctx):
        self.ctx = ctx  # a SweepContext

    def _close(self, trial, status: str, trial_status: str) -> None:
        run_id = (trial.last_result or {}).get("mlflow_run_id") or read_run_ref(
            self.ctx, trial_name(self.ctx.sweep_name, trial.trial_id))
        if not run_id:
            return
        try:
            if mlflow_run.run_status(self.ctx.tracking_uri, run_id) != "RUNNING":
                return  # the trial closed its own run
            step = (trial.last_result or {}).get("step")
            mlflow_run.set_tags(self.ctx.tracking_uri, run_id, {"flux_ray.trial_status": trial_status,
                                                                "flux_ray.stopped_at_step": step})
            mlflow_run.finish_run(self.ctx.tracking_uri, run_id, status)
        except Exception as e:  # tracking must not take the sweep down
            log.warning("could not close MLflow run %s of trial %s: %s", run_id, trial.trial_id, e)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "KILLED", "stopped_early")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED", "error")
