"""TREAD token routing (arXiv 2501.04765; SimpleTuner's ``tread_config``): a training-only speed lever.

For each route, a random ``selection_ratio`` of the image tokens skips blocks ``start..end`` (indices over
the double then the single blocks, FLUX.1's 19 + 38, FLUX.2's 8 + 48 ([dev]); negative ones count from the
end). The blocks run on the kept image tokens plus every text token; after block ``end`` the routed tokens
return unchanged to their positions. Two block shapes are routed: FLUX.1's blocks and FLUX.2's double blocks
take the image tokens as ``hidden_states`` beside the text and return (text, image); FLUX.2's single blocks
take the joint [text; image] sequence (``encoder_hidden_states=None``) and return it.
One kept set serves the whole batch, so the rotary table (and the optional joint attention mask) is
row-selected rather than gathered per sample.

The router works through forward hooks on the route's blocks: outside our checkpointing wrapper (the
recomputation sees the gathered input), and under regional compile dynamo traces them as small frames of
their own beside each block's ``forward`` (tests/core/test_tread.py checks the result is unchanged). The
hooks do nothing unless FluxLossFn arms the router for one training forward (``with router.active(plan)``):
eval loss and validation never route.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
from dataclasses import dataclass

import torch

from flux_ray.core.checkpointing import transformer_blocks



def block_arg_names(block: torch.nn.Module) -> tuple[str, ...]:
    """The block's forward parameters in order (FLUX.1: ..., temb, ...; FLUX.2 double: temb_mod_img, temb_mod_txt)."""
    return tuple(inspect.signature(type(block).forward).parameters)[1:]


@dataclass(frozen=True)
class Route:
    """One route with its block indices resolved against the model (0 <= start <= end < num_blocks)."""
    selection_ratio: float
    start: int
    end: int


def resolve_routes(routes, num_blocks: int) -> list[Route]:
    """Spec routes (``TreadRoute``-like) -> Routes; ValueError naming the route on a bad index or overlap."""
    out = []
    for i, r in enumerate(routes):
        name = f"train.tread_config.routes[{i}]"
        idx = []
        for key in ("start_layer_idx", "end_layer_idx"):
            v = getattr(r, key)
            if not -num_blocks <= v < num_blocks:
                raise ValueError(f"{name}.{key}={v} is out of range for a transformer of {num_blocks} blocks "
                                 f"(valid: {-num_blocks}..{num_blocks - 1})")
            idx.append(v % num_blocks)
        if idx[0] > idx[1]:
            raise ValueError(f"{name}: start_layer_idx={r.start_layer_idx} (block {idx[0]}) comes after "
                             f"end_layer_idx={r.end_layer_idx} (block {idx[1]}) of {num_blocks} blocks")
        out.append(Route(r.selection_ratio, idx[0], idx[1]))
    order = sorted(range(len(out)), key=lambda i: out[i].start)
    for a, b in itertools.pairwise(order):
        if out[b].start <= out[a].end:
            raise ValueError(f"train.tread_config.routes[{b}] (blocks {out[b].start}..{out[b].end}) overlaps "
                             f"train.tread_config.routes[{a}] (blocks {out[a].start}..{out[a].end})")
    return out


def num_kept(img_len: int, selection_ratio: float) -> int:
    """Image tokens a route keeps: SimpleTuner's ``S - round(S * ratio)``, at least one."""
    return max(1, img_len - round(img_len * selection_ratio))


def draw_kept(img_len: int, selection_ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sorted indices of the image tokens that stay in the sequence (on the host)."""
    perm = torch.randperm(img_len, generator=generator)
    return perm[:num_kept(img_len, selection_ratio)].sort().values


class TokenRouter:
    """Hooks on a transformer's blocks that route image tokens around each Route while armed."""

    def __init__(self, transformer: torch.nn.Module, routes: list[Route]):
        self.routes = routes
        self._plan: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._skipped: dict[int, torch.Tensor] = {}
        blocks = transformer_blocks(transformer)
        self._handles = []
        for r, route in enumerate(routes):
            for i in range(route.start, route.end + 1):
                self._handles.append(blocks[i].register_forward_pre_hook(
                    functools.partial(self._enter, r, i == route.start, block_arg_names(blocks[i])), with_kwargs=True))
            self._handles.append(blocks[route.end].register_forward_hook(functools.partial(self._exit, r)))

    @classmethod
    def from_spec(cls, transformer: torch.nn.Module, tread_config) -> TokenRouter | None:
        if tread_config is None:
            return None
        return cls(transformer, resolve_routes(tread_config.routes, len(transformer_blocks(transformer))))

    def plan(self, txt_len: int, img_len: int, generator: torch.Generator | None,
             device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per route: (kept image indices, kept rows of the [txt; img] sequence), drawn on the host."""
        from flux_ray.core.step import to_device

        out = []
        for route in self.routes:
            kept = draw_kept(img_len, route.selection_ratio, generator)
            rows = torch.cat([torch.arange(txt_len), kept + txt_len])
            out.append((to_device(kept, device), to_device(rows, device)))
        return out

    @contextlib.contextmanager
    def active(self, plan: list[tuple[torch.Tensor, torch.Tensor]]):
        """Route the forwards run inside (one training forward)."""
        assert len(plan) == len(self.routes)
        self._plan = plan
        try:
            yield
        finally:
            self._plan = None
            self._skipped.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _enter(self, r: int, first: bool, arg_names: tuple[str, ...], module, args, kwargs):
        if self._plan is None:
            return None
        kept, rows = self._plan[r]
        kw = dict(zip(arg_names, args), **kwargs)
        if first:
            hidden = kw["hidden_states"]
            if kw.get("encoder_hidden_states") is None:  # a joint [text; image] block (FLUX.2 single)
                self._skipped[r] = hidden[:, rows.numel() - kept.numel():]
                kw["hidden_states"] = hidden.index_select(1, rows)
            else:
                self._skipped[r] = hidden
                kw["hidden_states"] = hidden.index_select(1, kept)
        if kw.get("image_rotary_emb") is not None:
            kw["image_rotary_emb"] = tuple(t.index_select(0, rows) for t in kw["image_rotary_emb"])
        extra = kw.get("joint_attention_kwargs")
        if extra and extra.get("attention_mask") is not None:  # (B, 1, 1, txt + img) key mask
            kw["joint_attention_kwargs"] = {**extra, "attention_mask": extra["attention_mask"].index_select(-1, rows)}
        return (), kw

    def _exit(self, r: int, module, args, output):
        if self._plan is None:
            return None
        kept = self._plan[r][0]
        joint = torch.is_tensor(output)  # a FLUX.2 single block: [text; kept image] in one sequence
        txt, img = output.split([output.shape[1] - kept.numel(), kept.numel()], 1) if joint else output
        img = self._skipped.pop(r).to(img.dtype).index_copy(1, kept, img)
        return torch.cat([txt, img], 1) if joint else (txt, img)
