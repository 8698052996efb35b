"""`flux-ray` command line: each subcommand validates the spec first, then calls a driver function."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from flux_ray.spec import SpecError, load_spec, spec_to_yaml


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key by dotted path, e.g. --set train.learning_rate=3e-4 (repeatable)")


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray (default: max(8, cores))")


def _family_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=["flux", "flux2"], default="flux", help="model family (flux: FLUX.1)")
    p.add_argument("--flavour", default=None, help="flux2: klein-4b, klein-9b (default) or dev; flux tiny-model: kontext")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flux-ray", description="Distributed Flux.1 LoRA fine-tuning on Ray")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate", help="check a spec and print the effective spec with every default")
    _spec_args(p)
    for name, text in [("cache", "encode the datasets into the cache"), ("train", "train from an existing cache"),
                       ("run", "cache, then train"), ("tune", "a Ray Tune sweep over the spec's tune section")]:
        p = sub.add_parser(name, help=text)
        _spec_args(p)
        _ray_args(p)
        if name in ("train", "run"):
            p.add_argument("--restart", nargs="?", const="keep", choices=["keep", "discard"], default=None,
                           help="start the run afresh under the same name: its old contents (checkpoints, LoRA) "
                                "move to <run>/previous-<time>/ (keep, the default) or are deleted (discard)")
    p = sub.add_parser("tiny-model", help="write a tiny random Flux in diffusers layout")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    _family_args(p)
    p = sub.add_parser("random-model", help="write a full-size random model for speed work "
                                            "(FLUX.1-dev ~34 GB; FLUX.2 flavours with --family flux2)")
    p.add_argument("directory")
    p.add_argument("--device", default="cuda", help="where the random weights are made (cuda is fast)")
    p.add_argument("--seed", type=int, default=0)
    _family_args(p)
    p = sub.add_parser("demo-data", help="write a small generated image dataset with captions")
    p.add_argument("directory")
    p.add_argument("-n", type=int, default=32)
    p = sub.add_parser("export", help="convert a run's LoRA or a checkpoint to another format")
    p.add_argument("source", help="run directory, checkpoint directory or LoRA file")
    p.add_argument("--format", choices=["diffusers", "comfyui", "kohya"], default="diffusers")
    p.add_argument("--out", default=None)
    p.add_argument("--merge", action="store_true", help="fuse into the base transformer and save it (bf16)")
    p.add_argument("--spec", dest="spec_path", default=None, help="job spec (default: the run's job_spec.yaml)")
    p = sub.add_parser("import-simpletuner", help="write a job spec from SimpleTuner's config.json and "
                                                  "multidatabackend.json (report on stderr)")
    p.add_argument("config", help="SimpleTuner config.json (keys with or without the leading --)")
    p.add_argument("--data-backend-config", default=None,
                   help="multidatabackend.json (default: the config's data_backend_config)")
    p.add_argument("--user-prompt-library", default=None, help="user_prompt_library.json ({nickname: prompt})")
    p.add_argument("--working-dir", default=None,
                   help="where SimpleTuner resolved the files' relative paths (default: the config's parent's parent)")
    p.add_argument("-o", "--output", default=None, help="spec YAML to write (default: stdout)")
    from flux_ray.jobs_client import add_job_commands

    add_job_commands(sub)
    return ap


def fetch_remote_source(args):
    """`flux-ray export s3://.../run`: copy the run's LoRA (or its newest checkpoint) and run_summary.json to a
    temp dir, recover the spec from the run's MLflow server, and default --out to ./<run>-<format>."""
    import tempfile
    from pathlib import Path

    from flux_ray import storage

    src = args.source.rstrip("/")
    name = src.rsplit("/", 1)[-1]
    local = Path(tempfile.mkdtemp(prefix="flux_ray_export_")) / name
    files = storage.list_files(src)
    if not files:
        raise FileNotFoundError(f"{src}: no such object or prefix")
    wanted = [f for f in files if f.rel_path == "run_summary.json" or f.rel_path.startswith("lora/")]
    if len(files) > 1 and not any(f.rel_path.startswith("lora/") for f in files):  # still training
        newest = max({f.rel_path.split("/")[0] for f in files if f.rel_path.startswith("checkpoint_")}, default=None)
        wanted += [f for f in files if newest and f.rel_path.startswith(newest + "/")]
    for f in wanted if len(files) > 1 else files:
        target = local / f.rel_path if len(files) > 1 else local.parent / f.rel_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(f.uri))
    summary = local / "run_summary.json"
    tracking = json.loads(summary.read_text()).get("mlflow", {}) if summary.is_file() else {}
    if not args.spec_path and tracking.get("tracking_uri", "").startswith(("http://", "https://")):
        from mlflow import MlflowClient

        client = MlflowClient(tracking["tracking_uri"])
        args.spec_path = client.download_artifacts(tracking["run_id"], "job_spec.yaml", str(local.parent))
    args.source = str(local if len(files) > 1 else local.parent / files[0].rel_path)
    if not args.out:
        args.out = str(Path.cwd() / f"{name}-{'merged' if args.merge else args.format}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # flux_ray's INFO lines stay; Ray's and the libraries' noise goes (flux_ray/quiet.py)
        from flux_ray import quiet

        logging.getLogger("flux_ray").setLevel(logging.INFO)
        quiet.enable(verbose=False)
    try:
        return _dispatch(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.cmd in ("tiny-model", "random-model") and args.family == "flux2":
        from flux_ray.core.flux2.flavours import DEFAULT_FLAVOUR, FLAVOURS

        flavour = args.flavour or DEFAULT_FLAVOUR
        if flavour not in FLAVOURS:
            print(f"error: --flavour {flavour!r} is not a FLUX.2 flavour; choose one of {sorted(FLAVOURS)}")
            return 2
        if args.cmd == "tiny-model":
            from flux_ray.core.flux2.tiny import write_tiny_flux2

            print(write_tiny_flux2(args.directory, flavour, seed=args.seed, overwrite=args.overwrite))
        else:
            from flux_ray.core.flux2.full_size import write_random_flux2

            print(write_random_flux2(args.directory, flavour, device=args.device, seed=args.seed))
        return 0
    kontext_tiny = args.cmd == "tiny-model" and args.flavour == "kontext"
    if args.cmd in ("tiny-model", "random-model") and args.flavour is not None and not kontext_tiny:
        print("error: --flavour applies to --family flux2, and to FLUX.1's tiny-model as kontext (FLUX.1's tiny and "
              "random models have one shape)")
        return 2
    if args.cmd == "tiny-model":
        from flux_ray.core.tiny import write_tiny_flux

        print(write_tiny_flux(args.directory, seed=args.seed, overwrite=args.overwrite, kontext=kontext_tiny))
        return 0
    if args.cmd == "random-model":
        from flux_ray.core.full_size import write_random_flux

        print(write_random_flux(args.directory, device=args.device, seed=args.seed))
        return 0
    if args.cmd == "demo-data":
        from flux_ray.data.demo import write_demo_data

        n = write_demo_data(args.directory, n=args.n)
        print(f"wrote {n} images to {args.directory}")
        return 0
    if args.cmd == "export":
        from flux_ray.export import export_cli
        from flux_ray.storage import is_s3

        return export_cli(fetch_remote_source(args) if is_s3(args.source) else args)
    if args.cmd == "import-simpletuner":
        from flux_ray.simpletuner import import_cli

        return import_cli(args)
    if args.cmd in ("submit", "status", "logs", "stop"):
        from flux_ray.jobs_client import run_job_command

        return run_job_command(args)
    spec = load_spec(args.spec, args.overrides)
    if args.cmd == "validate":
        print(spec_to_yaml(spec), end="")
        return 0
    from flux_ray import job
    from flux_ray.job_home import ray_job_submission_id
    from flux_ray.placement import check_placement

    if args.cmd in ("train", "run") and args.restart is None:
        from flux_ray.train.run_identity import plan_run

        plan_run(spec)  # a refused rerun fails here, before Ray starts (job.run plans again, with --restart)
    job.init_ray(args.num_cpus, verbose=args.verbose)
    check_placement(spec)  # before any work: local paths other nodes cannot see, a head-only MLflow store
    if ray_job_submission_id():
        print(f"outputs:     run {spec.run_uri}  cache {spec.cache.uri}", flush=True)
    if args.cmd == "cache":
        summary = job.cache(spec).to_dict()
        print(json.dumps(summary, indent=1))
        return 0
    if args.cmd == "tune":
        from flux_ray.tune.sweep import run_sweep

        result = run_sweep(spec)
        print(json.dumps(result, indent=1, default=str))
        return 0
    from flux_ray.progress import summary_line

    summary = job.run(spec, do_cache=args.cmd == "run", restart=args.restart)
    published = "".join(f"published:   {where}\n" for where in summary.get("published", {}).values())
    print(f"{summary_line(summary)}\n\n{summary['rerun_message']}\nLoRA:        {summary['lora']}\n"
          f"cache:       {summary['cache_uri']}\n"
          f"MLflow:      {summary['mlflow']['tracking_uri']} run {summary['mlflow']['run_id']}\n"
          f"steps:       {summary['steps']}  final loss {summary['final_loss']}\n{published}"
          f"summary:     {summary['run_uri']}/run_summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
