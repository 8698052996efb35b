"""A Tune callback (in the sweep's driver) printing one progress line per trial result, as `flux-ray run` does."""
from __future__ import annotations

from ray.tune import Callback

from flux_ray.progress import ProgressPrinter


class TrialProgressCallback(Callback):
    def __init__(self, total_steps: int):
        self.total = total_steps
        self.printers: dict[str, ProgressPrinter] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        printer = self.printers.setdefault(trial.trial_id, ProgressPrinter(self.total))
        print(f"trial {trial.trial_id}  {printer.line(result)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self.printers.get(trial.trial_id)
        step = last.last.get("step") if last else None
        print(f"trial {trial.trial_id}  ended at step {step}/{self.total}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id}  failed (see its error file in the sweep's directory)", flush=True)
