"""Prior regularisation (is_regularisation_data): the target of a regularisation row is the base model's own
prediction with the adapter off (core/step.py FluxLossFn.target, core/adapters.py AdapterSwitch). Tiny Flux, CPU."""
from __future__ import annotations

import pytest
import torch

from flux_ray.core import flow as F
from flux_ray.core.adapters import AdapterSwitch, LycorisAdapter
from flux_ray.core.lora import add_lora
from flux_ray.core.model import build_transformer_from_config
from flux_ray.core.step import FluxBatch, FluxLossFn
from flux_ray.core.tiny import FLUX_SCHEDULER, TINY_TRANSFORMER
from flux_ray.spec import FlowSpec, LoraSpec

CONFIG = dict(TINY_TRANSFORMER, num_layers=1, num_single_layers=2)


def lora_model(perturb: float = 0.0):
    model = build_transformer_from_config(CONFIG, "cpu", torch.float32, seed=0)
    params = add_lora(model, LoraSpec(lora_rank=4, flux_lora_target="all+ffs"))
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in params:
                p.copy_(perturb * torch.randn(p.shape, generator=g))
    return model, params


def loss_fn(model) -> FluxLossFn:
    return FluxLossFn(model, FlowSpec(flow_schedule_auto_shift=True), scheduler_config=dict(FLUX_SCHEDULER),
                      fast_schedule=False)


def batch(prior_rows=(), bs: int = 3) -> FluxBatch:
    g = torch.Generator().manual_seed(2)
    return FluxBatch(torch.randn(bs, 16, 8, 8, generator=g), torch.randn(bs, 7, 32, generator=g),
                     torch.randn(bs, 32, generator=g), prior_rows=tuple(prior_rows))


def gen(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_regularisation_loss_is_zero_with_a_zero_initialised_lora():
    model, _ = lora_model()
    fn = loss_fn(model)
    assert fn(batch(prior_rows=(0, 1, 2)), gen()).item() == 0.0
    assert fn(batch(), gen()).item() > 0.1  # the same rows against their images


def test_the_target_is_the_base_models_own_prediction():
    """Perturbed LoRA: a regularisation row's target equals a LoRA-free copy of the base on the same input."""
    model, _ = lora_model(perturb=0.1)
    base = build_transformer_from_config(CONFIG, "cpu", torch.float32, seed=0)
    b = batch(prior_rows=(1,))
    latents = F.pack_latents(b.latents)
    noise, sigmas, guidance = torch.randn(latents.shape, generator=gen()), torch.tensor([0.3, 0.6, 0.9]), \
        torch.full((3,), 3.5)
    noisy = F.noisy_latents(latents, noise, sigmas)
    target = loss_fn(model).target(b, noisy, noise - latents, sigmas, guidance)
    with torch.no_grad():
        expected = loss_fn(base).predict(b, noisy, sigmas, guidance)
        adapted = loss_fn(model).predict(b, noisy, sigmas, guidance)
    torch.testing.assert_close(target[1], expected[1], rtol=1e-5, atol=1e-6)
    assert (adapted[1] - expected[1]).abs().max() > 1e-3  # the LoRA does change the output
    torch.testing.assert_close(target[[0, 2]], (noise - latents)[[0, 2]])  # other rows keep the flow target
    assert all(p._disable_adapters is False for p in AdapterSwitch(model).peft_layers)  # switched back on


def test_the_gradient_pulls_a_perturbed_lora_back_towards_the_base():
    model, params = lora_model(perturb=0.05)
    fn, b = loss_fn(model), batch(prior_rows=(0, 1, 2))
    grads_on = [p.requires_grad for p in params]
    losses = []
    opt = torch.optim.Adam(params, lr=1e-2)
    for step in range(8):
        loss = fn(b, gen(step))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] > 0
    assert [p.requires_grad for p in params] == grads_on  # the switch leaves requires_grad alone (DDP/FSDP)
    assert sum(p.grad.abs().sum() for p in params) > 0
    # the adapter-on prediction moves towards the adapter-off one on a fixed input
    probe = F.pack_latents(batch().latents)
    sig, gd = torch.full((3,), 0.5), torch.full((3,), 3.5)
    with torch.no_grad():
        on = fn.predict(b, probe, sig, gd)
        with AdapterSwitch(model).off():
            off = fn.predict(b, probe, sig, gd)
    fresh, _ = lora_model(perturb=0.05)
    with torch.no_grad():
        before = loss_fn(fresh).predict(b, probe, sig, gd)
    assert (on - off).pow(2).mean() < 0.5 * (before - off).pow(2).mean()
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_mixed_batch_is_the_mean_of_its_rows():
    model, _ = lora_model(perturb=0.05)
    fn = loss_fn(model)
    mixed = fn(batch(prior_rows=(1,)), gen()).item()
    prior = fn(batch(prior_rows=(0, 1, 2)), gen()).item()
    flow = fn(batch(), gen()).item()
    assert min(prior, flow) < mixed < max(prior, flow)


def test_lycoris_adapter_switches_off_and_back():
    pytest.importorskip("lycoris")
    model = build_transformer_from_config(CONFIG, "cpu", torch.float32, seed=0)
    adapter = LycorisAdapter(model, LoraSpec(lora_type="lycoris", lycoris_config={
        "algo": "lora", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 4}))
    with torch.no_grad():
        for p in adapter.params:
            p.add_(0.05)
    b = batch()
    probe, sig, gd = F.pack_latents(b.latents), torch.full((3,), 0.5), torch.full((3,), 3.5)
    base = build_transformer_from_config(CONFIG, "cpu", torch.float32, seed=0)
    with torch.no_grad():
        switch = AdapterSwitch(model)
        with switch.off():
            off = loss_fn(model).predict(b, probe, sig, gd)
        on = loss_fn(model).predict(b, probe, sig, gd)
        ref = loss_fn(base).predict(b, probe, sig, gd)
    torch.testing.assert_close(off, ref, rtol=1e-5, atol=1e-6)
    assert (on - ref).abs().max() > 1e-4
    assert adapter.net.multiplier == 1.0
