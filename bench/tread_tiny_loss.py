"""Loss impact of TREAD on the tiny Flux (CPU): the same LoRA run with and without token routing.

Both runs share the seed, LoRA init, batches and per-step generators (so the same noise and sigmas:
FluxLossFn draws the routing after them). The model has 2 double + 3 single blocks; the route is
SimpleTuner's Flux example, blocks 2..-2. Prints the training loss (mean over each window of steps) and
the deterministic eval loss (fixed noise, sigma grid; never routed) every ``every`` steps, one JSON line.

usage: python bench/tread_tiny_loss.py [steps=200] [ratio=0.5] [lr=1e-3] [every=25]
"""
from __future__ import annotations

import json
import sys

import torch

from flux_ray.core.lora import add_lora
from flux_ray.core.model import build_transformer_from_config
from flux_ray.core.step import FluxBatch, FluxLossFn
from flux_ray.core.tiny import FLUX_SCHEDULER, TINY_TRANSFORMER
from flux_ray.core.tread import TokenRouter
from flux_ray.spec import FlowSpec, LoraSpec, TreadConfig, TreadRoute
from flux_ray.train.loop import step_generator

CONFIG = dict(TINY_TRANSFORMER, num_layers=2, num_single_layers=3)


def batches(n: int = 4, bs: int = 2, lat: int = 16) -> list[FluxBatch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):  # smooth latents (upsampled 4x4 noise): structure the LoRA can fit
        low = torch.randn(bs, 16, 4, 4, generator=g)
        lat_bchw = torch.nn.functional.interpolate(low, size=(lat, lat), mode="bilinear")
        out.append(FluxBatch(lat_bchw, torch.randn(bs, 8, 32, generator=g), torch.randn(bs, 32, generator=g)))
    return out


def run(ratio: float | None, steps: int, lr: float, every: int) -> dict:
    torch.manual_seed(0)
    model = build_transformer_from_config(CONFIG, "cpu", torch.float32, seed=0)
    params = add_lora(model, LoraSpec(lora_rank=8, flux_lora_target="all+ffs"))
    router = None if ratio is None else TokenRouter.from_spec(model, TreadConfig(routes=[
        TreadRoute(selection_ratio=ratio, start_layer_idx=2, end_layer_idx=-2)]))
    fn = FluxLossFn(model, FlowSpec(), scheduler_config=dict(FLUX_SCHEDULER), fast_schedule=False,
                    attention_backend="math", tread=router)
    data, opt = batches(), torch.optim.AdamW(params, lr=lr)

    def eval_loss() -> float:
        return round(float(torch.cat([fn.eval_loss(b, [0, 1], 8) for b in data]).mean()), 4)

    curve, window = [dict(step=0, eval=eval_loss())], []
    for step in range(steps):
        loss = fn(data[step % len(data)], step_generator(42, step, 0, 0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(float(loss.detach()))
        if (step + 1) % every == 0:
            curve.append(dict(step=step + 1, train=round(sum(window) / len(window), 4), eval=eval_loss()))
            window = []
    return dict(tread=ratio, curve=curve)


def main(argv: list[str]) -> None:
    args = dict(steps=200, ratio=0.5, lr=1e-3, every=25)
    for kv in argv:
        k, v = kv.split("=")
        args[k] = type(args[k])(v)
    torch.set_num_threads(1)
    for ratio in (None, args["ratio"]):
        print(json.dumps(run(ratio, args["steps"], args["lr"], args["every"])), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
