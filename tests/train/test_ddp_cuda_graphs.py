"""Compiled blocks under DDP with ``train.dynamo_mode: reduce-overhead`` (spec.py allows it on several workers):
two processes, DDP as Ray's ``prepare_model`` sets it up, the step as the loop takes it (``FluxLossFn`` with its
graph-generation marks, ``TorchStepper``). Each rank trains on its own batches, so the per-rank losses differ while
DDP's all-reduced gradients keep the LoRA equal on both ranks; the compiled run's losses and LoRA match eager DDP.
On a CPU (gloo) inductor compiles the blocks without graphs; on two CUDA devices (NCCL) they replay as CUDA
graphs, with DDP's gradient hooks firing between the blocks' backward graphs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

RANK = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from flux_ray.core.compile import compile_blocks
    from flux_ray.core.lora import add_lora
    from flux_ray.core.model import build_transformer_from_config
    from flux_ray.core.step import FluxBatch, FluxLossFn
    from flux_ray.core.tiny import TINY_TRANSFORMER
    from flux_ray.spec import load_spec
    from flux_ray.train.stepper import TorchStepper

    mode, device_type, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])  # mode: eager | a dynamo_mode
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = device_type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    spec = load_spec(data={"datasets": [{"id": "d", "type": "s3", "aws_bucket_name": "b"}],
                           "cache": {"uri": "unused"}}, check_paths=False)
    layers = 2 if cuda else 1  # on a CPU: fewer graphs to compile (first blocks' variants), the same hooks between
    model = build_transformer_from_config(dict(TINY_TRANSFORMER, num_layers=layers, num_single_layers=layers),
                                          device, torch.float32, seed=0)
    add_lora(model, spec.lora)
    torch.manual_seed(0)
    for p in model.parameters():  # LoRA B starts at zero: give every adapter weight a value, the same on each rank
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    model = DistributedDataParallel(model, device_ids=[rank] if cuda else None, find_unused_parameters=False)
    if mode != "eager":
        compile_blocks(model.module, mode=None if mode == "default" else mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    stepper = TorchStepper(model, params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), 1.0)
    loss_fn = FluxLossFn(model, spec.flow, scheduler_config={}, fast_schedule=False, attention_backend="math",
                         cuda_graphs=mode == "reduce-overhead")
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batch
        batch = FluxBatch(torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g),
                          torch.randn(1, 32, generator=g)).to(device)
        loss = loss_fn(batch, torch.Generator().manual_seed(7 * step + rank))
        stepper.micro_step(loss, 0, 1)
        stepper.finish_step()
        losses.append(loss.item())
    lora = torch.cat([p.detach().double().flatten().cpu() for p in params])
    graphs = False
    if cuda and mode == "reduce-overhead":  # the blocks really were recorded as CUDA graphs, none skipped
        from torch._dynamo.utils import compilation_time_metrics, counters
        graphs = counters["inductor"]["cudagraph_skips"] == 0 and bool(compilation_time_metrics.get("CUDAGraphNode.record"))
    print(json.dumps({"losses": losses, "lora": lora.tolist()[:64], "lora_norm": float(lora.norm()),
                      "graphs_ok": bool(graphs)}))
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(mode: str, device_type: str, steps: int, tmp_path) -> list[dict]:
    """Both ranks' results of ``steps`` DDP steps in ``mode`` (eager, or the blocks compiled in that dynamo mode)."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{mode}-{rank}"), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK, mode, device_type, str(steps)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def _check_same_training(eager: list[dict], compiled: list[dict], tol: float) -> None:
    for rank in range(2):
        assert compiled[rank]["losses"] == pytest.approx(eager[rank]["losses"], abs=tol), rank
        assert compiled[rank]["lora_norm"] == pytest.approx(eager[rank]["lora_norm"], rel=tol)
    assert eager[0]["losses"] != eager[1]["losses"]  # the ranks saw different batches...
    for run in (eager, compiled):  # ...and DDP kept their LoRA equal
        assert run[0]["lora"] == pytest.approx(run[1]["lora"], abs=1e-6)


@pytest.mark.slow
def test_reduce_overhead_under_ddp_trains_as_eager_on_gloo(tmp_path):
    _check_same_training(run_ddp("eager", "cpu", 3, tmp_path), run_ddp("reduce-overhead", "cpu", 3, tmp_path), 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_cuda_graphs_under_ddp_train_as_eager_on_nccl(tmp_path):
    """Steps past the graphs' warm-up and recording (cudagraph trees record on the second call of each shape), so
    most steps replay; the losses follow eager DDP's within fp32 GPU error."""
    eager = run_ddp("eager", "cuda", 6, tmp_path)
    graphs = run_ddp("reduce-overhead", "cuda", 6, tmp_path)
    assert all(r["graphs_ok"] for r in graphs)
    _check_same_training(eager, graphs, 1e-3)
