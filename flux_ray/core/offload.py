"""Group offload of the frozen base through diffusers' own hooks, made safe for LoRA training.

diffusers' group offloading (``diffusers.hooks.apply_group_offloading``, SimpleTuner's
``--enable_group_offload``) keeps each group of blocks (or each leaf layer) on the CPU, or on disk, and
copies it to the device for its forward only. It is written for inference; training needs three more things:

- The adapter stays on the device. diffusers would move it with its block, and its stream and disk modes
  restore a copy taken when the hooks were applied, undoing every optimizer step. So the hooks are applied
  to the base *before* the adapter exists, each group is pinned to the tensors it held then, and
  ``keep_unowned_on_device`` then puts the adapter on the device for good.
- Backward needs the frozen weights again (the gradient w.r.t. a layer's input is computed with W, and
  autograd saved W itself, whose data the group's post-forward hook has swapped out). A hook on each
  group's outputs onloads the group when backward reaches it, and holds it until backward has gone past
  all of the group's inputs (a hook on each input); the rest are offloaded when backward ends.
- Recomputation under gradient checkpointing runs the groups' forward hooks again during backward: they
  must not offload a held group, and stream prefetching (forward order) is skipped there.

diffusers' grouping, streams, pinned copies and disk files are used as they are. It saves GPU memory in
training only with gradient checkpointing: otherwise autograd keeps each layer's weight (a view of the
onloaded copy) from forward to backward, so the whole base is on the GPU at once.
"""
from __future__ import annotations

import torch
from diffusers.hooks.group_offloading import GroupOffloadingHook, ModuleGroup

_GROUP_OFFLOADING = "group_offloading"  # diffusers' hook name (hooks/group_offloading.py)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _tensors(obj) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    return []


def _grad_tensors(obj) -> list[torch.Tensor]:
    return [t for t in _tensors(obj) if t.requires_grad] if torch.is_grad_enabled() and not _in_backward() else []


class _TrainingGroup(ModuleGroup):
    """A diffusers ModuleGroup that onloads once, stays while held for backward, and owns fixed tensors."""

    onloaded: bool = False
    held: bool = False
    pending_inputs: int = 0
    host_copy: dict | None = None

    def onload_(self):
        if self.onloaded:
            if self.stream is not None:  # a prefetch may still be copying
                self.stream.synchronize()
            return
        super().onload_()
        self.onloaded = True

    def offload_(self):
        if self.held:
            return
        if self.pending_inputs and _in_backward():  # recomputed for backward: needed until its inputs' grads
            self.held = True
            return
        if self.host_copy is not None:  # frozen, so the host copy is current: drop the device copy, copy nothing
            for t, host in self.host_copy.items():
                t.data = host
        else:
            super().offload_()
        self.onloaded = False

    def hold_for_backward(self):
        self.held = True
        self.onload_()
        if self.stream is not None:
            self.stream.synchronize()

    def release(self):
        self.held = False
        if self.onloaded:
            self.offload_()


class _TrainingHook(GroupOffloadingHook):
    """diffusers' hook, except that a recomputation in backward prefetches nothing (it runs in forward order)."""

    def pre_forward(self, module, *args, **kwargs):
        if not _in_backward():
            return super().pre_forward(module, *args, **kwargs)
        next_group, self.next_group = self.next_group, None  # no forward-order prefetch while recomputing
        try:
            return super().pre_forward(module, *args, **kwargs)
        finally:
            self.next_group = next_group


class _BackwardOnload:
    """Onloads a group when backward reaches its outputs; offloads it once backward has passed its inputs."""

    def __init__(self, groups: list[_TrainingGroup]):
        self.groups = groups
        self._task = None

    def output_hook(self, group: _TrainingGroup):
        def hook(_grad):
            task = torch._C._current_graph_task_id()
            if task != self._task:  # first hook of this backward: offload everything when it ends
                self._task = task
                torch.autograd.Variable._execution_engine.queue_callback(self.release_all)
            group.hold_for_backward()
        return hook

    def input_hook(self, group: _TrainingGroup):
        def hook(_grad):
            group.pending_inputs -= 1
            if group.pending_inputs == 0 and group.held:
                group.release()
        return hook

    def release_all(self):
        self._task = None
        for g in self.groups:
            g.pending_inputs = 0
            g.release()

    def attach(self, module: torch.nn.Module, group: _TrainingGroup) -> None:
        def on_inputs(_module, args, kwargs):
            for t in _grad_tensors((args, kwargs)):
                group.pending_inputs += 1
                t.register_hook(self.input_hook(group))

        def on_outputs(_module, _args, output):
            for t in _grad_tensors(output):
                t.register_hook(self.output_hook(group))

        if group.onload_leader is None or group.onload_leader is module:
            module.register_forward_pre_hook(on_inputs, with_kwargs=True)
        if group.offload_leader is module:
            module.register_forward_hook(on_outputs)


def _pin_to_current_tensors(group: ModuleGroup) -> None:
    """Own the group's modules' tensors as they are now: an adapter attached later is not moved.

    In memory mode without a stream, diffusers offloads by copying back to new host memory each time
    (``module.to("cpu")``); the base is frozen, so the host copy made when the hooks were applied is kept
    and offloading only drops the device copy (the stream mode's pinned copies work the same way)."""
    params = list(group.parameters) + [p for m in group.modules for p in m.parameters()]
    buffers = list(group.buffers) + [b for m in group.modules for b in m.buffers()]
    group.parameters, group.buffers = list(dict.fromkeys(params)), list(dict.fromkeys(buffers))
    group.modules = []
    if group.stream is None and group.offload_to_disk_path is None:
        group.host_copy = {t: t.data for t in (*group.parameters, *group.buffers)}


def apply_group_offload(transformer: torch.nn.Module, model_spec, device: torch.device) -> int:
    """Offload the frozen base's groups to the CPU (or model_spec.group_offload_to_disk_path), onloaded to
    ``device`` for their forward and backward. Call before the adapter is attached; returns the group count."""
    if any(p.requires_grad for p in transformer.parameters()):
        raise ValueError("apply_group_offload takes the frozen base: attach the adapter after it")
    if model_spec.group_offload_use_stream and torch.device(device).type != "cuda":
        raise ValueError(f"model.group_offload_use_stream needs a CUDA device; this worker runs on {device}")
    transformer.enable_group_offload(
        onload_device=torch.device(device), offload_device=torch.device("cpu"),
        offload_type=model_spec.group_offload_type, num_blocks_per_group=model_spec.group_offload_blocks_per_group,
        use_stream=model_spec.group_offload_use_stream, offload_to_disk_path=model_spec.group_offload_to_disk_path)
    hooks = [(m, m._diffusers_hook.get_hook(_GROUP_OFFLOADING)) for m in transformer.modules()
             if hasattr(m, "_diffusers_hook") and m._diffusers_hook.get_hook(_GROUP_OFFLOADING) is not None]
    groups: list[_TrainingGroup] = []
    for _, hook in hooks:
        hook.__class__ = _TrainingHook
        hook.fn_ref.pre_forward = hook.pre_forward  # the registry bound the method when it registered the hook
        if not isinstance(hook.group, _TrainingGroup):
            _pin_to_current_tensors(hook.group)
            hook.group.__class__ = _TrainingGroup
            groups.append(hook.group)
    backward = _BackwardOnload(groups)
    for module, hook in hooks:
        backward.attach(module, hook.group)
    transformer._flux_ray_offload = backward
    return len(groups)


def keep_unowned_on_device(transformer: torch.nn.Module, device: torch.device) -> int:
    """Move every parameter and buffer no offload group owns (the adapter) to the device; returns how many."""
    backward: _BackwardOnload = transformer._flux_ray_offload
    owned = {id(t) for g in backward.groups for t in (*g.parameters, *g.buffers)}
    moved = 0
    for t in (*transformer.parameters(), *transformer.buffers()):
        if id(t) not in owned:
            before = t.device
            t.data = t.data.to(device)
            moved += t.device != before
    return moved
