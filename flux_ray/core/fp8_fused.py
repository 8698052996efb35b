"""Frozen Linears that read one input as one FP8 GEMM (``model.base_compute_dtype: fp8``, core/fp8.py).

In each FLUX.1 block the projections that share an input become one ``Fp8Linear`` of their concatenated
weights: a double block's q/k/v (and its text stream's), set as diffusers' own ``to_qkv`` / ``to_added_qkv``
with ``fused_projections``; a single block's MLP input and q/k/v (N = 21,504 instead of 12,288 + 3 x 3,072),
through ``single_block_forward``, diffusers' ``FluxSingleTransformerBlock.forward`` with the fused GEMM. The
input gradient then sums the members inside one GEMM, and the input is quantised once.

Each member's LoRA stays in its PEFT layer (same names, state dicts, optimizer, checkpoints); the fused module
runs the members' A as one GEMM and their scaled B as one block-diagonal GEMM. Fusing changes only the scales
that the members now share (the weight's per-input-column amax for the gradient GEMM, the gradient's per-row
amax).
"""
from __future__ import annotations

from types import MethodType, SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from flux_ray.core.fp8 import Fp8Linear, _fp8_eligible


class Fp8FusedProjections(torch.nn.Module):
    """Linears that read one input (``members``: PEFT LoRA layers or plain Linears, frozen bases) as one FP8
    GEMM of their concatenated weights, each member's LoRA added to its slice of the output.

    The members stay where they are and keep their LoRA parameters (they are not registered here); each one's
    base becomes an ``Fp8Slice`` of this GEMM, so calling a member alone still computes its own output."""

    def __init__(self, members: list[torch.nn.Module], emulate: bool = False):
        super().__init__()
        bases = [_base_of(m) for m in members]
        weight = torch.cat([b.weight.detach() for b in bases])
        bias = None if bases[0].bias is None else torch.cat([b.bias.detach() for b in bases])
        self.base = Fp8Linear(SimpleNamespace(weight=weight, bias=bias), emulate=emulate)
        self.sizes = [b.out_features for b in bases]
        self._members = tuple(members)  # a tuple is not registered: parameters keep their PEFT names
        start = 0
        for m, size in zip(members, self.sizes):
            if hasattr(m, "base_layer"):
                m.base_layer = Fp8Slice(self, start, start + size)
            start += size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        active = [_active_adapters(m) for m in self._members]
        if not any(active):
            return out
        if all(len(a) == 1 for a in active) and all(_plain(m, a[0]) for m, a in zip(self._members, active)):
            # one A GEMM over the members' stacked A, one B GEMM with their scaled B on the block diagonal
            loras = [(m.lora_A[a[0]].weight, m.lora_B[a[0]].weight * m.scaling[a[0]])
                     for m, a in zip(self._members, active)]
            h = F.linear(x.to(loras[0][0].dtype), torch.cat([a for a, _ in loras]))
            return (out + F.linear(h, torch.block_diag(*[b for _, b in loras]))).to(out.dtype)
        parts = list(out.split(self.sizes, dim=-1))  # PEFT's own per-adapter sum, member by member
        for i, (m, names) in enumerate(zip(self._members, active)):
            for name in names:
                xa = m.lora_dropout[name](x.to(m.lora_A[name].weight.dtype))
                parts[i] = parts[i] + m.lora_B[name](m.lora_A[name](xa)) * m.scaling[name]
        return torch.cat(parts, dim=-1).to(out.dtype)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class Fp8Slice(torch.nn.Module):
    """A fused projection's member base: its rows of the group's FP8 GEMM (the fused module computes the group
    at once; this path serves a member called alone)."""

    def __init__(self, group: Fp8FusedProjections, start: int, end: int):
        super().__init__()
        self._group, self.start, self.end = (group,), start, end  # in a tuple: not a submodule
        self.in_features, self.out_features = group.base.in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group[0].base(x)[..., self.start:self.end]

    def dequantized_weight(self) -> torch.Tensor:
        return self._group[0].base.dequantized_weight()[self.start:self.end]

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.end} of a fused FP8 projection"


def _base_of(m: torch.nn.Module) -> torch.nn.Module:
    return getattr(m, "base_layer", m)


def _active_adapters(m: torch.nn.Module) -> list[str]:
    """The LoRA adapters PEFT's own forward would add for this member (none when disabled or merged)."""
    if not hasattr(m, "lora_A") or m.disable_adapters or m.merged:
        return []
    return [a for a in m.active_adapters if a in m.lora_A]


def _plain(m: torch.nn.Module, name: str) -> bool:
    return isinstance(m.lora_dropout[name], torch.nn.Identity)


def _fusable(m: torch.nn.Module) -> bool:
    """A frozen FP8-eligible Linear, bare or as a vanilla PEFT LoRA layer (no DoRA or other variant, no LoRA
    bias, no forward of its own such as LyCORIS patches in)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = _base_of(m)
    if m is not base and (type(m) is not LoraLinear or getattr(m, "lora_variant", None)
                          or any(getattr(m, "lora_bias", {}).values())):
        return False
    return _fp8_eligible("", base) and "forward" not in vars(base) and "forward" not in vars(m)


QKV = ("to_q", "to_k", "to_v")
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


class QkvGiven(torch.nn.Module):
    """A single block's ``attn.to_qkv`` once the block computes q/k/v in its fused GEMM: diffusers' processor
    receives them as its ``hidden_states`` (its only use of them is ``to_qkv(hidden_states).chunk(3)``)."""

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return qkv


def single_block_forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                         image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                         joint_attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``FluxSingleTransformerBlock.forward`` (0.42) with ``proj_mlp`` and q/k/v as one GEMM."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp, qkv = self.proj_mlp_qkv(norm_hidden_states).split([self.mlp_hidden_dim, 3 * self.attn.inner_dim], dim=-1)
    mlp_hidden_states = self.act_mlp(mlp)
    attn_output = self.attn(hidden_states=qkv, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    hidden_states = gate.unsqueeze(1) * self.proj_out(hidden_states)
    hidden_states = residual + hidden_states
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _fusable_group(members: list[torch.nn.Module]) -> bool:
    return all(_fusable(m) for m in members) and len(
        {(_base_of(m).bias is None, _base_of(m).in_features) for m in members}) == 1


def fuse_projections(transformer: torch.nn.Module, *, emulate: bool = False) -> int:
    """Fuse each FLUX.1 block's shared-input projections where every member can be fused (a vanilla PEFT LoRA
    layer or a bare frozen Linear). Returns how many fused GEMMs were made."""
    count = 0
    for blk in transformer.transformer_blocks:
        attn = getattr(blk, "attn", None)
        if type(attn).__name__ != "FluxAttention" or attn.fused_projections or attn.added_kv_proj_dim is None:
            continue
        groups = [("to_qkv", [getattr(attn, n) for n in QKV]), ("to_added_qkv", [getattr(attn, n) for n in ADDED_QKV])]
        if all(_fusable_group(ms) for _, ms in groups):
            for name, members in groups:  # diffusers' own names: its processor calls them when fused_projections
                setattr(attn, name, Fp8FusedProjections(members, emulate=emulate))
                count += 1
            attn.fused_projections = True
    for blk in transformer.single_transformer_blocks:
        attn = getattr(blk, "attn", None)
        if (type(blk).__name__ != "FluxSingleTransformerBlock" or type(attn).__name__ != "FluxAttention"
                or attn.fused_projections or "forward" in vars(blk)):
            continue
        members = [blk.proj_mlp, *(getattr(attn, n) for n in QKV)]
        if _fusable_group(members):
            blk.proj_mlp_qkv = Fp8FusedProjections(members, emulate=emulate)
            attn.to_qkv, attn.fused_projections = QkvGiven(), True
            blk.forward = MethodType(single_block_forward, blk)
            count += 1
    return count
