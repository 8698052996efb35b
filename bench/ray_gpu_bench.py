"""The Ray path on GPUs: the cache job (Ray Data) at 1024 px and Ray Train at 512 px on 1 and N GPUs.

Full-size random-weight FLUX.1-dev (``flux-ray random-model``, written once to --work) loaded through the
same ``from_pretrained`` calls as the real model; a generated JPEG photo set. ``--family flux2 --flavour
dev|klein-4b|klein-9b``: a full-size random FLUX.2 (``core/flux2/full_size.write_random_flux2``, built on the
GPU one component at a time; [dev]'s 32B transformer is ~64 GB on disk, its 24B Mistral text encoder ~48 GB
more). ``--small-text-encoder 1`` writes a text encoder of the same class with the real width and the depth the
stacked layers need but a small MLP, few heads and a tiny vision tower (``reduced_text_encoder_config``, 0.7B
for [dev]): the transformer sees prompt embeddings of the real shape, disk and the cache step stay small, and
**text-encoder speed and memory are not measured**. Phases, each optional:

  cache   ``run_cache`` on --cache-images images at --cache-res: images/s end to end, steady (between the
          first and last commit of --commit-every rows) and per Ray Data stage, for unique captions (one per
          image) and for one shared caption (instance prompt); text runs beside the latents
          (--gpus-per-actor 0.5: one VAE and one text actor share a GPU)
  train   for each --gpus value G: ``train()`` (TorchTrainer, G workers, DDP over NCCL) at --train-res;
          samples/s from the workers' reports after the first --warmup-reports reports; scaling efficiency
          = samples/s(G) / (G x samples/s(1)); --strategy ddp|fsdp|deepspeed. Memory per GPU: rank 0's peak
          over the steps (``step_peak_gpu_mem_gib``: after the build, so FSDP's pre-shard replica is not in
          it) and the maximum over ranks (``*_max``), plus the whole process's peak (the load included);
          start-up per run: train() -> the first optimizer step, split into Ray's part (the worker process, the
          worker module, the train function's entry, as seconds after train()) and the worker's (imports, base
          load, build, first step), and the first step's compile (dynamo tracing, backend, backward, CUDA graph
          recording, inductor / AOT autograd cache hits and misses; train/startup.py). The warm start issue #18
          defines: --gpus 1 1 --fresh-node-caches 1 (the second run on a "fresh node" finds the first's compile
          artifacts in the run's storage). CUDA graphs: --dynamo-mode reduce-overhead; several GPUs then sync
          their LoRA gradients with one flat all-reduce per step, no DDP wrapper (scaling.gradient_sync auto;
          --gradient-sync ddp is refused there, call 33), e.g. --phases train --gpus 1 2 --dynamo-mode
          reduce-overhead. --gradient-sync allreduce forces that path without CUDA graphs too.

  sweep   ``run_sweep`` of --sweep-trials one-worker trials x --steps steps at --sweep-concurrency trials at
          once (a grid over the learning rate, FIFO): wall time, each trial's start-up (build, first step,
          whether it reused a live trial process's model), its next steps (CUDA graph recording), compile
          artifacts' publishing, step time and timeline, and issue #18's bound 1.3 x (sum of the trials' step
          time) / concurrency + one cold start. The cold start is the issue's: train() -> first optimizer step of
          one trial's spec run alone, measured after the sweep in the same state (--sweep-lone 1; with
          --fresh-node-caches 1 the sweep and that run each start on a "fresh node" with no shared compile
          artifacts). Also printed: the bound with the cold start counted from the trial function's entry (it
          leaves out Tune's start and the trial actor's start, which the lone run's train() pays too).

Prints JSON lines as it goes and markdown tables at the end (also written to --out/ray_gpu_bench.json).
CPU smoke test (tiny model, CPU workers): --tiny --cpu (reduce-overhead needs GPUs: refused on a CPU).

usage: python bench/ray_gpu_bench.py --work .bench_work --phases cache train --gpus 1 2 --out $OUT
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import statistics
import time
from pathlib import Path

SIZES = [(1024, 1024), (1216, 832), (832, 1216), (1536, 1024)]


def log(**kv) -> None:
    print(json.dumps(kv, default=str), flush=True)


def _write_photo(args) -> None:
    from flux_ray.data import demo
    import numpy as np

    directory, i, size = args
    rng = np.random.default_rng(i)
    colour, shape, bg = (str(rng.choice(list(demo.COLOURS))), str(rng.choice(demo.SHAPES)),
                         str(rng.choice(list(demo.BACKGROUNDS))))
    img = demo._background(size, demo.BACKGROUNDS[bg], rng)
    demo._draw(img, shape, demo.COLOURS[colour], rng)
    img.save(directory / f"{i:05d}.jpg", "JPEG", quality=90)
    (directory / f"{i:05d}.txt").write_text(demo.caption_text(colour, shape, bg) + f", photo {i}, detailed, high quality")


def write_photos(directory: Path, n: int, sizes) -> Path:
    """n JPEGs (coloured shapes on gradients), each with a unique .txt caption, written by a process pool;
    skipped if already written. The instance-prompt variant reads the same photos and ignores the .txt."""
    from concurrent.futures import ProcessPoolExecutor

    if directory.exists() and len(list(directory.glob("*.jpg"))) >= n:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_photo, [(directory, i, sizes[i % len(sizes)]) for i in range(n)], chunksize=16))
    return directory


def base_spec(a, model_dir: str, images: Path, res: int, name: str, caption: str) -> dict:
    flux2 = a.family == "flux2"
    ds = {"id": f"photos{res}", "instance_data_dir": str(images), "resolution": res, "resolution_type": "pixel_area",
          "caption_strategy": caption, "instance_prompt": "a photo of sks shape" if caption == "instanceprompt" else None}
    return {
        "name": name,
        "model": {"model_family": a.family, "model_flavour": a.flavour, "pretrained_model_name_or_path": model_dir,
                  "base_model_default_dtype": "fp32" if a.tiny else "bf16",
                  **({"tokenizer_max_length": 32} if a.tiny else {}),
                  **({"base_compute_dtype": a.base_compute_dtype} if a.base_compute_dtype else {})},
        # FLUX.2 "all": attention of both streams, both MLPs, the single blocks' fused QKV+MLP and output
        "lora": {"lora_rank": 16, "lora_alpha": 16, "flux_lora_target": "all" if flux2 else "all+ffs"},
        "datasets": [{k: v for k, v in ds.items() if v is not None}],
        "cache": {"uri": str(Path(a.work) / "cache"), "vae_batch_size": a.vae_bs, "text_batch_size": a.text_bs,
                  "vae_channels_last": bool(a.channels_last), "compile_encoders": bool(a.compile_encoders),
                  "num_vae_actors": a.vae_actors, "gpus_per_actor": a.gpus_per_actor,
                  "vae_bucket_window": a.bucket_window, "decode_concurrency": a.decode_concurrency,
                  "commit_every": a.commit_every},
        "train": {"max_train_steps": a.steps, "train_batch_size": a.bs, "log_every": a.log_every,
                  "checkpointing_steps": 10**6, "compile": bool(a.compile), "attention_backend": a.attn,
                  "mixed_precision": "no" if a.cpu else "bf16", "gradient_checkpointing": bool(a.ckpt),
                  "resume_from_checkpoint": None, "learning_rate": 1e-4, "optimizer": a.optimizer},
        "eval": {"eval_split_fraction": 0.0},
        "scaling": {"num_workers": 1, "use_gpu": not a.cpu},
        "output": {"uri": str(Path(a.work) / "out")},
    }


def phase_cache(a, model_dir: str) -> list[dict]:
    from flux_ray.data.cache import run_cache
    from flux_ray.spec import load_spec

    rows = []
    for item in a.captions:  # "mode" or "mode:N" (N images instead of --cache-images)
        caption, _, n = item.partition(":")
        n = int(n or a.cache_images)
        images = write_photos(Path(a.work) / f"photos_{n}", n, SIZES)
        spec = load_spec(data=base_spec(a, model_dir, images, a.cache_res, f"cache-{caption}", caption))
        spec.cache.uri = str(Path(a.work) / f"cache_{caption}_{int(time.time())}")  # fresh: encode everything
        t0 = time.perf_counter()
        summary = run_cache(spec)
        wall = time.perf_counter() - t0
        d = summary.datasets[spec.datasets[0].id]
        row = dict(phase="cache", captions=caption, images=d["usable"], res=a.cache_res, wall_s=round(wall, 1),
                   images_per_s=round(d["usable"] / wall, 1), latents_s=d["seconds"],
                   latents_images_per_s=d["images_per_s"], steady_images_per_s=d["steady_images_per_s"],
                   commits=d["commits"], text_s=summary.text_seconds,
                   unique_captions=summary.unique_captions, stages=d.get("stages"), text_stages=summary.text_stages,
                   bytes=summary.bytes_written)
        log(**row)
        rows.append(row)
    return rows


def collector(path: Path):
    """A Ray Train callback appending rank 0's reports to a JSON-lines file (it runs in Train's controller,
    another process on this node)."""
    from ray.train import UserCallback

    class Collect(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0]:
                with open(path, "a") as f:
                    f.write(json.dumps(dict(metrics[0], t=time.time())) + "\n")
    return Collect()


def _lora_dtypes(checkpoint_uri: str | None) -> list[str]:
    """The dtypes of the trained LoRA as checkpointed (adamw_bf16 keeps it in bf16 under DDP and FSDP)."""
    from safetensors.torch import load_file

    path = Path(checkpoint_uri or "") / "lora_peft.safetensors"
    return sorted({str(t.dtype) for t in load_file(str(path)).values()}) if path.exists() else []


def train_photos(a) -> Path:
    """--train-images photos in --train-sizes (64x64 with --tiny), written once per size set."""
    sizes = [(64, 64)] if a.tiny else [tuple(int(v) for v in wh.split("x")) for wh in a.train_sizes]
    return write_photos(Path(a.work) / ("photos_train" + "".join(f"_{w}x{h}" for w, h in sizes)), a.train_images,
                        sizes)


def phase_train(a, model_dir: str) -> list[dict]:
    import ray

    from flux_ray.data.cache import run_cache
    from flux_ray.spec import load_spec
    from flux_ray.train.driver import train

    images = train_photos(a)
    rows = []
    for i, g in enumerate(a.gpus):
        if a.fresh_node_caches:
            fresh_node(a, f"train-{i}")
        data = base_spec(a, model_dir, images, a.train_res, f"scale-{g}-{int(time.time())}", a.train_captions)
        data["train"].update(compile_cache=bool(a.compile_cache), dynamo_mode=a.dynamo_mode)
        data["scaling"].update(num_workers=g, strategy=a.strategy, gradient_sync=a.gradient_sync,
                               **({"resources_per_worker": {"CPU": 1}} if a.cpu else {}))
        spec = load_spec(data=data)  # validated here, as the workers will: a refused combination fails at once
        run_cache(spec)  # cached once, found by key on the next G
        reports = Path(a.work) / f"reports-{spec.name}.jsonl"
        t0, t_wall = time.perf_counter(), time.time()
        outcome = train(spec, extra_callbacks=[collector(reports)])
        wall = time.perf_counter() - t0
        sink = [json.loads(line) for line in reports.read_text().splitlines()] if reports.exists() else []
        prof_dir = Path(a.out).resolve() / "profile"
        profile = []
        for p in sorted(prof_dir.glob("rank*.json")):  # this run's; kept under the run's name
            profile.append(json.loads(p.read_text()))
            p.rename(prof_dir / f"{spec.name}-{p.name}")
        steady = sink[a.warmup_reports:] or sink[-1:]
        sps = statistics.median(m["samples_per_s"] for m in steady)
        step_s = statistics.median(m["step_time_s"] for m in steady)
        row = dict(phase="train", gpus=g, res=a.train_res, bs_per_gpu=a.bs, steps=outcome.steps,
                   train_images=a.train_images, captions=a.train_captions,
                   strategy=a.strategy, optimizer=a.optimizer, dynamo_mode=a.dynamo_mode,
                   gradient_sync="allreduce" if spec.syncs_gradients_by_allreduce else a.strategy,
                   lora_dtypes=_lora_dtypes(outcome.checkpoint_uri),
                   fresh_node=bool(a.fresh_node_caches), compile_cache=bool(a.compile_cache),
                   samples_per_s=round(sps, 2), step_time_s=round(step_s, 4), wall_s=round(wall, 1),
                   first_report_s=round(sink[0]["t"] - t_wall, 1) if sink else None,
                   startup=_startup(sink[0], t_wall) if sink else None,
                   model=f"{a.family}:{a.flavour}", **_memory(sink),
                   final_loss=outcome.final_loss, reports=[round(m["samples_per_s"], 2) for m in sink],
                   profile=profile)
        log(**row)
        rows.append(row)
    base = next((r for r in rows if r["gpus"] == 1), None)
    for r in rows:
        if base:
            r["scaling_efficiency"] = round(r["samples_per_s"] / (r["gpus"] * base["samples_per_s"]), 3)
    ray.shutdown()
    return rows


def fresh_node(a, tag: str, artifacts_of: str | None = None) -> None:
    """A new "node": Ray restarted with empty local inductor/Triton caches; with ``artifacts_of`` (a cache URI)
    also no shared compile artifacts there (a cold start, as the issue defines it)."""
    import ray

    ray.shutdown()
    local = Path(a.work) / f"node-{int(time.time())}-{tag}"
    os.environ.update(TORCHINDUCTOR_CACHE_DIR=str(local / "inductor"), TRITON_CACHE_DIR=str(local / "triton"))
    if artifacts_of:
        shutil.rmtree(Path(artifacts_of) / "compile", ignore_errors=True)
    start_ray(a)


def phase_sweep(a, model_dir: str) -> dict:
    """Trials that start fast (issue #18): how much of a sweep's wall time is start-up after the first wave."""
    from mlflow import MlflowClient

    from flux_ray.data.cache import run_cache
    from flux_ray.spec import load_spec
    from flux_ray.tune.sweep import run_sweep

    images = train_photos(a)
    data = base_spec(a, model_dir, images, a.train_res, f"sweep-{int(time.time())}", a.train_captions)
    data["train"].update(compile_cache=bool(a.compile_cache), dynamo_mode=a.dynamo_mode)
    if importlib.util.find_spec("sqlalchemy") is None:  # the device's mlflow-skinny: no sqlite store, a file one
        data.setdefault("tracking", {})["mlflow_tracking_uri"] = (Path(a.work).resolve() / "mlruns").as_uri()
    if a.cpu:
        data["scaling"]["resources_per_worker"] = {"CPU": 1}
    lrs = [1e-4 * (1 + i) for i in range(a.sweep_trials)]
    data["tune"] = {"param_space": {"train.learning_rate": {"type": "grid", "values": lrs}}, "num_samples": 1,
                    "metric": "train_loss", "scheduler": "fifo", "max_concurrent_trials": a.sweep_concurrency}
    spec = load_spec(data=data)
    run_cache(spec)  # cached before the clock starts (found by key)
    if a.fresh_node_caches:  # every trial of the first wave cold: no local caches, no shared artifacts
        fresh_node(a, "sweep", spec.cache.uri)
    t0, t0_wall = time.perf_counter(), time.time()
    summary = run_sweep(spec)
    wall = time.perf_counter() - t0
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    trials, runs = [], []
    failed = [r["trial"] for r in summary["trials"] if not r.get("mlflow_run_id") or r["status"] != "completed"]
    for r in summary["trials"]:
        if r["trial"] in failed:  # listed, not timed: the sweep is then no measurement of the bound
            continue
        run = client.get_run(r["mlflow_run_id"])
        runs.append(run.info)
        steps = client.get_metric_history(r["mlflow_run_id"], "step_time_s")
        step_s = statistics.median(m.value for m in steps[1:] or steps) if steps else 0.0  # the first holds compile
        m = run.data.metrics
        startup = m.get("startup_build_s", 0.0) + m.get("startup_first_step_s", 0.0) - step_s
        entry = run.info.start_time / 1000
        reports = sorted(h.timestamp / 1000 for h in client.get_metric_history(r["mlflow_run_id"], "train_loss"))
        trials.append(dict(trial=r["trial"], status=r["status"], steps=r["steps"],
                           reused_base=int(m.get("startup_reused_base", 0)), startup_s=round(startup, 1),
                           load_s=round(m.get("startup_load_s", 0.0), 1),
                           first_step_s=round(m.get("startup_first_step_s", 0.0), 1),
                           next_steps_s=[round(m[k], 2) for k in sorted(m) if k.startswith("startup_step_")],
                           publish_s=round(m.get("startup_compile_publish_s", 0.0), 1),
                           graphs_compiled=m.get("startup_graphs_compiled"), step_time_s=round(step_s, 4),
                           steps_s=round(step_s * (r["steps"] or 0), 1),
                           entry_after_s=round(entry - t0_wall, 1),  # the sweep's start -> this trial's function
                           first_report_after_s=round(reports[0] - entry, 1) if reports else None,
                           last_report_after_s=round(reports[-1] - entry, 1) if reports else None,
                           span_s=round((run.info.end_time - run.info.start_time) / 1000, 1)))
    cold = max((t["startup_s"] for t in trials), default=0.0)  # the first wave's start-up, from the function's entry
    span = (max(r.end_time for r in runs) - min(r.start_time for r in runs)) / 1000 if runs else 0.0  # Tune's part
    steps_part = 1.3 * sum(t["steps_s"] for t in trials) / a.sweep_concurrency
    row = dict(phase="sweep", trials=len(trials), failed=failed, steps=a.steps, concurrency=a.sweep_concurrency,
               fresh_node=bool(a.fresh_node_caches), compile_cache=bool(a.compile_cache),
               wall_s=round(wall, 1), trials_span_s=round(span, 1),
               first_entry_after_s=round(min((t["entry_after_s"] for t in trials), default=0.0), 1),
               bound_from_entry_s=round(steps_part + cold, 1),
               within_bound_from_entry=None if failed else wall <= steps_part + cold,
               cold_start_from_entry_s=cold, reused=sum(t["reused_base"] for t in trials), per_trial=trials)
    if a.sweep_lone:  # the cold start: train() -> first optimizer step of one trial's spec, run alone
        lone = lone_cold_start(a, data)
        row.update(lone_cold_start_s=lone, bound_s=round(steps_part + lone, 1),
                   within_bound=None if failed else wall <= steps_part + lone)
    log(**row)
    return row


def lone_cold_start(a, data: dict) -> float:
    """train() -> first optimizer step of the sweep's first trial run alone (1 GPU, its learning rate), on a fresh
    node when the sweep had one (no local compile caches, no shared artifacts): the issue's "cold start"."""
    from flux_ray.spec import load_spec
    from flux_ray.train.driver import train

    data = {k: v for k, v in copy.deepcopy(data).items() if k != "tune"}
    data["name"] = f"lone-{int(time.time())}"
    spec = load_spec(data=data)
    if a.fresh_node_caches:
        fresh_node(a, "lone", spec.cache.uri)
    reports = Path(a.work) / f"reports-{spec.name}.jsonl"
    t_wall = time.time()
    train(spec, extra_callbacks=[collector(reports)])
    first = json.loads(reports.read_text().splitlines()[0])
    st = _startup(first, t_wall)
    log(phase="sweep-lone", **st)
    return st["to_first_step"]


def _memory(sink: list[dict]) -> dict:
    """Per-GPU peaks (GiB) over the reports: rank 0's and the max over ranks, the steps' and the process's."""
    def peak(key):
        vals = [m[key] for m in sink if key in m]
        return round(max(vals), 2) if vals else None
    return {"peak_gib": peak("peak_gpu_mem_gib"), "peak_gib_max_rank": peak("peak_gpu_mem_gib_max"),
            "step_peak_gib": peak("step_peak_gpu_mem_gib"), "step_peak_gib_max_rank": peak("step_peak_gpu_mem_gib_max")}


def _startup(first: dict, t_wall: float) -> dict:
    """Where the time to the first report went, as seconds after ``train()`` on the driver: the worker's process
    began (negative: Ray had it ready before), Ray imported the worker module, the train function was entered
    (Train's controller, worker group and process group before it); then the worker's own spans: imports, the
    base load and prepare, the rest of the build (wrap, compile setup, optimizer, reader), the first step and its
    compile (``compile_*``, train/startup.py: dynamo tracing, backend, backward, CUDA graph recording, cache hits
    and misses)."""
    out = {}
    for key, name in (("worker_process_started_at", "to_process"), ("worker_module_imported_at", "to_module"),
                      ("worker_started_at", "to_worker"), ("first_step_done_at", "to_first_step")):
        if key in first:
            out[name] = round(first[key] - t_wall, 2)
    out.update({k.removeprefix("startup_"): round(first[k], 2) for k in first if k.startswith("startup_")})
    return out


def startup_line(r: dict) -> str:
    """One run's start-up: train() to the first optimizer step and its parts, then the first step's compile."""
    st = r.get("startup") or {}
    g = lambda k: st.get(k, "?")  # noqa: E731
    compile_ = {k.removeprefix("compile_"): v for k, v in st.items() if k.startswith("compile_")}
    return (f"start-up {r['gpus']} GPUs, fresh node {r['fresh_node']}, {r['dynamo_mode']}: train() -> first step "
            f"**{g('to_first_step')} s** (process {g('to_process')}, module {g('to_module')}, entry "
            f"{g('to_worker')}; imports {g('imports_s')}, load {g('load_s')}, build {g('build_s')}, "
            f"first step {g('first_step_s')}); first report {r['first_report_s']} s; compile {compile_}")


def write_flux2(a, work: Path) -> Path:
    """The tiny FLUX.2 of --flavour (--tiny), else the full-size random one (reduced text encoder if asked)."""
    if a.tiny:
        from flux_ray.core.flux2.tiny import ensure_tiny_flux2

        return ensure_tiny_flux2(work / f"tiny-flux2-{a.flavour}", a.flavour)
    from flux_ray.core.flux2.full_size import reduced_text_encoder_config, write_random_flux2

    small = {"text_encoder": reduced_text_encoder_config(a.flavour)} if a.small_text_encoder else None
    return write_random_flux2(work / f"random-flux2-{a.flavour}{'-small-te' if small else ''}", a.flavour,
                              device="cuda", configs=small)


def start_ray(a) -> None:
    import ray

    ray.init(address="local", num_cpus=a.num_cpus or max(8, os.cpu_count() or 1), include_dashboard=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=".bench_work")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default: $OUT, else --work)")
    ap.add_argument("--phases", nargs="+", default=["cache", "train"])
    ap.add_argument("--tiny", action="store_true", help="the tiny model instead of full-size random weights")
    ap.add_argument("--family", default="flux", choices=["flux", "flux2"], help="flux: FLUX.1-dev; flux2: FLUX.2")
    ap.add_argument("--flavour", default=None, choices=["dev", "klein-4b", "klein-9b"],
                    help="model.model_flavour (flux: dev only; flux2: default dev)")
    ap.add_argument("--small-text-encoder", type=int, default=0,
                    help="flux2: 1 writes a reduced text encoder (real width and stacked layers; its speed is not measured)")
    ap.add_argument("--cpu", action="store_true", help="CPU workers (smoke test)")
    ap.add_argument("--cache-images", type=int, default=1024)
    ap.add_argument("--cache-res", type=int, default=1024)
    ap.add_argument("--captions", nargs="+", default=["instanceprompt", "textfile"],
                    help="caption strategies, each optionally :N images (e.g. instanceprompt:8192 textfile:2048)")
    ap.add_argument("--vae-bs", type=int, default=8)
    ap.add_argument("--text-bs", type=int, default=32)
    ap.add_argument("--channels-last", type=int, default=0)
    ap.add_argument("--compile-encoders", type=int, default=0)
    ap.add_argument("--vae-actors", type=int, default=1)
    ap.add_argument("--gpus-per-actor", type=float, default=0.5)
    ap.add_argument("--bucket-window", type=int, default=4)
    ap.add_argument("--decode-concurrency", type=int, default=None)
    ap.add_argument("--commit-every", type=int, default=512)
    ap.add_argument("--train-images", type=int, default=128)
    ap.add_argument("--train-res", type=int, default=512)
    ap.add_argument("--train-sizes", nargs="+", default=["512x512", "640x384"],
                    help="WxH of the training photos (one size: one aspect bucket, no second compile)")
    ap.add_argument("--train-captions", default="textfile", choices=["textfile", "instanceprompt"],
                    help="textfile: a unique caption per image; instanceprompt: one shared caption (no text encoding)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sweep-trials", type=int, default=4, help="sweep phase: trials (one worker each)")
    ap.add_argument("--sweep-lone", type=int, default=1,
                    help="sweep phase: 1 also runs one trial's spec alone with train() for the issue's cold start")
    ap.add_argument("--sweep-concurrency", type=int, default=2, help="sweep phase: trials at once")
    ap.add_argument("--bs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--warmup-reports", type=int, default=2)
    ap.add_argument("--profile-steps", default=None, help="START,COUNT: flux_ray.train.profile on every rank")
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--base-compute-dtype", default=None,
                    help="model.base_compute_dtype (fp8: the frozen base's GEMMs)")
    ap.add_argument("--ckpt", type=int, default=0)
    ap.add_argument("--attn", default="cudnn")
    ap.add_argument("--dynamo-mode", default="default", help="train.dynamo_mode (reduce-overhead: CUDA graphs)")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "deepspeed"])
    ap.add_argument("--gradient-sync", default="auto", choices=["auto", "ddp", "allreduce"],
                    help="scaling.gradient_sync (auto: one flat all-reduce, no DDP, for several GPUs under CUDA "
                         "graphs)")
    ap.add_argument("--fast-graph-recording", default=None, choices=["0", "1", "check"],
                    help="FLUX_RAY_FAST_GRAPH_RECORDING in the workers (core/cudagraph_lookup.py; default: the "
                         "trainer's, 1; 0: torch's lookups; check: torch's answers, each compared with ours)")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--fresh-node-caches", type=int, default=0,
                    help="1: restart Ray before each --gpus run with empty local inductor/Triton caches (a fresh node)")
    ap.add_argument("--compile-cache", type=int, default=1, help="train.compile_cache (artifacts via the cache URI)")
    a = ap.parse_args()
    import logging

    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("flux_ray").setLevel(logging.INFO)  # the cache's commit lines: progress even if cut short
    if a.cpu:
        a.attn = "auto"
    a.flavour = a.flavour or "dev"
    if a.family == "flux" and a.flavour != "dev":
        ap.error("--family flux writes FLUX.1-dev only: --flavour dev")

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    a.work = str(work)
    a.out = a.out or a.work
    t0 = time.perf_counter()
    if a.family == "flux2":
        model_dir = str(write_flux2(a, work))
    elif a.tiny:
        from flux_ray.core.tiny import ensure_tiny_flux

        model_dir = str(ensure_tiny_flux(work / "tiny-flux"))
    else:
        from flux_ray.core.full_size import write_random_flux

        model_dir = str(write_random_flux(work / "random-flux-dev", device="cuda"))
    log(phase="model", path=model_dir, seconds=round(time.perf_counter() - t0, 1))
    # job.init_ray's worker setup hook is a runtime_env, which needs ray[default]'s agent; the device
    # carries Ray without it, so start the local Ray the same way minus that hook (only Tune needs it).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if a.fast_graph_recording:  # before ray.init: the local cluster's workers inherit it (core/compile.py)
        from flux_ray.core.compile import FAST_RECORDING_ENV

        os.environ[FAST_RECORDING_ENV] = a.fast_graph_recording
    if a.profile_steps:  # set before ray.init: Ray's workers inherit the environment the local cluster starts with
        os.environ.update(FLUX_RAY_PROFILE_STEPS=a.profile_steps,
                          FLUX_RAY_PROFILE_DIR=str(Path(a.out).resolve() / "profile"))
    start_ray(a)
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = {"card": card, "gpus_visible": torch.cuda.device_count(), "args": vars(a)}
    if "cache" in a.phases:
        results["cache"] = phase_cache(a, model_dir)
    if "train" in a.phases:
        results["train"] = phase_train(a, model_dir)
    if "sweep" in a.phases:
        results["sweep"] = phase_sweep(a, model_dir)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ray_gpu_bench.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n{card}, {a.family} {a.flavour}{' (reduced text encoder)' if a.small_text_encoder else ''}\n")
    for r in results.get("cache", []):
        print(f"cache {r['captions']}: {r['images']} images at {r['res']} px, {r['wall_s']} s, "
              f"**{r['images_per_s']} images/s** end to end (latents {r['latents_images_per_s']}/s, "
              f"steady {r['steady_images_per_s']}/s between first and last commit {r['commits'][:1]}..{r['commits'][-1:]}, "
              f"text {r['text_s']} s for {r['unique_captions']} captions)")
        for name, s in (r["stages"] or {}).items():
            print(f"  | {name} | {s['rows']} | {s['seconds']} s | {s['rows_per_s']} rows/s | busy {s['busy_seconds']} s |")
    if results.get("train"):
        print("\n| GPUs | strategy | res | bs/GPU | fresh node | compile cache | samples/s | s/step | scaling efficiency "
              "| steps' peak GiB/GPU (rank 0 / max) | process peak GiB/GPU (rank 0 / max) | first report s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results["train"]:
            strategy = r["strategy"] + (" (flat all-reduce)" if r["gradient_sync"] == "allreduce" else "")
            print(f"| {r['gpus']} | {strategy} | {r['res']} | {r['bs_per_gpu']} | {r['fresh_node']} | "
                  f"{r['compile_cache']} | {r['samples_per_s']} | {r['step_time_s']} | {r.get('scaling_efficiency')} | "
                  f"{r['step_peak_gib']} / {r['step_peak_gib_max_rank']} | {r['peak_gib']} / {r['peak_gib_max_rank']} "
                  f"| {r['first_report_s']} |")
        for r in results["train"]:
            print(startup_line(r))
        for r in results["train"]:
            for p in r.get("profile") or []:
                print(f"profile {r['gpus']} GPUs rank {p['rank']} steps {p['steps']}: wall {p['wall_s_per_step']} s/step, "
                      f"host batch {p['host_batch_ms_per_step']} ms, kernels ms/step {p['kernel_ms_per_step']}")

    if results.get("sweep"):
        r = results["sweep"]
        lone = (f"bound 1.3 x steps / concurrency + one cold start (train() -> first step, run alone) = "
                f"{r['bound_s']} s "
                f"(within: {r['within_bound']}); " if "bound_s" in r else "")
        if r["failed"]:
            print(f"\nsweep: trials {r['failed']} did not complete (see the log): the bound is not measured")
        print(f"\nsweep: {r['trials']} trials x {r['steps']} steps, {r['concurrency']} at once, fresh node "
              f"{r['fresh_node']}, compile cache {r['compile_cache']}: wall **{r['wall_s']} s** (first trial entered "
              f"after {r['first_entry_after_s']} s; first entry to last end {r['trials_span_s']} s); {lone}"
              f"counting the cold start from the trial function's entry: {r['bound_from_entry_s']} s (within: "
              f"{r['within_bound_from_entry']}); {r['reused']} trials reused a live model")
        print("| trial | status | reused base | entered after s | start-up s | load s | first step s | next steps s "
              "| publish s | graphs compiled | s/step | steps' s | first / last report after s | span s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for t in r["per_trial"]:
            print(f"| {t['trial']} | {t['status']} | {t['reused_base']} | {t['entry_after_s']} | {t['startup_s']} | "
                  f"{t['load_s']} | {t['first_step_s']} | {t['next_steps_s']} | {t['publish_s']} | "
                  f"{t['graphs_compiled']} | {t['step_time_s']} | {t['steps_s']} | {t['first_report_after_s']} / "
                  f"{t['last_report_after_s']} | {t['span_s']} |")


if __name__ == "__main__":
    main()
