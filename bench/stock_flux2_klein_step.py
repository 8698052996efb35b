"""Baseline: one FLUX.2 [klein] LoRA training step of diffusers' stock DreamBooth recipe, on a random full-size model.

The FLUX.2 counterpart of the FLUX.1 stock step (bench/_stock/stock_flux_lora_step.py, from
../shared/bench/): the step of diffusers' ``examples/dreambooth/train_dreambooth_lora_flux2_klein.py``
(huggingface/diffusers at 58eb52c0803ea9af3abec60841c2a093bdf1f951, file last changed in 2919c509), transcribed,
on the same random bf16 ``Flux2Transformer2DModel`` that ``train_step_bench.py run family=flux2`` trains
(``flux_ray.core.flux2.full_size.build_component``, seed 0; step time does not depend on weight values).
Prints one JSON line per SPEC with the FLUX.1 stock script's fields, so ``train_step_bench.py suite`` runs it for
``stock:family=flux2,...`` jobs.

Where each part comes from (line numbers of that file):
- model prep (1195-1313): base in weight_dtype bf16 on the device (``--mixed_precision bf16``; the README's
  commands leave it to the accelerate config, where "no" would keep an fp32 base); ``fp8=1`` is the README's
  ``--do_fp8_training`` (torchao ``convert_to_float8_training`` with the script's ``module_filter_fn`` and
  ``Float8LinearConfig(pad_inner_dim=True)``, before the adapter); ``ckpt=1`` is ``--gradient_checkpointing``
  (``enable_gradient_checkpointing``); ``transformer.add_adapter(LoraConfig(r, lora_alpha, lora_dropout=0,
  init_lora_weights="gaussian", target_modules))`` with the script's default target_modules (``targets=diffusers``:
  to_k/q/v, to_out.0, to_qkv_mlp_proj, single_transformer_blocks.{0..23}.attn.to_out) or ``targets=all`` as a
  ``--lora_layers`` list (flux_ray's FLUX.2 ``all`` preset). LoRA weights stay bf16: the script upcasts them only
  under fp16 (1401-1425), and PEFT makes them in the base layer's dtype.
- optimizer (1433-1466) and schedule (1682): ``torch.optim.AdamW`` (the script's defaults: lr 1e-4, betas
  0.9/0.999, weight decay 1e-4, eps 1e-8; torch's default foreach), ``get_scheduler("constant")``; max_grad_norm 1.0.
- accelerate (``accelerator.prepare`` / ``backward`` / ``clip_grad_norm_`` on one GPU, bf16): the forward under
  ``torch.autocast(bf16)`` with its output converted to fp32 (accelerate's ``convert_outputs_to_fp32``), a plain
  ``loss.backward()``, ``torch.nn.utils.clip_grad_norm_`` over ``transformer.parameters()``; gradient accumulation 1.
- the step (``get_sigmas`` 1767-1776, the loop body 1781-1917): cached latents (``--cache_latents``: the VAE's
  mode, bf16, (1, 32, H/8, W/8) on the device) and per-caption cached prompt embeddings / text ids (custom
  instance prompts) concatenated per batch; ``_patchify_latents``, batch-norm normalisation (fp32 statistics),
  ``_prepare_latent_ids``, ``randn_like`` noise, ``compute_density_for_timestep_sampling`` (weighting_scheme
  none: uniform on the host), scheduler timesteps and sigmas, ``_pack_latents``, guidance None for [klein] (the
  config's guidance_embeds; the scale for [dev]), ``timestep=timesteps / 1000``, ``_unpack_latents_with_ids``,
  ``compute_loss_weighting_for_sd3``, target ``noise - model_input``, the per-sample mean squared error averaged,
  ``optimizer.step``, ``lr_scheduler.step``, ``optimizer.zero_grad``, and the progress bar's ``loss.detach().item()``.
- scheduler: ``FlowMatchEulerDiscreteScheduler`` of the klein checkpoints' config (core/flux2/flavours.py).

Left out: data loading, bucketing, image transforms, VAE and Qwen3 encoding (the bench feeds tensors shaped like
the script's caches, as train_step_bench.py feeds ours CacheReader-shaped batches), prior preservation, caption
dropout, validation, checkpoint saving, trackers, the README's ``--use_8bit_adam`` (bitsandbytes is not on the
device) and ``--gradient_accumulation_steps=4`` (one optimizer step a step, as ours). No compile: the script does
not compile. Attention: ``attn=flash`` (the default) holds SDPA to flash as the FLUX.1 stock step does (PyTorch's
own pick, cuDNN, crashed FLUX steps on H200); ``attn=default`` leaves PyTorch's pick, as the script does.

usage: python bench/stock_flux2_klein_step.py family=flux2,flavour=klein-4b,res=1024,bs=1,ckpt=1
       python bench/stock_flux2_klein_step.py flavour=klein-4b,model=tiny,device=cpu,res=64,steps=2   # CPU smoke test
"""
import json
import os
import sys
import time

import torch
from diffusers import Flux2KleinPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from peft import LoraConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # flux_ray, for the model builder
from step_bench_models import PEAK_FLOPS, model_flops, scheduler_config, timed_steps, transformer_config  # noqa: E402

BACKENDS = {"flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION], "math": [SDPBackend.MATH]}
DEFAULTS = dict(family="flux2", flavour="klein-4b", res=1024, bs=1, targets="diffusers", rank=16, ckpt=1, txt=512,
                steps=10, warmup=3, compile=0, attn="flash", fp8=0, model="dev", device="cuda")
STRINGS = ("family", "flavour", "targets", "attn", "model", "device")
# the script's argument defaults
LEARNING_RATE, ADAM_BETAS, ADAM_WEIGHT_DECAY, ADAM_EPS, MAX_GRAD_NORM = 1e-4, (0.9, 0.999), 1e-4, 1e-8, 1.0
GUIDANCE_SCALE = 3.5
WEIGHTING_SCHEME, LOGIT_MEAN, LOGIT_STD, MODE_SCALE = "none", 0.0, 1.0, 1.29
N_CACHED = 4  # cached samples the batches cycle through


def parse(spec: str) -> dict:
    v = dict(DEFAULTS)
    for kv in filter(None, spec.split(",")):
        k, x = kv.split("=")
        if k not in DEFAULTS:
            raise ValueError(f"unknown key {k!r} in {spec!r}; keys: {sorted(DEFAULTS)}")
        v[k] = x if k in STRINGS else int(x)
    if v["family"] != "flux2" or v["compile"] or int(v["ckpt"]) not in (0, 1) or v["targets"] not in ("diffusers", "all"):
        raise ValueError(f"{spec!r}: this is the FLUX.2 klein recipe: family=flux2, compile=0 (the script does not "
                         "compile), ckpt 0/1, targets diffusers|all")
    v["ckpt"] = int(v["ckpt"])
    return v


def target_modules(targets: str, transformer) -> list[str]:
    """The script's default target_modules (1294-1304), or ``--lora_layers`` naming flux_ray's FLUX.2 ``all``."""
    singles = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(transformer.single_transformer_blocks))]
    if targets == "diffusers":  # the script's range(24) is klein-9b's count; klein-4b's 20 leave 4 names matching nothing
        return ["to_k", "to_q", "to_v", "to_out.0"] + ["to_qkv_mlp_proj", *[f"single_transformer_blocks.{i}.attn.to_out"
                                                                           for i in range(24)]]
    return ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
            "ff_context.linear_out", "attn.to_qkv_mlp_proj", *singles]


def module_filter_fn(mod: torch.nn.Module, fqn: str):  # the script's, verbatim (241-249)
    # don't convert the output module
    if fqn == "proj_out":
        return False
    # don't convert linear modules with weight dimensions not divisible by 16
    if isinstance(mod, torch.nn.Linear):
        if mod.in_features % 16 != 0 or mod.out_features % 16 != 0:
            return False
    return True


def build(v: dict, config: dict, device: torch.device):
    from flux_ray.core.flux2.full_size import build_component

    torch.manual_seed(0)
    transformer = build_component(v["flavour"], "transformer", device, torch.bfloat16, config)  # weight_dtype bf16
    transformer.requires_grad_(False)
    if v["fp8"]:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(transformer, module_filter_fn=module_filter_fn,
                                   config=Float8LinearConfig(pad_inner_dim=True))
    if v["ckpt"]:
        transformer.enable_gradient_checkpointing()
    transformer.add_adapter(LoraConfig(r=v["rank"], lora_alpha=v["rank"], lora_dropout=0.0, init_lora_weights="gaussian",
                                       target_modules=target_modules(v["targets"], transformer)))
    return transformer


def run(v: dict) -> dict:
    cuda = v["device"] == "cuda"
    device = torch.device(v["device"])
    config = transformer_config("flux2", v["flavour"], v["model"])
    t0 = time.time()
    transformer = build(v, config, device)
    build_s = time.time() - t0
    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler(**scheduler_config("flux2"))
    params = list(filter(lambda p: p.requires_grad, transformer.parameters()))
    optimizer = torch.optim.AdamW([{"params": params, "lr": LEARNING_RATE}], betas=ADAM_BETAS,
                                  weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPS)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)

    # The caches: VAE latents (bf16, 32 channels at H/8), the VAE batch norm's fp32 statistics, per-caption embeddings
    g = torch.Generator(device).manual_seed(1)
    lat, vae_channels, txt = v["res"] // 8, config["in_channels"] // 4, v["txt"]
    instance_latents_cache = [torch.randn(1, vae_channels, lat, lat, device=device, generator=g).to(torch.bfloat16)
                              for _ in range(N_CACHED)]
    latents_bn_mean = 0.1 * torch.randn(1, config["in_channels"], 1, 1, device=device, generator=g)
    latents_bn_std = 1 + torch.rand(1, config["in_channels"], 1, 1, device=device, generator=g)
    prompt_embeds_cache = [torch.randn(1, txt, config["joint_attention_dim"], device=device, generator=g).to(torch.bfloat16)
                           for _ in range(N_CACHED)]
    text_ids_cache = [Flux2KleinPipeline._prepare_text_ids(e).to(device) for e in prompt_embeds_cache]

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):  # the script's (1767-1776)
        sigmas = noise_scheduler_copy.sigmas.to(device=device, dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps.to(device)
        timesteps = timesteps.to(device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]

        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    step_count, losses = [0], []

    def step():  # the script's loop body (1781-1917), one sample index per batch row
        sample_indices = [(step_count[0] * v["bs"] + i) % N_CACHED for i in range(v["bs"])]
        step_count[0] += 1
        prompt_embeds = torch.cat([prompt_embeds_cache[idx] for idx in sample_indices], dim=0)
        text_ids = torch.cat([text_ids_cache[idx] for idx in sample_indices], dim=0)
        model_input = torch.cat([instance_latents_cache[idx] for idx in sample_indices], dim=0)
        model_input = Flux2KleinPipeline._patchify_latents(model_input)
        model_input = (model_input - latents_bn_mean) / latents_bn_std
        model_input_ids = Flux2KleinPipeline._prepare_latent_ids(model_input).to(device=model_input.device)
        noise = torch.randn_like(model_input)
        bsz = model_input.shape[0]
        u = compute_density_for_timestep_sampling(weighting_scheme=WEIGHTING_SCHEME, batch_size=bsz,
                                                  logit_mean=LOGIT_MEAN, logit_std=LOGIT_STD, mode_scale=MODE_SCALE)
        indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
        timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
        sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        packed_noisy_model_input = Flux2KleinPipeline._pack_latents(noisy_model_input)
        if transformer.config.guidance_embeds:
            guidance = torch.full([1], GUIDANCE_SCALE, device=device).expand(model_input.shape[0])
        else:
            guidance = None
        with torch.autocast(device.type, dtype=torch.bfloat16):  # accelerate's bf16 mixed precision
            model_pred = transformer(hidden_states=packed_noisy_model_input, timestep=timesteps / 1000, guidance=guidance,
                                     encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=model_input_ids,
                                     return_dict=False)[0]
        model_pred = model_pred.float()  # accelerate's convert_outputs_to_fp32
        model_pred = model_pred[:, : packed_noisy_model_input.size(1) :]
        model_pred = Flux2KleinPipeline._unpack_latents_with_ids(model_pred, model_input_ids)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=WEIGHTING_SCHEME, sigmas=sigmas)
        target = noise - model_input
        loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
        loss = loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.detach().item())  # the progress bar's logs

    torch.manual_seed(0)  # the host timestep draws and the device noise
    transformer.train()
    attn_ctx = sdpa_kernel(BACKENDS[v["attn"]]) if v["attn"] != "default" else None
    if attn_ctx is not None:
        attn_ctx.__enter__()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(v["warmup"]):
        step()
    sync()
    warm = time.time() - t0
    times = timed_steps(step, v["steps"], cuda)
    if attn_ctx is not None:
        attn_ctx.__exit__(None, None, None)
    times.sort()
    med = times[len(times) // 2]
    tokens = (v["res"] // 16) ** 2
    flops = model_flops("flux2", config, tokens, txt, v["bs"])
    return dict(v, who="stock", quant="none", lora_dtype="bf16", opt="adamw", s_per_step=round(med, 4),
                min=round(times[0], 4), max=round(times[-1], 4), samples_per_s=round(v["bs"] / med, 3),
                mfu_vs_800T=round(flops / med / PEAK_FLOPS, 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                warmup_s=round(warm, 1), build_s=round(build_s, 1),
                trainable_m=round(sum(p.numel() for p in params) / 1e6, 2), loss=round(losses[-1], 4),
                losses=[round(x, 5) for x in losses], gpu=torch.cuda.get_device_name() if cuda else "cpu",
                torch=torch.__version__)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for spec in sys.argv[1:]:
        v = parse(spec)
        try:
            print(json.dumps(run(v)), flush=True)
        except torch.OutOfMemoryError:
            print(json.dumps(dict(v, who="stock", quant="none", error="OOM")), flush=True)
            raise SystemExit(3)
        except Exception as e:  # noqa: BLE001 -- one JSON line per variant, whatever happened
            print(json.dumps(dict(v, who="stock", quant="none", error=f"{type(e).__name__}: {str(e)[:300]}")), flush=True)
            raise SystemExit(2)
