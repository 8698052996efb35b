"""One Flux flow-matching training step and the eval loss: the code the trainer and the benchmark run.

Speed notes (measured in bench/train_step_bench.py, recorded in bench/RESULTS.md):
- No host syncs: the step's CPU-drawn values (noise, sigmas, guidance; the batch itself) reach the GPU
  through pinned memory with non_blocking copies, so the host keeps queueing work while the GPU runs.
- Position ids are built once per (h, w, text length, device), not every step.
- Under autocast, PEFT's cast of each LoRA layer's input to the fp32 adapter dtype is skipped: autocast
  casts it straight back to bf16 for the matmul, so the values are bit-identical and ~1,700 casts a step
  (input and gradient) disappear. Only for dropout-free adapters (dropout on fp32 would round differently).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from flux_ray.core import flow
from flux_ray.core.adapters import AdapterSwitch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the host (pinned staging, non_blocking); other moves as ``.to``."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class FluxBatch:
    """A same-bucket batch from the cache, already on the device."""
    latents: torch.Tensor          # (B, 16, h, w), normalised VAE latents
    prompt_embeds: torch.Tensor    # (B, L, D) T5 (FLUX.2: stacked text-encoder layers)
    pooled: torch.Tensor | None    # (B, Dp) CLIP pooled; None for a family without one (FLUX.2)
    text_mask: torch.Tensor | None = None  # (B, L) T5 attention mask
    loss_mask: torch.Tensor | None = None  # (B, 1, h, w) in [0, 1]: weights the per-pixel loss (masked loss)
    prior_rows: tuple[int, ...] = ()       # regularisation samples: their target is the adapter-off prediction
    reference_latents: torch.Tensor | None = None  # (B, 16, rh, rw) normalised Kontext reference latents, or None

    TENSORS = ("latents", "prompt_embeds", "pooled", "text_mask", "loss_mask", "reference_latents")

    def map_tensors(self, fn) -> FluxBatch:
        """A copy with ``fn`` applied to every tensor field (None stays None)."""
        return replace(self, **{k: fn(getattr(self, k)) for k in self.TENSORS if getattr(self, k) is not None})

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, k) for k in self.TENSORS if getattr(self, k) is not None]

    def select(self, rows: list[int]) -> FluxBatch:
        """The batch of these rows (a regularisation subset); no prior rows of its own."""
        index = torch.tensor(rows, device=self.latents.device)
        return replace(self.map_tensors(lambda t: t.index_select(0, index)), prior_rows=())

    def to(self, device, dtype=None) -> FluxBatch:
        def mv(t):
            t = to_device(t, device)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return self.map_tensors(mv)


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def attention_context(backend: str, device: torch.device):
    """An explicit SDPA backend on CUDA (the default cuDNN pick crashed Flux steps on H200)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return contextlib.nullcontext() if backend == "auto" else sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])])
    name = "flash" if backend == "auto" else backend
    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


class FluxLossFn:
    """Computes the flow-matching loss of a transformer on a FluxBatch."""

    def __init__(self, transformer, flow_spec, *, scheduler_config: dict | None, fast_schedule: bool,
                 masked_attention: bool = False, autocast_dtype: torch.dtype | None = None,
                 attention_backend: str = "auto", tread=None, cuda_graphs: bool = False, uncast_lora: bool = True,
                 family=None):
        if family is None:
            from flux_ray.families import DEFAULT_FAMILY, get_family

            family = get_family(DEFAULT_FAMILY)
        self.family = family  # packing, position ids and extra inputs (flux_ray.families)
        self.transformer = transformer
        self.flow = flow_spec
        self.schedule = flow.SigmaSchedule(flow_spec, scheduler_config or {}, fast_schedule)  # resolved once
        self.masked = masked_attention
        self.autocast_dtype = autocast_dtype
        self.attention_backend = attention_backend
        self.tread = tread  # a core.tread.TokenRouter: armed for the training forward only
        # Blocks compiled as CUDA graphs (train.dynamo_mode reduce-overhead): each forward starts a new graph
        # generation, so the last one's outputs (already consumed by its backward) may be overwritten.
        self.cuda_graphs = cuda_graphs
        base = getattr(transformer, "module", transformer)
        self.guidance_embeds = bool(getattr(base.config, "guidance_embeds", False))
        self._ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # uncast_lora=False keeps PEFT's casts (bench/train_step_bench.py's uncast=0 lever)
        self._uncast_lora = _dropout_free_lora_layers(base) if autocast_dtype is not None and uncast_lora else []
        self._adapters: AdapterSwitch | None = None  # found on the first regularisation batch

    @property
    def fast_schedule(self) -> bool:
        return self.schedule.fast

    @property
    def scheduler_config(self) -> dict:
        return self.schedule.scheduler_config

    def _position_ids(self, h: int, w: int, text_len: int, device: torch.device):
        key = (h, w, text_len, str(device))
        if key not in self._ids:
            self._ids[key] = self.family.position_ids(h, w, text_len, device)
        return self._ids[key]

    def predict(self, batch: FluxBatch, noisy_packed: torch.Tensor, sigmas: torch.Tensor,
                guidance: torch.Tensor | None) -> torch.Tensor:
        b, _, h, w = batch.latents.shape
        device = batch.latents.device
        kwargs = self.family.transformer_inputs(batch)
        img_ids, txt_ids = self._position_ids(h, w, batch.prompt_embeds.shape[1], device)
        tokens = noisy_packed
        if batch.reference_latents is not None:  # Kontext: the reference's tokens follow the target's
            tokens, img_ids = flow.with_reference_tokens(noisy_packed, img_ids, batch.reference_latents)
        if self.masked and batch.text_mask is not None:
            kwargs["joint_attention_kwargs"] = {
                "attention_mask": flow.joint_attention_mask(batch.text_mask, tokens.shape[1])}
        if self.guidance_embeds:
            kwargs["guidance"] = to_device(guidance, device)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        ctx = torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with ctx, attention_context(self.attention_backend, device), _lora_input_cast_disabled(self._uncast_lora):
            pred = self.transformer(hidden_states=tokens, encoder_hidden_states=batch.prompt_embeds, timestep=sigmas.to(noisy_packed.dtype),
                                    img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **kwargs)[0]
        return pred if tokens is noisy_packed else pred[:, :noisy_packed.shape[1]]  # loss on the target only

    def __call__(self, batch: FluxBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training loss with freshly sampled noise, sigmas and guidance."""
        b = batch.latents.shape[0]
        latents = self.family.pack_latents(batch.latents)
        seq = latents.shape[1]
        sigmas = self.schedule.sample(b, seq, generator)
        sigmas = to_device(sigmas, latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = to_device(noise, latents.device).to(latents.dtype)
        guidance = flow.guidance_values(b, self.flow, generator)
        noisy = flow.noisy_latents(latents, noise, sigmas)
        target = self.target(batch, noisy, noise - latents, sigmas, guidance)
        routing = contextlib.nullcontext()
        if self.tread is not None:  # drawn after noise and sigmas, so those match a run without TREAD
            routing = self.tread.active(self.tread.plan(batch.prompt_embeds.shape[1], seq, generator, latents.device))
        with routing:
            pred = self.predict(batch, noisy, sigmas, guidance)
        return flow.velocity_loss(pred, target, self.flow.loss_type, self.flow.huber_c, weight=packed_loss_mask(batch))

    def target(self, batch: FluxBatch, noisy_packed: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor,
               guidance: torch.Tensor | None) -> torch.Tensor:
        """The regression target per sample: the flow velocity ``noise - latents``, except for regularisation rows,
        whose target is the base model's own prediction (adapters off, no grad) on the same noisy input, sigma and
        guidance: SimpleTuner's parent-teacher ("prior") regularisation. With a zero-initialised LoRA their loss
        starts at exactly zero, and it pulls the adapter back towards the base wherever it drifts."""
        if not batch.prior_rows:
            return velocity
        rows = list(batch.prior_rows)
        index = torch.tensor(rows, device=noisy_packed.device)
        if self._adapters is None:
            self._adapters = AdapterSwitch(getattr(self.transformer, "module", self.transformer))
        with torch.no_grad(), self._adapters.off():
            prior = self.predict(batch.select(rows), noisy_packed.index_select(0, index), sigmas.index_select(0, index),
                                 guidance[rows] if guidance is not None else None)
        return velocity.index_copy(0, index, prior.to(velocity.dtype))

    @torch.no_grad()
    def eval_loss(self, batch: FluxBatch, noise_seeds: list[int], num_sigmas: int) -> torch.Tensor:
        """Per-sample loss averaged over a fixed sigma grid with fixed per-sample noise (deterministic)."""
        b = batch.latents.shape[0]
        latents = self.family.pack_latents(batch.latents)
        sigma_grid = self.schedule.eval_grid(num_sigmas, latents.shape[1])
        noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s))
                             for s in noise_seeds]).to(latents.device, latents.dtype)
        guidance = torch.full((b,), float(self.flow.flux_guidance_value))
        weight = packed_loss_mask(batch)
        total = torch.zeros(b, device=latents.device)
        for sigma in sigma_grid.tolist():
            sigmas = torch.full((b,), sigma, device=latents.device)
            pred = self.predict(batch, flow.noisy_latents(latents, noise, sigmas), sigmas, guidance)
            total += flow.flow_loss(pred, noise, latents, self.flow.loss_type, self.flow.huber_c, reduce=False,
                                    weight=weight)
        return total / len(sigma_grid)


def packed_loss_mask(batch: FluxBatch) -> torch.Tensor | None:
    """The batch's (B, 1, h, w) loss mask as weights of the packed tokens' channels (B, h/2 * w/2, 64), or None."""
    if batch.loss_mask is None:
        return None
    return flow.pack_latents(batch.loss_mask.expand(-1, batch.latents.shape[1], -1, -1).contiguous())


def _dropout_free_lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """PEFT LoRA layers whose every adapter has no dropout (their input cast is a pure round trip)."""
    layers = []
    for m in model.modules():
        drop = getattr(m, "lora_dropout", None)
        if isinstance(drop, torch.nn.ModuleDict) and hasattr(m, "_cast_input_dtype") and len(drop) and all(
                isinstance(d, torch.nn.Identity) for d in drop.values()):
            layers.append(m)
    return layers


@contextlib.contextmanager
def _lora_input_cast_disabled(layers: list[torch.nn.Module]):
    """PEFT's ``cast_input_dtype_enabled = False`` on these layers for the duration (restored after)."""
    if not layers:
        yield
        return
    before = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.cast_input_dtype_enabled = b
