"""Times flux_ray's own LoRA training step on a full-size FLUX.1-dev or FLUX.2 transformer, against the stock recipe.

The model is built from its config with random bf16 weights directly on the GPU (step time does not
depend on weight values; nothing is downloaded). The step is the trainer's: the variant becomes a
``JobSpec``, the base is prepared by ``train/build.py``'s ``prepare_base`` (quantize or offload, LoRA,
FP8, checkpointing) and its loss by ``build_loss_fn``; ``compile_blocks``, ``build_optimizer``,
``build_lr_scheduler`` and ``TorchStepper`` are the trainer's too, and each step is ``train/loop.py``'s
``train_step`` on a host batch shaped like ``CacheReader.batch``'s (fp32 latents, T5 and CLIP embeddings;
FLUX.2: the normalised patchified latents (128, H/16, W/16), the stacked text-encoder layers (512 tokens of the
flavour's joint_attention_dim, diffusers' FLUX.2 klein script's max_sequence_length) and the int8 text mask).
Models, configs and the FLOPs count behind MFU: step_bench_models.py.

Two commands:
  run SPEC          one variant in this process; prints one JSON line (start each variant in its own
                    process: a CUDA error or an OOM poisons the rest, and dynamo state carries over)
  suite [opts] JOB  each JOB ``ours:SPEC`` or ``stock:SPEC`` in its own process, in order, inside a
                    time budget; prints the JSON lines as they come and a table last, with ours / stock.

SPEC (comma separated, defaults in DEFAULTS): family (flux: FLUX.1-dev | flux2), flavour (flux2: klein-4b |
klein-9b | dev), res, bs, targets (a preset of the family; flux2 defaults to diffusers, the stock klein script's
targets), rank, ckpt (0 none, n: every n-th of the blocks (FLUX.1-dev 57; klein-4b 25, klein-9b 32),
auto: the least that fits, from an earlier no-checkpointing job's memory; the stock script's ckpt is 0/1), compile (0/1: regional, each block), attn (flash|efficient|cudnn|math), quant
(none|int8|int4|int2|nf4|fp8|int8t: int8-torchao), lora_dtype (fp32|bf16: the adamw_bf16 optimizer), opt (adamw: the
project's fused AdamW | foreach), uncast (1: FluxLossFn skips PEFT's round-trip input cast), model
(dev: the family's (flavour's) full-size transformer | tiny), device (cuda|cpu), steps, warmup, txt, profile (1: GPU kernel time per step by kind, from
torch.profiler over 2 steps, against the unprofiled step time), tread (0 off; r: TREAD, one route of
selection_ratio r over blocks 2..-2, SimpleTuner's Flux example; the tiny model's two blocks: 0..-1; MFU
still counts the unrouted model's FLOPs, so it reads as an effective rate), offload (none | block<n>: the
frozen base group-offloaded to the CPU, n blocks a group | leaf: each layer; an s suffix prefetches on a
CUDA stream, e.g. block1s; core/offload.py as train/build.py applies it; pair with ckpt=1), fp8 (1: the frozen
base's block Linears in FP8, model.base_compute_dtype fp8, core/fp8.py as train/build.py applies it; emulated on
a CPU), fp8_gacc (fast: fast accumulation in FP8's input-gradient GEMM as well, the trainer's default | full),
fp8_fuse (1: Linears that share an input as one FP8 GEMM, core/fp8_fused.py, the trainer's default | 0: one GEMM
per Linear), cdt (1: inductor's
coordinate-descent tuning of its Triton kernels), pyprof (1: each warm-up step after the first timed with a sync and
run under cProfile; prints the functions with the most cumulative time: what a cold process's second and third
steps spend, e.g. CUDA graph recording), cgfast (1: core/cudagraph_lookup.py's lookups while CUDA graphs record,
the trainer's default | 0: torch's own, FLUX_RAY_FAST_GRAPH_RECORDING=0). Every run lists its per-step losses in order (``losses``; the same seeds, batches and step generators in
every process), and the suite compares each fp8=1 job's curve with its fp8=0 twin's.

FLUX.2 (family=flux2,flavour=klein-4b|klein-9b|dev) takes the same knobs as its trainer. Its stock
jobs run stock_flux2_klein_step.py (next to this file, or --stock-flux2 PATH); FLUX.1's run --stock PATH.

usage: python bench/train_step_bench.py suite --stock bench/_stock/stock_flux_lora_step.py --budget-s 540 \\
           ours:res=512,bs=1,ckpt=0,compile=1 stock:res=512,bs=1,ckpt=1
       python bench/train_step_bench.py suite --budget-s 540 ours:family=flux2,flavour=klein-4b,res=1024,ckpt=1 \\
           stock:family=flux2,flavour=klein-4b,res=1024,ckpt=1
       python bench/train_step_bench.py run res=64,bs=1,model=tiny,device=cpu,steps=2   # CPU smoke test
       python bench/train_step_bench.py run res=64,bs=1,model=tiny,device=cpu,steps=2,ckpt=1,offload=block1
       python bench/train_step_bench.py run res=64,bs=1,model=tiny,device=cpu,steps=2,fp8=1
       python bench/train_step_bench.py run family=flux2,flavour=klein-4b,model=tiny,device=cpu,res=64,steps=2
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings

from step_bench_models import (FAMILIES, FLUX2_FLAVOURS, PEAK_FLOPS, latent_hw, model_flops, num_blocks,
                               scheduler_config, timed_steps, transformer_config)

DEFAULTS = dict(family="flux", flavour="", res=512, bs=1, targets="all+ffs", rank=16, ckpt="0", compile=0, attn="flash", quant="none",
                lora_dtype="fp32", opt="adamw", uncast=1, model="dev", device="cuda", steps=10, warmup=3, txt=512,
                profile=0, tread="0", offload="none", fp8=0, dynamo_mode="default", fp8_gacc="fast", cdt=0, fp8_fuse=1,
                pyprof=0, cgfast=1)
STRINGS = ("family", "flavour", "targets", "ckpt", "attn", "quant", "lora_dtype", "opt", "model", "device", "tread", "offload",
           "dynamo_mode", "fp8_gacc")
TREAD_BLOCKS = {"dev": (2, -2), "tiny": (0, -1)}
QUANT = {"none": "no_change", "int8": "int8-quanto", "int4": "int4-quanto", "int2": "int2-quanto",
         "nf4": "nf4-bnb", "fp8": "fp8-torchao", "int8t": "int8-torchao"}
FLUX2_DEFAULT_TARGETS = "diffusers"  # train_dreambooth_lora_flux2_klein.py's default LoRA targets


def parse(spec: str) -> dict:
    v, given = dict(DEFAULTS), set()
    for kv in filter(None, spec.split(",")):
        k, x = kv.split("=")
        if k not in DEFAULTS:
            raise ValueError(f"unknown key {k!r} in {spec!r}; keys: {sorted(DEFAULTS)}")
        v[k] = x if k in STRINGS else int(x)
        given.add(k)
    if v["family"] not in FAMILIES:
        raise ValueError(f"family={v['family']!r} in {spec!r}: expected one of {FAMILIES}")
    if v["family"] == "flux2":
        if v["flavour"] not in FLUX2_FLAVOURS:
            raise ValueError(f"family=flux2 needs flavour= one of {FLUX2_FLAVOURS} (got {v['flavour']!r} in {spec!r})")
        if "targets" not in given:
            v["targets"] = FLUX2_DEFAULT_TARGETS
    elif v["flavour"]:
        raise ValueError(f"flavour={v['flavour']!r} in {spec!r}: FLUX.1's bench model is dev; flavours are family=flux2's")
    return v


def config_of(v: dict) -> dict:
    return transformer_config(v["family"], v["flavour"], v["model"])


def same_model(a: dict, b: dict) -> bool:
    """Same family and flavour (rows of older runs have neither: FLUX.1)."""
    return (a.get("family", "flux"), a.get("flavour", "")) == (b.get("family", "flux"), b.get("flavour", ""))


def offload_options(value: str) -> dict:
    """``offload`` -> ModelSpec keys: none | block<n> (n blocks a group) | leaf, ``s`` suffix: CUDA stream."""
    if value == "none":
        return {}
    kind, stream = value.removesuffix("s"), value.endswith("s")
    if kind == "leaf":
        opts = dict(group_offload_type="leaf_level")
    elif kind.startswith("block") and kind[5:].isdigit():
        opts = dict(group_offload_type="block_level", group_offload_blocks_per_group=int(kind[5:]))
    else:
        raise ValueError(f"offload={value!r}: expected none, block<n>, leaf, with an optional s (stream)")
    return dict(opts, enable_group_offload=True, group_offload_use_stream=stream)


def checkpointed_blocks(interval: int, blocks: int) -> int:
    return 0 if interval <= 0 else math.ceil(blocks / interval)


# ---------------------------------------------------------------- one variant (run) -------------------------

def bench_spec(v: dict):
    """The variant as a JobSpec: the trainer's own builders read it (no dataset is opened)."""
    from flux_ray.spec import JobSpec

    start, end = TREAD_BLOCKS[v["model"]]
    tread = ({"routes": [{"selection_ratio": float(v["tread"]), "start_layer_idx": start, "end_layer_idx": end}]}
             if float(v["tread"]) else None)
    family = dict(model_family="flux2", model_flavour=v["flavour"]) if v["family"] == "flux2" else {}
    spec = JobSpec.model_validate({
        "datasets": [{"id": "bench", "instance_data_dir": "/nonexistent"}],
        "model": dict(**family, base_model_precision=QUANT[v["quant"]], base_compute_dtype="fp8" if v["fp8"] else "bf16",
                      **offload_options(v["offload"])),
        "lora": dict(lora_rank=v["rank"], flux_lora_target=v["targets"]),
        "scaling": {"use_gpu": True},  # the spec checks FP8 against GPUs; on a CPU the bench emulates FP8
        "train": dict(optimizer="adamw_bf16" if v["lora_dtype"] == "bf16" else "adamw",
                      gradient_checkpointing=int(v["ckpt"]) > 0, gradient_checkpointing_interval=max(1, int(v["ckpt"])),
                      compile=bool(v["compile"]), tread_config=tread)})
    # The spec refuses eager cuDNN attention (it crashed H200 steps) and CUDA graphs where unmeasured; the
    # bench may still time them.
    spec.train = spec.train.model_copy(update={"attention_backend": v["attn"], "dynamo_mode": v["dynamo_mode"]})
    return spec


def build(v: dict):
    """The trainer's parts on a random full-size (or tiny) transformer, built by train/build.py's functions:
    (model, params, opt, sched, StepParts, train_spec)."""
    import torch

    from flux_ray.core.model import build_transformer_from_config
    from flux_ray.core.tread import TokenRouter
    from flux_ray.train.build import build_loss_fn, compile_model, prepare_base
    from flux_ray.train.loop import StepParts
    from flux_ray.train.optim import build_lr_scheduler, build_optimizer, cast_trainable_params
    from flux_ray.train.stepper import TorchStepper

    device = torch.device(v["device"])
    config = config_of(v)
    spec = bench_spec(v)
    if v["fp8"] and (spec.model.enable_group_offload or spec.model.base_model_precision != "no_change"):
        raise ValueError("fp8=1 needs quant=none and offload=none (as the spec requires)")
    if v["fp8"]:  # experiments' knobs: full accumulation in the gradient GEMM (torchao's default); one GEMM per
        import flux_ray.core.fp8 as fp8_module  # Linear, to measure what fusing shared-input Linears pays

        fp8_module.GRAD_FAST_ACCUM = v["fp8_gacc"] != "full"
        fp8_module.FUSE_PROJECTIONS = bool(v["fp8_fuse"])
    # faster lookups while recording CUDA graphs (core/compile.py reads it; the trainer's default) or torch's
    from flux_ray.core.compile import FAST_RECORDING_ENV

    os.environ[FAST_RECORDING_ENV] = "1" if v["cgfast"] else "0"
    if v["cdt"]:  # an experiment's knob: inductor tunes each Triton kernel's block sizes (longer compile)
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    if v["family"] == "flux2":
        from flux_ray.core.flux2.full_size import build_component

        torch.manual_seed(0)
        transformer = build_component(v["flavour"], "transformer", device, torch.bfloat16, config)
    else:
        transformer = build_transformer_from_config(config, device, torch.bfloat16)
    transformer, _, _ = prepare_base(transformer, spec, device, emulate_fp8=device.type == "cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    router = TokenRouter.from_spec(transformer, spec.train.tread_config)  # as build_loop_parts: before compile
    train_spec = spec.train
    params = [p for p in transformer.parameters() if p.requires_grad]
    if v["opt"] == "foreach" and v["lora_dtype"] == "bf16":
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    elif v["opt"] != "foreach":
        cast_trainable_params(train_spec, params)
    if v["compile"]:  # as build_loop_parts: after the cast, before the optimizer
        compile_model(transformer, spec)
    if v["opt"] == "foreach":  # lever: torch's default multi-tensor AdamW instead of the project's fused one
        opt = torch.optim.AdamW(params, lr=train_spec.learning_rate, betas=(0.9, 0.999),
                                weight_decay=train_spec.adam_weight_decay, foreach=True)
    else:
        opt = build_optimizer(train_spec, params, device)
    sched = build_lr_scheduler(train_spec, opt)
    loss_fn = build_loss_fn(spec, transformer, scheduler_config(v["family"]), router, uncast_lora=bool(v["uncast"]))
    parts = StepParts(loss_fn=loss_fn, stepper=TorchStepper(transformer, params, opt, sched, train_spec.max_grad_norm),
                      device=device)
    return transformer, params, opt, sched, parts, train_spec


def host_batches(v: dict, n: int, config: dict):
    """CPU batches shaped and typed like CacheReader.batch's (fp32, text mask int8). FLUX.1: latents (16, H/8,
    W/8), T5 and CLIP pooled embeddings; FLUX.2: normalised patchified latents (in_channels: 4 x the VAE's 32,
    H/16, W/16), prompt embeddings of joint_attention_dim, no pooled embedding."""
    import torch

    from flux_ray.core.step import FluxBatch

    g = torch.Generator().manual_seed(1)
    lat, bs, flux2 = latent_hw(v["family"], v["res"]), v["bs"], v["family"] == "flux2"
    channels = config["in_channels"] if flux2 else 16
    out = []
    for _ in range(n):
        out.append(FluxBatch(torch.randn(bs, channels, lat, lat, generator=g),
                             torch.randn(bs, v["txt"], config["joint_attention_dim"], generator=g),
                             None if flux2 else torch.randn(bs, config["pooled_projection_dim"], generator=g),
                             torch.ones(bs, v["txt"], dtype=torch.int8)))
    return out


def run_variant(v: dict) -> dict:
    import torch

    from flux_ray.train.checkpoint import Position
    from flux_ray.train.loop import step_generator, train_step

    cuda = v["device"] == "cuda"
    t0 = time.time()
    transformer, params, opt, sched, parts, train_spec = build(v)
    loss_fn = parts.loss_fn
    build_s = time.time() - t0
    config = config_of(v)
    batches = host_batches(v, 4, config)
    device = torch.device(v["device"])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    position, losses = Position(), []

    # Already on the device, as the trainer's BatchStream (data/prefetch.py) hands them to the training thread: its
    # background thread pins and copies each batch on a side stream. Copying here, on the step's thread, put the
    # pinning of the 8 MB text embeddings between the GPU's steps (2-3 ms idle gaps, call 34's profile).
    staged = [b.to(device) for b in batches]
    if cuda:
        torch.cuda.synchronize()

    def next_batch():  # the same batches and step generators in every process
        while True:
            yield staged[position.step % len(staged)], step_generator(train_spec.seed, position.step, 0, 0)

    feed = next_batch()

    def step():  # train/loop.py's train_step, gradient_accumulation_steps=1
        losses.append(train_step(parts, feed, position))  # read at the end: no sync per step
        return losses[-1]

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    step()
    sync()
    first_s = time.time() - t0  # includes compilation when compile=1
    warm_steps = []
    for _ in range(v["warmup"] - 1):
        t1 = time.time()
        if v["pyprof"]:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(lambda: (step(), sync()))
            print(f"--- warm-up step {len(warm_steps) + 2}: {time.time() - t1:.2f} s", flush=True)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        else:
            step()
            sync()
        warm_steps.append(round(time.time() - t1, 2))
    warm_s = time.time() - t0
    static_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    first_peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None  # includes compilation
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = timed_steps(step, v["steps"], cuda)
    times.sort()
    med = times[len(times) // 2]
    # Back-to-back steps with one sync at the end, as the trainer runs them (it syncs only to log).
    t = time.perf_counter()
    for _ in range(v["steps"]):
        loss = step()
    sync()
    pipelined = (time.perf_counter() - t) / v["steps"]
    host_syncs = None
    if cuda:  # count host syncs in one step
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        torch.cuda.set_sync_debug_mode(0)
        host_syncs = sum("synchroniz" in str(w.message) for w in caught)
        sync()
    gpu_ms = kernel_time_by_kind(step, sync) if cuda and v["profile"] else None
    rope_ms = None
    if cuda and v["model"] == "dev":  # cost of diffusers rebuilding the rotary table every forward
        hw = latent_hw(v["family"], v["res"])
        ids = torch.cat(loss_fn._position_ids(hw, hw, v["txt"], device)[::-1])
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            transformer.pos_embed(ids)
        b.record()
        sync()
        rope_ms = a.elapsed_time(b) / 20
    lat = v["res"] // 16
    flops = model_flops(v["family"], config, lat * lat, v["txt"], v["bs"])
    return dict(v, who="ours", s_per_step=round(med, 4), min=round(times[0], 4), max=round(times[-1], 4),
                s_per_step_pipelined=round(pipelined, 4), samples_per_s=round(v["bs"] / med, 3),
                mfu_vs_800T=round(flops / med / PEAK_FLOPS, 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                static_gib=round(static_gib, 2), first_peak_gib=first_peak_gib and round(first_peak_gib, 2),
                total_gib=round(torch.cuda.mem_get_info()[1] / 2**30, 1) if cuda else None,
                build_s=round(build_s, 1), first_step_s=round(first_s, 1), warmup_s=round(warm_s, 1),
                warm_steps_s=warm_steps,
                host_syncs_per_step=host_syncs, gpu_ms_per_step=gpu_ms, rope_ms=None if rope_ms is None else round(rope_ms, 3),
                ckpt_blocks=checkpointed_blocks(int(v["ckpt"]), num_blocks(config)), trainable_m=round(sum(p.numel() for p in params) / 1e6, 2),
                loss=round(float(loss), 4), losses=[round(float(x), 5) for x in losses], gpu=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__)


def kernel_time_by_kind(step, sync, n: int = 2) -> dict:
    """GPU kernel milliseconds per step, summed by kind (attention, gemm, triton, optimizer, other), plus where
    the GPU sat idle: the busy span's gaps between kernels (``idle_ms``, the largest with their neighbours) and
    the kernels that took the most time (``top_kernels``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from flux_ray.train.profile import kernel_kind

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        sync()
    out: dict[str, float] = {}
    top_attention = (0, "")
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or 0
        if us <= 0:
            continue
        name = e.key.lower()
        kind = kernel_kind(name)
        if kind == "gemm" and ("e4m3" in name or "f8" in name):  # the FP8 GEMMs apart from the bf16 ones
            kind = "gemm_fp8"
        out[kind] = out.get(kind, 0.0) + us / 1000 / n
        if kind == "attention" and us > top_attention[0]:
            top_attention = (us, e.key[:60])
    out["total"] = sum(out.values())
    res = {k: round(x, 1) for k, x in out.items()}
    res["top_attention_kernel"] = top_attention[1]
    res.update(gpu_gaps([e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start], n))
    return res


def gpu_gaps(kernels: list, n: int, top: int = 8) -> dict:
    """Idle time between consecutive kernels (per step), its largest gaps, and the costliest kernels by name."""
    kernels = sorted(kernels, key=lambda e: e.time_range.start)
    gaps, end, prev = [], None, None
    for e in kernels:
        if end is not None and e.time_range.start > end:
            gaps.append((e.time_range.start - end, prev.name[:50], e.name[:50]))
        if end is None or e.time_range.end > end:
            end, prev = e.time_range.end, e
    by_name: dict[str, list] = {}
    for e in kernels:
        t = by_name.setdefault(e.name[:70], [0.0, 0])
        t[0], t[1] = t[0] + e.time_range.elapsed_us(), t[1] + 1
    gaps.sort(reverse=True)
    return {"kernels_per_step": len(kernels) // n, "idle_ms": round(sum(g[0] for g in gaps) / 1000 / n, 1),
            "idle_ms_in_gaps_over_100us": round(sum(g[0] for g in gaps if g[0] > 100) / 1000 / n, 1),
            "top_gaps_us": [[round(g[0]), g[1], g[2]] for g in gaps[:top]],
            "top_kernels": [[k, round(t / 1000 / n, 2), c // n] for k, (t, c) in
                            sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top * 2]]}


def cmd_run(spec: str) -> None:
    v = parse(spec)
    try:
        print(json.dumps(run_variant(v)), flush=True)
    except Exception as e:  # noqa: BLE001 -- one JSON line per variant, whatever happened
        oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
        print(json.dumps(dict(v, who="ours", error="OOM" if oom else f"{type(e).__name__}: {str(e)[:300]}")),
              flush=True)
        raise SystemExit(3 if oom else 2)


# ---------------------------------------------------------------- suite --------------------------------------

def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"res"' in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def auto_interval(v: dict, done: list[dict]) -> int | None:
    """Least checkpointing that fits: activations per token from an earlier no-ckpt job (same compile)."""
    ref = next((r for r in done if r.get("who") == "ours" and "error" not in r and str(r["ckpt"]) == "0"
                and same_model(r, v) and r["compile"] == v["compile"] and r["quant"] == v["quant"] == "none"
                and r.get("peak_gib") is not None), None)
    if ref is None:
        return None
    tok = lambda r: r["bs"] * ((r["res"] // 16) ** 2 + r["txt"])  # noqa: E731
    per_tok = (ref["peak_gib"] - ref["static_gib"]) / tok(ref)
    budget = ref["total_gib"] - 6.0  # allocator fragmentation and the recomputed block's activations
    blocks = num_blocks(config_of(v))
    for n in (0, 8, 6, 4, 3, 2, 1):
        if ref["static_gib"] + per_tok * tok(v) * (1 - checkpointed_blocks(n, blocks) / blocks) <= budget:
            return n
    return 1


STOCK_KEYS = {"flux": ("res", "bs", "targets", "rank", "ckpt", "txt", "steps", "compile", "attn", "quant"),
              "flux2": ("family", "flavour", "res", "bs", "targets", "rank", "ckpt", "txt", "steps", "warmup", "compile",
                        "attn", "fp8", "model", "device")}
"""What each family's stock script reads (FLUX.1: bench/_stock/stock_flux_lora_step.py; FLUX.2: stock_flux2_klein_step.py)."""
FLUX2_STOCK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stock_flux2_klein_step.py")


def run_job(who: str, v: dict, stock: str, timeout: float, out_dir: str, idx: int) -> dict:
    spec = ",".join(f"{k}={x}" for k, x in v.items())
    if who == "ours":
        cmd = [sys.executable, os.path.abspath(__file__), "run", spec]
    else:
        cmd = [sys.executable, stock, ",".join(f"{k}={v[k]}" for k in STOCK_KEYS[v["family"]])]
    # One inductor cache per attention backend: its cache key misses the sdpa_kernel setting, so a graph
    # compiled under cudnn was served to a later flash job (call 2 in RESULTS.md).
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"/tmp/torchinductor_{v['attn']}")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    with open(os.path.join(out_dir, f"job{idx:02d}_{who}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n" + text)
    r = _last_json(text) or dict(v, error=f"no result (rc={rc}): {text.strip().splitlines()[-1][:200] if text.strip() else ''}")
    r.setdefault("who", who)
    r["wall_s"] = round(time.time() - t0, 1)
    return r


def cmd_suite(args: list[str]) -> None:
    stock, budget, out_dir, jobs = {"flux": None, "flux2": FLUX2_STOCK}, 540.0, os.environ.get("OUT", "."), []
    it = iter(args)
    for a in it:
        if a == "--stock":
            stock["flux"] = next(it)
        elif a == "--stock-flux2":
            stock["flux2"] = next(it)
        elif a == "--budget-s":
            budget = float(next(it))
        elif a == "--out":
            out_dir = next(it)
        else:
            who, _, spec = a.partition(":")
            if who not in ("ours", "stock"):
                raise SystemExit(f"job {a!r}: expected ours:SPEC or stock:SPEC")
            jobs.append((who, parse(spec)))
    os.makedirs(out_dir, exist_ok=True)
    start, done, crashed_attn = time.time(), [], set()
    for idx, (who, v) in enumerate(jobs):
        left = budget - (time.time() - start)
        if left < 45:
            done.append(dict(v, who=who, error="skipped: suite budget spent"))
            continue
        if who == "stock" and not stock[v["family"]]:
            done.append(dict(v, who=who, error="skipped: no --stock script given (FLUX.1's is not in the repo)"))
            continue
        if v["attn"] in crashed_attn:
            done.append(dict(v, who=who, error=f"skipped: attn={v['attn']} crashed earlier"))
            continue
        if who == "ours" and v["ckpt"] == "auto":
            n = auto_interval(v, done)
            v = dict(v, ckpt=str(1 if n is None else n))
        r = run_job(who, v, stock[v["family"]], left - 5, out_dir, idx)
        # OOM at partial checkpointing: retry once with every block checkpointed, if time is left
        if who == "ours" and r.get("error") == "OOM" and v["ckpt"] != "1" and budget - (time.time() - start) > 60:
            done.append(r)
            print(json.dumps(r), flush=True)
            v = dict(v, ckpt="1")
            r = run_job(who, v, stock[v["family"]], budget - (time.time() - start) - 5, out_dir, idx)
        done.append(r)
        if "error" in r and r["error"] != "OOM" and v["attn"] != "flash":
            crashed_attn.add(v["attn"])
        print(json.dumps(r), flush=True)
        with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
            f.write(json.dumps(r) + "\n")
    print_table(done)


def model_name(r: dict) -> str:
    return (r.get("flavour") or "flux1") + ("" if r.get("model", "dev") == "dev" else "-" + r["model"])


def print_table(rows: list[dict]) -> None:
    """One line a job; ratios are stock s/step over ours for the same model, res, bs and quant."""
    def stock_ref(r, compiled):
        c = [s for s in rows if s.get("who") == "stock" and "error" not in s and same_model(s, r) and s["res"] == r["res"]
             and s["bs"] == r["bs"] and s.get("quant", "none") == r["quant"] and s["compile"] == compiled
             and s.get("fp8", 0) == 0]
        return min(c, key=lambda s: s["s_per_step"]) if c else None

    hdr = (f"{'who':5} {'model':13} {'res':>4} {'bs':>2} {'quant':5} {'fp8':>3} {'ckpt':>4} {'cmp':>3} {'attn':6} {'lora':4} {'opt':7} "
           f"{'s/step':>7} {'pipe':>7} {'smp/s':>6} {'MFU':>5} {'peakGiB':>7} {'1st s':>6} {'x eager':>7} {'x comp':>6}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['who']:5} {model_name(r):13} {r['res']:>4} {r['bs']:>2} {r['quant']:5} {r.get('fp8', 0):>3} "
                  f"{str(r['ckpt']):>4} {r['compile']:>3} {r['attn']:6} ERROR {r['error'][:90]}")
            continue
        ours = r["who"] == "ours"
        ratios = []
        for compiled in (0, 1):
            s = stock_ref(r, compiled) if ours else None
            ratios.append(f"{s['s_per_step'] / r['s_per_step']:.2f}" if s else "-")
        first = r.get("first_step_s", r.get("warmup_s", 0))
        print(f"{r['who']:5} {model_name(r):13} {r['res']:>4} {r['bs']:>2} {r['quant']:5} {r.get('fp8', 0):>3} {str(r['ckpt']):>4} "
              f"{r['compile']:>3} {r['attn']:6} {r.get('lora_dtype', 'fp32'):4} {r.get('opt', 'adamw'):7} {r['s_per_step']:7.4f} "
              f"{r.get('s_per_step_pipelined', float('nan')):7.4f} {r['samples_per_s']:6.2f} {r['mfu_vs_800T']:5.3f} "
              f"{r['peak_gib'] or 0:7.2f} {first:6.1f} {ratios[0]:>7} {ratios[1]:>6}")
    gpu = next((r.get("gpu") for r in rows if r.get("gpu")), "?")
    print(f"card: {gpu}; x eager / x comp: stock s/step (same model, res, bs, quant; eager / compiled; best stock row "
          "without the recipe's fp8) "
          f"over ours; ckpt: ours every n-th block (0 none), stock 0/1; 1st s: first step incl. compile (stock: warmup)")
    print_loss_tracking(rows)


def print_loss_tracking(rows: list[dict]) -> None:
    """Each fp8=1 job against its fp8=0 twin (same spec otherwise): relative loss difference per step."""
    ours = [r for r in rows if r.get("who") == "ours" and "error" not in r and r.get("losses")]
    same = lambda a, b: all(a[k] == b[k] for k in DEFAULTS if k not in ("fp8", "fp8_gacc", "fp8_fuse"))  # noqa: E731
    for r in (r for r in ours if r.get("fp8")):
        ref = next((b for b in ours if not b.get("fp8") and same(r, b)), None)
        if ref is None:
            continue
        n = min(len(r["losses"]), len(ref["losses"]))
        rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"][:n], ref["losses"][:n])]
        print(f"fp8 vs bf16 loss, res={r['res']} bs={r['bs']}, {n} steps: mean |rel diff| {sum(rel) / n:.4f}, "
              f"max {max(rel):.4f}; peak GiB {r['peak_gib']} vs {ref['peak_gib']}; "
              f"s/step {r['s_per_step']} vs {ref['s_per_step']} ({ref['s_per_step'] / r['s_per_step']:.2f}x)")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        cmd_run(sys.argv[2])
    elif len(sys.argv) >= 2 and sys.argv[1] == "suite":
        cmd_suite(sys.argv[2:])
    else:
        raise SystemExit(__doc__)
