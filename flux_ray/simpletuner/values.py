"""Parsers and converters for the SimpleTuner key table: a SimpleTuner value -> the flux_ray value.

A parser checks the JSON type (SimpleTuner's argparse takes strings for every option, so ``"20"``,
``"true"`` and ``"1e-4"`` are accepted); a converter changes units or names and raises
:class:`Unsupported` / :class:`AlreadyDefault` / :class:`Refused` when flux_ray cannot take the value.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class Unsupported(Exception):
    """A value flux_ray cannot take yet: the key is reported as unsupported with this reason and dropped."""


class Refused(Exception):
    """A value that makes the whole job unimportable (e.g. a full fine-tune): the import fails with this reason."""


class AlreadyDefault(Exception):
    """A value that asks for what flux_ray does anyway: the key is reported as dropped with this reason."""


class WrongType(Exception):
    """A value of the wrong type for its key (the message says what was expected)."""


@dataclass
class Context:
    """What a converter may need beyond the value: the SimpleTuner working dir, the config, the dataset."""
    workdir: Path
    config: dict[str, Any]
    dataset: dict[str, Any] | None = None

    @property
    def area(self) -> bool:
        """The dataset's sizes are megapixels (``resolution_type: area``)."""
        raw = (self.dataset or {}).get("resolution_type", self.config.get("resolution_type"))
        return raw == "area"

    @property
    def aws(self) -> bool:
        return (self.dataset or {}).get("type") == "aws"


# ---------------------------------------------------------------- value parsers (SimpleTuner passes strings too)

def as_str(v: Any, ctx: Context) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise WrongType("expected a string")
    return str(v)


def as_int(v: Any, ctx: Context) -> int:
    if isinstance(v, str) and re.fullmatch(r"\s*[-+]?\d+(\.0*)?\s*", v):
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
        raise WrongType("expected an integer")
    return int(v)


def as_float(v: Any, ctx: Context) -> float:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            raise WrongType("expected a number") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise WrongType("expected a number")
    return float(v)


def as_bool(v: Any, ctx: Context) -> bool:
    if isinstance(v, bool):
        return v
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if isinstance(v, str) and v.strip().lower() in words:
        return words[v.strip().lower()]
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise WrongType("expected true or false")


def as_dict(v: Any, ctx: Context) -> dict:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise WrongType("expected a JSON object") from None
    if not isinstance(v, dict):
        raise WrongType("expected a JSON object")
    return v


def as_str_list(v: Any, ctx: Context) -> list[str]:
    if isinstance(v, str):
        try:
            v = json.loads(v) if v.strip().startswith("[") else [p.strip() for p in v.split(",") if p.strip()]
        except json.JSONDecodeError:
            raise WrongType("expected a list of strings") from None
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        raise WrongType("expected a list of strings")
    return v


# ---------------------------------------------------------------- converters (value -> flux_ray value)

def resolve_path(v: str, ctx: Context) -> str:
    """A path SimpleTuner resolves against its working directory, made absolute."""
    p = Path(v).expanduser()
    return str(p if p.is_absolute() else (ctx.workdir / p).resolve())


def model_path(v: str, ctx: Context) -> str:
    """A hub id stays; a local path (``./x``, ``/x``, ``~/x`` or an existing folder) is resolved."""
    if v.startswith((".", "/", "~")) or (ctx.workdir / v).exists():
        return resolve_path(v, ctx)
    return v


def choice(table: dict[str, Any], unsupported: str) -> Callable[[Any, Context], Any]:
    """A SimpleTuner value -> its flux_ray value; any other value is unsupported (``{value}`` in the reason)."""
    def convert(v: Any, ctx: Context) -> Any:
        if v in table:
            return table[v]
        raise Unsupported(unsupported.format(value=v, known=", ".join(sorted(str(k) for k in table))))
    return convert


def same(*values: str) -> dict[str, str]:
    return {v: v for v in values}


def megapixels_to_edge(v: float, ctx: Context) -> int:
    """``resolution_type: area`` sizes are megapixels; flux_ray's ``pixel_area`` reads an edge whose square is
    the area (SimpleTuner's pixel area is ``megapixels * 1e6``, helpers/multiaspect/image.py)."""
    if ctx.area:
        return int(round(math.sqrt(v * 1e6)))
    if v != int(v):
        raise Unsupported(f"{v} is not a whole number of pixels (resolution_type is not area)")
    return int(v)


def optional_size(v: float, ctx: Context) -> int | None:
    return None if v == 0 else megapixels_to_edge(v, ctx)


def resolution_type(v: str, ctx: Context) -> str:
    if v == "area":
        return "pixel_area"  # its sizes are converted by megapixels_to_edge
    return choice(same("pixel", "pixel_area"), "resolution_type {value!r} is not one of {known}, area")(v, ctx)


def validation_resolution(v: str, ctx: Context) -> str:
    """SimpleTuner's ``WxH`` list or single edge; flux_ray needs sides that are multiples of 16."""
    out = []
    for item in v.split(","):
        parts = item.strip().lower().split("x")
        if not all(p.strip().isdigit() for p in parts) or len(parts) not in (1, 2):
            raise Unsupported(f"{item.strip()!r} is not WxH or a single edge in pixels")
        sides = [max(16, int(round(int(p) / 16)) * 16) for p in parts]
        out.append("x".join(str(s) for s in (sides * 2)[:2]))
    return ",".join(out)


def run_name(v: str, ctx: Context) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", v).strip("-")
    if not name:
        raise Unsupported(f"{v!r} has no letters or digits for a flux_ray job name")
    return name


def dataset_id(v: str, ctx: Context) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", v).strip("-") or "dataset"


def model_family(v: str, ctx: Context) -> str:
    if v != "flux":
        raise Refused(f"model_family {v!r}: flux_ray trains Flux.1 only")
    return v


def model_type(v: str, ctx: Context) -> None:
    if v != "lora":
        raise Refused(f"model_type {v!r}: flux_ray trains LoRA / LyCORIS adapters only (no full fine-tune)")
    raise AlreadyDefault("flux_ray trains LoRA / LyCORIS adapters (lora.lora_type)")


def max_train_steps(v: int, ctx: Context) -> int:
    if v <= 0:
        raise Refused("max_train_steps 0 makes SimpleTuner's run epoch-driven; flux_ray counts steps only: "
                      "set max_train_steps in the config")
    return v


def num_train_epochs(v: int, ctx: Context) -> None:
    steps = as_int(ctx.config.get("max_train_steps") or 0, ctx)
    if v > 0 and steps <= 0:
        raise Refused(f"num_train_epochs {v} without max_train_steps: flux_ray counts steps only "
                      "(train.max_train_steps); set max_train_steps in the config")
    if v > 0:
        raise Unsupported("flux_ray stops at train.max_train_steps only; the epoch limit is not applied")
    raise AlreadyDefault("0: max_train_steps decides the length, as in flux_ray")


def resume_from_checkpoint(v: str, ctx: Context) -> str | None:
    if v == "latest":
        return v
    if v.lower() in ("", "none", "null"):
        return None
    raise Unsupported("a SimpleTuner checkpoint is not a flux_ray checkpoint; resume with 'latest' in flux_ray's "
                      "run folder, or start from the LoRA file with lora.init_lora")


def validation_disable(v: bool, ctx: Context) -> None:
    if not v:
        raise AlreadyDefault("false: validation runs every eval.validation_step_interval")
    return None


def read_json_file(v: str, ctx: Context) -> dict:
    """A JSON object stored in a file (``lycoris_config``), read now so the spec carries it."""
    path = Path(resolve_path(v, ctx))
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise WrongType(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise WrongType(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise WrongType(f"{path} must hold a JSON object")
    return data


def prompt_library(v: str, ctx: Context) -> str:
    """``{"nickname": "prompt"}``: checked now, kept as a path (flux_ray reads it at validation time)."""
    path = resolve_path(v, ctx)
    lib = read_json_file(path, ctx)
    if not all(isinstance(p, str) for p in lib.values()):
        raise WrongType(f"{path} must map nicknames to prompt strings")
    return path


def dataset_type_backend(v: str, ctx: Context) -> str:
    if v == "aws":
        return "s3"
    return choice({"local": "local"}, "dataset type {value!r}: flux_ray reads local folders and S3 (aws)")(v, ctx)


def instance_data_dir(v: str, ctx: Context) -> str:
    if ctx.aws:
        raise Unsupported("an aws dataset reads aws_data_prefix; instance_data_dir is not used")
    return resolve_path(v, ctx)


def only_instance_prompt(v: bool, ctx: Context) -> str:
    if not v:
        raise AlreadyDefault("false: the dataset's caption_strategy applies")
    return "instanceprompt"


PARQUET_KEYS = ("path", "filename_column", "caption_column", "fallback_caption_column")


def parquet_manifest(v: dict, ctx: Context) -> dict:
    out = {k: v[k] for k in PARQUET_KEYS if v.get(k) is not None}
    if "path" in out:
        out["path"] = resolve_path(str(out["path"]), ctx)
    return out


def parquet_leftovers(v: dict) -> list[str]:
    """parquet sub-keys flux_ray has no field for (reported with the parquet row)."""
    return sorted(k for k in v if k not in PARQUET_KEYS)
