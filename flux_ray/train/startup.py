"""Where start-up time goes, and one lever on it. No Ray import.

``compile_breakdown``: the first step's compile from torch's own counters (``torch._dynamo.utils``): time in dynamo's
tracing, the backend (AOT autograd + inductor, or their cache loads), the lazy backward compile, CUDA graph
recording, and the cache hits and misses (inductor's FX graph cache, AOT autograd's cache). Sent with the first
report as ``startup_compile_*`` (bench/ray_gpu_bench.py prints them).

``warm_compile_workers``: inductor starts its compile-worker pool (a sidecar process, then ``compile_threads``
workers, each importing torch and Triton) at the first compiled graph: ``torch/_dynamo/backends/inductor.py``
calls ``async_compile.maybe_warm_pool()`` then ``compile_fx`` wakes the pool up (torch 2.11 and 2.13 alike). On a
warm start that lands inside the first step, where the workers' imports compete for the CPU with dynamo's tracing.
Started before the base loads instead, the pool comes up while the load waits on the disk. Turning it off when the
shared artifacts loaded (``compile_threads = 1``) was the other choice, and was not taken: a graph the artifacts
lack (a new aspect bucket, a dynamic-shape recompile) would then compile its kernels one by one in this process;
and when every graph hits, inductor never waits for the pool to come up (``use_process_pool`` is false until it
has answered; until then a hit's kernels load from the bundled Triton cache in this process).
"""
from __future__ import annotations

import time

import torch

# startup_compile_<name>_s: the summed seconds of these torch._dynamo.utils.compilation_time_metrics entries
COMPILE_TIMERS = {
    "dynamo": "_compile.compile_inner",              # dynamo's whole frame compile, the backend call included
    "backend": "OutputGraph.call_user_compiler",     # AOT autograd + inductor (forward), or their cache loads
    "aot_trace": "aot_trace_joint_graph",            # AOT autograd tracing the joint graph (an AOT cache miss)
    "inductor_fw": "compile_fx.<locals>.fw_compiler_base",
    "inductor_bw": "compile_fx.<locals>.bw_compiler",
    "backward": "backward._backward_impl",           # the backward compiled lazily at the first backward
    "cache_load": "AOTAutogradCache.inductor_load",  # loading inductor's code for an AOT autograd cache hit
    "cudagraph_record": "CUDAGraphNode.record",      # reduce-overhead: recording the CUDA graphs
}
# startup_compile_<name>: torch._dynamo.utils.counters[group][key]
COMPILE_COUNTERS = {
    "graphs": ("stats", "unique_graphs"),
    "fxgraph_hits": ("inductor", "fxgraph_cache_hit"),
    "fxgraph_misses": ("inductor", "fxgraph_cache_miss"),
    "aot_cache_hits": ("aot_autograd", "autograd_cache_hit"),
    "aot_cache_misses": ("aot_autograd", "autograd_cache_miss"),
}


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (``startup_compile_graphs`` is this count)."""
    from torch._dynamo.utils import counters

    group, key = COMPILE_COUNTERS["graphs"]
    return counters[group][key]


def compile_breakdown() -> dict[str, float]:
    """This process's compile so far as flat ``startup_compile_*`` metrics; ``tracing_s`` is dynamo's time less
    the backend's (tracing, guards, bytecode). Empty when nothing was compiled."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    out: dict[str, float] = {}
    for name, key in COMPILE_TIMERS.items():
        if compilation_time_metrics.get(key):
            out[f"startup_compile_{name}_s"] = round(sum(compilation_time_metrics[key]), 3)
    if not out:
        return {}
    if "startup_compile_dynamo_s" in out:
        out["startup_compile_tracing_s"] = round(out["startup_compile_dynamo_s"]
                                                 - out.get("startup_compile_backend_s", 0.0), 3)
    for name, (group, key) in COMPILE_COUNTERS.items():
        out[f"startup_compile_{name}"] = counters[group][key]
    return out


def worker_timeline(entered_at: float, module_imported_at: float) -> dict[str, float]:
    """Wall-clock times (epoch s) of a worker's start: its process began (Ray may have started it before the run:
    then earlier than ``train()``), Ray imported the worker module (unpickling the train function), the train
    function was entered. The driver subtracts its ``train()`` time (bench/ray_gpu_bench.py)."""
    out = {"worker_module_imported_at": module_imported_at, "worker_started_at": entered_at}
    try:
        import psutil

        out["worker_process_started_at"] = psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a timing, never worth failing a run over
        pass
    return out


def warm_compile_workers(spec, device: torch.device) -> float | None:
    """Start inductor's compile-worker pool now (see the module docstring) when this run compiles for a GPU;
    returns the seconds it took on this thread (the pool itself comes up in the background), None if not started."""
    if not spec.train.compile or device.type != "cuda":
        return None
    t0 = time.perf_counter()
    from torch._inductor import async_compile

    warm = getattr(async_compile, "maybe_warm_pool", None)  # torch >= 2.6; it checks Triton and TORCH_WARM_POOL
    if warm is None:
        return None
    warm()
    return time.perf_counter() - t0
