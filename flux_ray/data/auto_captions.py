"""``caption_strategy: auto`` (driver side): caption the images that have no caption yet, once, on Ray Data.

Captions live in a Parquet manifest (columns ``filename`` = the image's rel_path, ``caption``, ``model_name``;
the layout SimpleTuner's captioning toolkit writes and ``caption_strategy: parquet`` reads), by default
``<cache.uri>/captions/<dataset id>-<hash>.parquet``. A run reads it first and captions only the images it has
no row for, so a second run captions nothing and an edited caption is what trains; delete a row to recaption.
The pipeline: read + decode on CPU tasks, then the captioner on an actor pool of ``captioner.num_actors``
(``captioner.gpus_per_actor`` of a GPU each with ``scaling.use_gpu``), before the cache's encoders.
"""
from __future__ import annotations

import logging
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq

from flux_ray import storage
from flux_ray.data.cache_layout import SOURCE_KEYS, digest

log = logging.getLogger("flux_ray.cache")
MANIFEST_COLUMNS = ("filename", "caption", "model_name")


def manifest_uri(ds, cache_uri: str) -> str:
    """``captioner.output_parquet``, or a file under the cache keyed by the source and the captioner's settings
    (a different model or query gets its own captions)."""
    c = ds.captioner
    if c.output_parquet:
        return c.output_parquet
    key = digest({"source": {k: getattr(ds, k) for k in SOURCE_KEYS}, "model": c.model_name,
                  "query": c.query_str, "max_new_tokens": c.max_new_tokens})
    return storage.join(cache_uri, "captions", f"{ds.id}-{key}.parquet")


def read_manifest(uri: str, st) -> dict[str, str]:
    """{filename: caption} of the manifest; {} when there is none yet."""
    if not storage.exists(uri, st):
        return {}
    fs, path = storage.resolve(uri, st)
    table = pq.read_table(path, filesystem=fs)
    missing = [c for c in ("filename", "caption") if c not in table.column_names]
    if missing:
        raise ValueError(f"caption manifest {uri}: no column(s) {missing} (expected {list(MANIFEST_COLUMNS)})")
    return {str(f): str(c or "") for f, c in zip(table["filename"].to_pylist(), table["caption"].to_pylist())
            if f is not None}


def write_manifest(uri: str, rows: dict[str, tuple[str, str]], st) -> None:
    """Write {filename: (caption, model_name)} sorted by filename, atomically."""
    names = sorted(rows)
    table = pa.table({"filename": names, "caption": [rows[n][0] for n in names],
                      "model_name": [rows[n][1] for n in names]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.ensure_bucket(uri, st)
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes(), st)


def caption_images(refs: list, ds, spec) -> dict[str, str]:
    """Run the captioner over ``refs`` on Ray Data; {rel_path: caption} ("" where an image failed to load)."""
    import ray
    from ray.data import ActorPoolStrategy

    from flux_ray.data.captioner import Captioner, load_for_caption

    c = ds.captioner
    share = {"num_gpus": c.gpus_per_actor} if spec.scaling.use_gpu else {"num_cpus": 1}
    pipe = ray.data.from_items([asdict(r) for r in refs], override_num_blocks=max(1, min(len(refs) // 8, 256)))
    pipe = pipe.map(load_for_caption, fn_kwargs={"dataset_spec": ds, "storage_spec": spec.storage}, num_cpus=1)
    pipe = pipe.map_batches(Captioner, batch_size=c.batch_size * 4, compute=ActorPoolStrategy(size=c.num_actors),
                            fn_constructor_kwargs={"captioner_spec": c, "use_gpu": spec.scaling.use_gpu}, **share)
    out: dict[str, str] = {}
    failed = []
    for row in pipe.iter_rows():
        out[row["rel_path"]] = row["caption"]
        if row["error"]:
            failed.append(row["rel_path"])
    if failed:
        log.warning("dataset %s: %d images could not be read for captioning (e.g. %s)", ds.id, len(failed), failed[0])
    return out


class AutoCaptions:
    """The ``sources.AutoCaptioner`` of one dataset: manifest rows first, the captioner for the rest.

    ``captioned`` counts the images captioned by this run (0 on a rerun); ``uri`` is the manifest."""

    def __init__(self, ds, spec):
        self.ds, self.spec, self.captioned = ds, spec, 0
        self.uri = manifest_uri(ds, spec.cache.uri)

    def __call__(self, refs: list) -> dict[str, str]:
        st = self.spec.storage
        known = read_manifest(self.uri, st)
        todo = [r for r in refs if r.rel_path not in known]
        log.info("dataset %s: %d images without a .txt caption, %d in %s, %d to caption with %s", self.ds.id,
                 len(refs), len(refs) - len(todo), self.uri, len(todo), self.ds.captioner.model_name)
        if todo:
            fs, path = storage.resolve(self.uri, st)
            existing = pq.read_table(path, filesystem=fs).to_pylist() if known else []
            rows = {r["filename"]: (r["caption"] or "", r.get("model_name") or "") for r in existing}
            new = caption_images(todo, self.ds, self.spec)
            rows.update({name: (text, self.ds.captioner.model_name) for name, text in new.items()})
            write_manifest(self.uri, rows, st)
            known.update(new)
            self.captioned = len(new)
        return {r.rel_path: known.get(r.rel_path, "") for r in refs}
