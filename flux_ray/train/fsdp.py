"""FSDP2 sharding of the frozen base, one unit per transformer block (for GPUs too small for a replica)."""
from __future__ import annotations

import torch


def shard_transformer(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from flux_ray.core.checkpointing import transformer_blocks

    device = next(model.parameters()).device
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    for blk in transformer_blocks(model):
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
