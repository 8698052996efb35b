"""torch.compile artifacts shared through the run's storage, so a fresh node or trial skips inductor's codegen.

Inductor already caches compiled graphs on the local disk (``TORCHINDUCTOR_CACHE_DIR``), which helps only a
machine that compiled before. On KubeRay every trial's pod starts empty, so rank 0 uploads torch's portable
"mega-cache" (``torch.compiler.save_cache_artifacts``: FX graph, AOT autograd, autotune and dynamic-shape
(PGO) entries) to ``<cache.uri>/compile/<key>/`` after the first step, and again after any later step that
compiled a new graph (another aspect bucket's shape); every worker of a later run with the same key hot-loads all
of them (``load_cache_artifacts``) before compiling. The key hashes what decides the graphs: torch / Triton / CUDA
versions, the device, flux_ray's model and training code, the transformer's config and the spec options that
change the traced blocks (the SDPA backend too: inductor's own key ignores it, see core/compile.py). A
shape the artifacts lack still compiles (and is then published for the next run), and a load that fails falls
back to compiling. No Ray import.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch

from flux_ray import storage
from flux_ray.data.cache_layout import digest

log = logging.getLogger("flux_ray.compile_cache")

# Spec fields that change the compiled blocks' graphs (shapes are handled by the graphs' own keys).
SPEC_FIELDS = {
    "model": {"base_model_precision", "base_model_default_dtype", "model_flavour"},
    "lora": {"lora_type", "lora_rank", "lora_dropout", "flux_lora_target", "peft_lora_target_modules",
             "lycoris_config", "lora_init_type"},
    "train": {"compile", "dynamo_mode", "attention_backend", "gradient_checkpointing", "gradient_checkpointing_interval",
              "tread_config", "mixed_precision", "flux_attention_masked_training", "train_batch_size"},
}
_CODE_DIRS = ("core",)  # the modules whose code is traced into the blocks' graphs


def _code_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for d in _CODE_DIRS:
        for p in sorted((root / d).glob("*.py")):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _device_identity(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"name": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
                "cuda": torch.version.cuda}
    return {"type": device.type}


def artifact_key(spec, transformer_config: dict, device: torch.device) -> str:
    """Everything that decides the compiled graphs, hashed."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    ident = {"torch": torch.__version__, "triton": triton_version, "device": _device_identity(device),
             "code": _code_digest(), "transformer": transformer_config,
             "spec": spec.model_dump(mode="json", include=SPEC_FIELDS)}
    return digest(ident)


class CompileArtifacts:
    """Fetch before compiling (every worker); publish after each step that compiled something new (rank 0).

    The artifacts of one key are a folder of blobs named by their content's hash, never overwritten: each
    process publishes what it has compiled or hit so far (torch's serializer is cumulative within a process),
    replacing only its own earlier blob, which the new one contains. A run that saw other bucket shapes than
    an earlier one adds its blob beside the earlier one's, so no shape is lost, and concurrent trials never
    write the same name. A worker loads every blob of its key."""

    def __init__(self, spec, transformer_config: dict, device: torch.device, rank: int,
                 timings: dict | None = None):
        self.timings = {} if timings is None else timings  # startup_compile_publish_s: seconds publishing took
        self.uri = storage.join(spec.cache.uri, "compile", artifact_key(spec, transformer_config, device))
        self.st, self.rank = spec.storage, rank
        self.loaded = False
        self.published: str | None = None  # this process's latest blob
        self._compiles_published = _compiles()  # compiles before this run's (another model in the process)

    def load(self) -> bool:
        """Hot-load every shared blob of this key; any failure means compiling as usual (a blob that fails
        is skipped, the others still load)."""
        try:
            blobs = storage.list_files(self.uri, self.st, suffixes=(".bin",))
        except Exception as e:  # noqa: BLE001 - a cache must never stop training
            log.warning("could not list compile artifacts %s (%s: %s): compiling", self.uri, type(e).__name__, e)
            return False
        if not blobs:
            log.info("no shared compile artifacts at %s: compiling", self.uri)
            return False
        for entry in blobs:
            try:
                info = torch.compiler.load_cache_artifacts(storage.read_bytes(entry.uri, self.st))
            except Exception as e:  # noqa: BLE001
                log.warning("could not load compile artifacts %s (%s: %s)", entry.uri, type(e).__name__, e)
                continue
            if info is not None:
                self.loaded = True
                log.info("loaded compile artifacts %s (%d bytes)", entry.uri, entry.size)
        return self.loaded

    def after_step(self, step: int) -> None:
        """Rank 0 publishes after any step that compiled something new: the first step of a cold run, and later
        a new bucket shape (or a dynamic-shape recompile) the shared blobs did not hold. A step that compiled
        nothing costs one counter read."""
        if self.rank != 0:
            return
        misses = _compiles()
        if misses == self._compiles_published:
            return
        self._compiles_published = misses
        t0 = time.perf_counter()
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                return
            blob = saved[0]
            uri = storage.join(self.uri, hashlib.sha256(blob).hexdigest()[:20] + ".bin")
            if not storage.exists(uri, self.st):
                storage.write_bytes_atomic(uri, blob, self.st)
            if self.published and self.published != uri:
                storage.delete(self.published, self.st)  # contained in the new blob
            self.published = uri
            log.info("published compile artifacts %s (%d bytes, after step %d)", uri, len(blob), step)
        except Exception as e:  # noqa: BLE001
            log.warning("could not publish compile artifacts under %s (%s: %s)", self.uri, type(e).__name__, e)
        finally:
            key = "startup_compile_publish_s"
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0


def _compiles() -> int:
    """Graphs inductor compiled in this process (cache misses; a hit on a loaded artifact is not one)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"]
