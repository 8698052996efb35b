"""FlatAllReduceStepper on two gloo ranks: the same parameters as DDP, every rank equal."""
from __future__ import annotations

import datetime

import torch

STEPS, ACCUM = 3, 2


class Net(torch.nn.Module):
    """A frozen "base" (the same on every rank, as loaded from files), trainable layers that start different on each
    rank, one used only on rank 1 (no gradient on rank 0) and one no rank uses (no gradient anywhere)."""

    def __init__(self, rank: int):
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Linear(8, 8).requires_grad_(False)
        torch.manual_seed(100 + rank)
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
        self.rank1_only, self.unused = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(self.base(x)))
        if self.rank == 1:
            h = h + self.rank1_only(h)
        return self.b(h)


def _train(model: torch.nn.Module, stepper, rank: int) -> None:
    for step in range(STEPS):
        for micro in range(ACCUM):
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
            x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
            stepper.micro_step((model(x) - y).square().mean(), micro, ACCUM)
        stepper.finish_step()


def _parts(model: torch.nn.Module, params):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # decay moves a parameter stepped with a zero grad
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _rank(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    from flux_ray.train.stepper import FlatAllReduceStepper, TorchStepper

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    ddp_model = Net(rank)
    ddp = torch.nn.parallel.DistributedDataParallel(ddp_model, find_unused_parameters=True)
    params = [p for p in ddp.parameters() if p.requires_grad]
    _train(ddp, TorchStepper(ddp, params, *_parts(ddp, params), max_grad_norm=0.5), rank)

    model = Net(rank)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    stepper = FlatAllReduceStepper(model, params, *_parts(model, params), max_grad_norm=0.5)
    stepper.start()
    after_start = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, stepper, rank)
    torch.save({"ddp": ddp_model.state_dict(), "allreduce": model.state_dict(), "start": start,
                "after_start": after_start}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_flat_all_reduce_matches_ddp_with_accumulation_and_missing_grads(tmp_path):
    """Two gloo ranks whose trainable layers start different, 3 steps of 2 accumulated micro-batches, clipping and
    AdamW with weight decay: after the start broadcast both replicas hold rank 0's weights; after training they are
    equal and equal DDP's (find_unused_parameters: a layer only rank 1 uses gets the average, one no rank uses is
    skipped by the optimizer as under DDP)."""
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path),), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["start"]["a.weight"], r1["start"]["a.weight"])  # replicas start different
    for k in r0["start"]:
        assert torch.equal(r1["after_start"][k], r0["start"][k]), k  # rank 0's weights everywhere
    for k, v in r0["allreduce"].items():
        assert torch.equal(v, r1["allreduce"][k]), k
        torch.testing.assert_close(v, r0["ddp"][k], rtol=1e-6, atol=1e-7, msg=k)
        torch.testing.assert_close(r1["ddp"][k], r0["ddp"][k], rtol=0, atol=0, msg=k)
    assert not torch.equal(r0["allreduce"]["rank1_only.weight"], r0["start"]["rank1_only.weight"])  # rank 0 stepped it
    assert torch.equal(r0["allreduce"]["unused.weight"], r0["start"]["unused.weight"])  # no grad anywhere: skipped
    assert not torch.equal(r0["allreduce"]["a.weight"], r0["start"]["a.weight"])
