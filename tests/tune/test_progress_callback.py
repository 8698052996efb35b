"""`flux-ray tune` progress: one line per trial result, from a real (tiny) Tune run."""
from __future__ import annotations


def test_one_line_per_trial_result(ray_session, tmp_path, capsys):
    from ray import tune

    from flux_ray.tune.progress_callback import TrialProgressCallback

    def _trainable(config):  # local: pickled by value (the test module is not importable on workers)
        from ray import tune

        for step in (2, 4):
            tune.report({"step": step, "train_loss": config["lr"] * step, "samples_per_s": 10.0})

    tuner = tune.Tuner(_trainable, param_space={"lr": tune.grid_search([0.1, 0.2])},
                       run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0,
                                                 callbacks=[TrialProgressCallback(4)]))
    assert not tuner.fit().errors
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    steps = sorted((line.split()[1], line.split("step ")[1].split()[0]) for line in lines if " step " in line
                   and "ended" not in line)
    trials = sorted({t for t, _ in steps})
    assert len(trials) == 2 and steps == sorted((t, s) for t in trials for s in ("2/4", "4/4"))
    assert all("samples/s" in line and "ETA" in line for line in lines if "ended" not in line)
    assert sum("ended at step 4/4" in line for line in lines) == 2
