"""Training-state checkpoints as plain folders (Ray Train persists them to the run's storage)."""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LORA_FILE = "lora_peft.safetensors"
LORA_INIT_FILE = "lora_init.safetensors"  # PiSSA/OLoRA/LoftQ: the initial adapter, for export
STATE_FILE = "trainer_state.json"


@dataclass
class Position:
    """Where training is: optimizer steps done, and the epoch / batch index of the next batch."""
    step: int = 0
    epoch: int = 0
    batch_index: int = 0


def save_checkpoint(directory: str | Path, *, lora_sd: dict[str, torch.Tensor], optim_sd: dict, lr_scheduler,
                    position: Position, extra: dict | None = None, lora_init_sd: dict | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora_sd.items()}, str(d / LORA_FILE))
    if lora_init_sd:
        save_file({k: v.contiguous() for k, v in lora_init_sd.items()}, str(d / LORA_INIT_FILE))
    torch.save({"optimizer": optim_sd, "lr_scheduler": lr_scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}},
               d / "optim.pt")
    (d / STATE_FILE).write_text(json.dumps({"position": asdict(position), **(extra or {})}, indent=1))
    return d


def load_checkpoint(directory: str | Path, *, state_io, lr_scheduler) -> Position:
    """Restore LoRA weights, optimizer, scheduler and RNG states; returns the saved position."""
    d = Path(directory)
    blob = torch.load(d / "optim.pt", map_location="cpu", weights_only=False)
    state_io.restore(load_file(str(d / LORA_FILE)), blob["optimizer"])
    lr_scheduler.load_state_dict(blob["lr_scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    np.random.set_state(blob["rng"]["numpy"])
    random.setstate(blob["rng"]["python"])
    return Position(**json.loads((d / STATE_FILE).read_text())["position"])


def checkpoint_position(directory: str | Path) -> Position:
    return Position(**json.loads((Path(directory) / STATE_FILE).read_text())["position"])


def checkpoint_metrics(directory: str | Path) -> dict:
    """The report saved with a checkpoint (``save_checkpoint``'s ``extra``)."""
    return json.loads((Path(directory) / STATE_FILE).read_text()).get("metrics", {})
