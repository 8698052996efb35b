"""Builds the loop's parts on a worker: model, LoRA, optimizer, data. No Ray import."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch

from flux_ray.core import lora
from flux_ray.core.model import DTYPES
from flux_ray.core.adapters import attach_adapter
from flux_ray.core.step import FluxLossFn
from flux_ray.core.tread import TokenRouter
from flux_ray.data.loader import CacheReader
from flux_ray.families import get_family
from flux_ray.train import base_cache
from flux_ray.train.base_cache import CachedBase
from flux_ray.train.loop import LoopParts
from flux_ray.train.optim import build_lr_scheduler, build_optimizer, cast_trainable_params
from flux_ray.train.startup import warm_compile_workers
from flux_ray.train.state_io import StateIO
from flux_ray.train.stepper import DeepSpeedStepper, FlatAllReduceStepper, TorchStepper, init_deepspeed

if TYPE_CHECKING:
    from flux_ray.spec import JobSpec


def base_dtype(spec: JobSpec, device: torch.device) -> torch.dtype:
    return DTYPES[spec.model.base_model_default_dtype]


def build_transformer(spec: JobSpec, device: torch.device):
    """Load the spec's base transformer and prepare it (:func:`prepare_base`)."""
    if spec.model.base_compute_dtype == "fp8":  # before the load: refuse a device without FP8 tensor cores early
        _fp8_module().check_fp8_supported(device)
    transformer = get_family(spec.model.model_family).load_transformer(spec.model, dtype=base_dtype(spec, device),
                                                                       device=load_device(spec, device))
    return prepare_base(transformer, spec, device)


def load_device(spec: JobSpec, device: torch.device) -> torch.device | None:
    """Where the base transformer loads: straight onto the GPU it trains on (each tensor from the memory-mapped
    safetensors to the device, no CPU copy of the model first: the family loader's ``device``) when it trains
    there as loaded; None (the CPU, moved later) on a CPU, and when it is quantized (on the CPU with
    quantize_via cpu; tensor subclasses) or group-offloaded (the base stays on the CPU)."""
    if device.type != "cuda" or spec.model.enable_group_offload or spec.model.base_model_precision != "no_change":
        return None
    return device


def prepare_base(transformer: torch.nn.Module, spec: JobSpec, device: torch.device, *, emulate_fp8: bool = False):
    """A loaded base transformer made trainable as the spec says: assistant LoRA fused, base quantized or
    group-offloaded, LoRA attached, FP8 base Linears, gradient checkpointing. Returns (model, adapter, its
    initial state when the init rewrote base weights). ``emulate_fp8``: bench/tests only, FP8 on a CPU."""
    from flux_ray.core.quantize import quantize_base

    fp8 = spec.model.base_compute_dtype == "fp8"
    if spec.model.assistant_lora_path:  # schnell's frozen assistant LoRA: fused into the base before training
        from flux_ray.core.lora_export import merge_lora

        merge_lora(transformer, spec.model.assistant_lora_path)
    if spec.model.enable_group_offload:  # the base stays on the CPU; the adapter, attached after, on the device
        from flux_ray.core.offload import apply_group_offload, keep_unowned_on_device

        apply_group_offload(transformer, spec.model, device)
        adapter = attach_adapter(transformer, spec.lora)
        keep_unowned_on_device(transformer, device)
    else:
        transformer = quantize_base(transformer, spec.model, device)
        adapter = attach_adapter(transformer, spec.lora)
    init_sd = adapter.state_dict() if lora.moves_base_weights(spec.lora) else None
    if fp8:  # after the adapter: PEFT holds each frozen Linear as base_layer, and its init may rewrite them
        _fp8_module().convert_base_to_fp8(transformer, device, emulate=emulate_fp8)
    if spec.train.gradient_checkpointing:
        from flux_ray.core.checkpointing import apply_gradient_checkpointing

        apply_gradient_checkpointing(transformer, spec.train.gradient_checkpointing_interval)
    return transformer, adapter, init_sd


def _fp8_module():
    try:
        from flux_ray.core import fp8
    except ImportError as e:
        raise ValueError("model.base_compute_dtype fp8 needs the torchao package "
                         "(pip install 'flux_ray[torchao]')") from e
    return fp8


def compile_model(model: torch.nn.Module, spec: JobSpec) -> None:
    """Regional compile of the (possibly wrapped) transformer's blocks in ``train.dynamo_mode``."""
    from flux_ray.core.compile import compile_blocks

    compile_blocks(getattr(model, "module", model),
                   mode=None if spec.train.dynamo_mode == "default" else spec.train.dynamo_mode)


def build_loss_fn(spec: JobSpec, model: torch.nn.Module, scheduler_config: dict, tread: TokenRouter | None = None,
                  *, uncast_lora: bool = True) -> FluxLossFn:
    """The step's loss over ``model`` as the spec sets it (flow, precision, masking, attention backend).
    ``uncast_lora=False``: keep PEFT's input casts (a bench lever; values are the same)."""
    autocast = torch.bfloat16 if spec.train.mixed_precision == "bf16" else None
    return FluxLossFn(model, spec.flow, scheduler_config=scheduler_config, fast_schedule=spec.fast_schedule,
                      masked_attention=spec.train.flux_attention_masked_training, autocast_dtype=autocast,
                      attention_backend=spec.train.attention_backend, tread=tread,
                      cuda_graphs=spec.train.uses_cuda_graphs, uncast_lora=uncast_lora,
                      family=get_family(spec.model.model_family))


def build_model(spec: JobSpec, local: JobSpec, device: torch.device, rank: int,
                wrap: Callable[[torch.nn.Module], torch.nn.Module], startup: dict | None = None
                ) -> tuple[CachedBase, object]:
    """Load, prepare, wrap and compile the transformer: (its parts, compile artifacts or None). The artifacts
    add their publishing time to ``startup``."""
    transformer, adapter, lora_init = build_transformer(local, device)
    tread = TokenRouter.from_spec(transformer, spec.train.tread_config)  # hooks before wrap and compile
    cast_trainable_params(spec.train, [p for p in transformer.parameters() if p.requires_grad])  # before wrap
    model = wrap(transformer)
    artifacts = None
    if spec.train.compile:
        from flux_ray.train.compile_cache import CompileArtifacts

        if spec.train.compile_cache:
            artifacts = CompileArtifacts(spec, dict(transformer.config), device, rank, startup)
            artifacts.load()
        compile_model(model, spec)
    return CachedBase(key="", transformer=transformer, model=model, adapter=adapter, lora_init=lora_init,
                      tread=tread), artifacts


def build_loop_parts(spec: JobSpec, device: torch.device, rank: int, world_size: int,
                     wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
                     reuse_base: bool = False) -> LoopParts:
    """Everything the loop needs. ``reuse_base``: one worker in a long-lived process (a sweep trial) takes
    the transformer from, and leaves it in, the process's :mod:`base_cache`."""
    from flux_ray.node_cache import localize

    t_build = time.perf_counter()
    torch.manual_seed(spec.train.seed)
    # s3:// model, LoRA and prompt inputs are read from this node's copy; cache keys name the spec's URIs.
    local = localize(spec)
    built = base_cache.take(spec, device) if reuse_base else None
    startup, artifacts = {"startup_reused_base": int(built is not None)}, None
    # inductor's compile workers come up while the base loads, not inside the first step (train/startup.py)
    warm_s = warm_compile_workers(spec, device) if built is None else None
    if warm_s is not None:
        startup["startup_compile_workers_s"] = warm_s
    t_load = time.perf_counter()
    if built is None:
        built, artifacts = build_model(spec, local, device, rank, wrap, startup)
        if reuse_base and base_cache.reusable(spec):
            built.key = base_cache.base_key(spec, device)
            base_cache.keep(built, device)
    startup["startup_load_s"] = time.perf_counter() - t_load
    transformer, adapter, lora_init, tread, model = (built.transformer, built.adapter, built.lora_init,
                                                     built.tread, built.model)
    params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: DTensors under FSDP
    optimizer = build_optimizer(spec.train, params, device)
    lr_scheduler = build_lr_scheduler(spec.train, optimizer)
    if spec.scaling.strategy == "deepspeed":
        model, optimizer, lr_scheduler = init_deepspeed(spec, model, params, optimizer, lr_scheduler, device)
        stepper = DeepSpeedStepper(model)
    else:  # several unwrapped replicas (worker._wrap) average their gradients in one all-reduce per step
        cls = FlatAllReduceStepper if spec.syncs_gradients_by_allreduce else TorchStepper
        stepper = cls(model, params, optimizer, lr_scheduler, spec.train.max_grad_norm)
    family = get_family(spec.model.model_family)
    loss_fn = build_loss_fn(spec, model, family.load_scheduler_config(local.model), tread)
    reader = CacheReader(spec, family.load_vae_config(local.model))
    train_samples, eval_samples = reader.split(spec.eval.eval_split_fraction)
    if not train_samples:
        raise ValueError("the cache holds no usable training images")
    sharded = world_size > 1 and spec.scaling.strategy == "fsdp"
    validate = None
    # A sharded model's forward is a collective: every rank renders, rank 0 writes.
    if (rank == 0 or sharded) and spec.eval.validation_step_interval and (spec.eval.validation_prompt or spec.eval.user_prompt_library):
        from flux_ray.core.validation import Validator

        validate = Validator(local, transformer, device, write=rank == 0, family=family)
    if device.type == "cuda":  # the load's peak (a full replica per GPU before FSDP shards it), then steps' own
        startup["startup_peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    startup["startup_build_s"] = time.perf_counter() - t_build
    return LoopParts(spec=spec, model=model, params=params, lr_scheduler=lr_scheduler,
                     loss_fn=loss_fn, reader=reader, train_samples=train_samples, eval_samples=eval_samples,
                     device=device, rank=rank, world_size=world_size,
                     gradient_accumulation_steps=spec.train.gradient_accumulation_steps,
                     state_io=StateIO(model, adapter, optimizer, sharded=sharded,
                                      optimizer_state=spec.scaling.strategy != "deepspeed"),
                     stepper=stepper, lora_init=lora_init,
                     validate=validate, after_step=artifacts.after_step if artifacts else None,
                     startup=startup)  # the same dict: the artifacts add their publishing time to it
