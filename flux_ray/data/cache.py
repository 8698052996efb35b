"""The cache job (driver side): images -> buckets/crops -> VAE latents + text embeddings -> Parquet.

Runs as Ray Data pipelines: decode on CPU tasks (torch-free, so task workers start fast), VAE and text
encoders on actor pools (``cache.gpus_per_actor`` of a GPU each when there are GPUs). Captions are known
from the listing, so the text pipeline runs beside the latent pipelines (its own thread and Ray Data
execution), not after them. Work is committed in chunks of ``cache.commit_every`` images; a rerun
encodes only samples no committed shard holds (new images, or what a killed run had not committed).
Bad files become skip rows with a reason, so they are counted and not retried.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from flux_ray import storage
from flux_ray.data import sources
from flux_ray.data.cache_layout import (BLOB_COLUMNS, INDEX_CAPTION_IDS, MANIFEST_FILE, ROWS_PER_ROW_GROUP,
                                       SHARD_TARGET_BYTES, CachePaths, check_format, dataset_key, empty_manifest,
                                       index_file, mask_id, mask_key, new_run_id, rows_file, sample_id, shard_file,
                                       text_key, vae_identity)

log = logging.getLogger("flux_ray.cache")
EMPTY_CAPTION = ""


@dataclass
class CacheSummary:
    cache_uri: str
    datasets: dict = field(default_factory=dict)     # dataset id -> per-dataset numbers
    text_key: str = ""
    unique_captions: int = 0
    captions_encoded: int = 0
    text_seconds: float = 0.0
    text_stages: dict = field(default_factory=dict)
    text_bytes: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _read_manifest(uri: str, st, kind: str, key: str, meta: dict) -> dict:
    path = storage.join(uri, MANIFEST_FILE)
    if not storage.exists(path, st):
        return empty_manifest(kind, key, meta)
    manifest = storage.read_json(path, st)
    check_format(manifest, path)
    return manifest


def read_shard_rows(shard_uri: str, st, columns: list[str] | None = None) -> pa.Table:
    """A shard's small columns (its ``.rows.parquet`` side file): one request, whatever the shard's size."""
    fs, path = storage.resolve(rows_file(shard_uri), st)
    return pq.read_table(path, columns=columns, filesystem=fs)


def _committed_column(uri: str, manifest: dict, st, column: str) -> set:
    seen: set = set()
    for shard in manifest["shards"]:
        seen.update(read_shard_rows(storage.join(uri, shard["file"]), st, [column]).column(column).to_pylist())
    return seen


def write_shard(table: pa.Table, uri: str, storage_spec, run: str) -> dict:
    """Ray Data stage: write one batch as Parquet shards under ``<uri>/shards/<run>/`` and emit only their
    manifest entries, so the driver commits shards while the encoders keep running.

    Format 2 (cache_layout): shards of at most SHARD_TARGET_BYTES, one row per row group, no statistics
    (blobs), and each shard's small columns again in its ``.rows.parquet`` side file (written first: a
    listed shard always has one)."""
    rows = max(1, min(table.num_rows, SHARD_TARGET_BYTES * table.num_rows // max(1, table.nbytes)))
    out: dict = {"file": [], "rows": [], "bytes": []}
    for start in range(0, table.num_rows, rows):
        part = table.slice(start, rows)
        rel = shard_file(run)
        fs, path = storage.resolve(storage.join(uri, rel), storage_spec)
        if fs.type_name == "local":
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        small = part.drop_columns([c for c in part.column_names if c in BLOB_COLUMNS])
        pq.write_table(small, rows_file(path), filesystem=fs)
        pq.write_table(part, path, filesystem=fs, row_group_size=ROWS_PER_ROW_GROUP, write_statistics=False)
        out["file"].append(rel), out["rows"].append(part.num_rows), out["bytes"].append(fs.get_file_info(path).size)
    return out


@dataclass
class _Written:
    manifest: dict
    pipe: object                 # the executed dataset, for its stats
    bytes: int = 0
    commits: list = field(default_factory=list)  # [seconds since start, rows committed so far] per commit


def _write_and_commit(pipe, uri: str, st, manifest: dict, rows_per_file: int, commit_every: int,
                      label: str) -> _Written:
    """Append a ``write_shard`` stage to ``pipe``, run it, and commit the written shards to the manifest
    every ``commit_every`` rows and at the end (a killed run loses at most one uncommitted chunk)."""
    pipe = pipe.map_batches(write_shard, batch_size=rows_per_file, batch_format="pyarrow",
                            fn_kwargs={"uri": uri, "storage_spec": st, "run": new_run_id()})
    out, t0 = _Written(manifest, pipe), time.perf_counter()
    pending: list[dict] = []

    def commit():
        out.manifest = _commit(uri, st, out.manifest, pending)
        out.bytes += sum(e["bytes"] for e in pending)
        rows = (out.commits[-1][1] if out.commits else 0) + sum(e["rows"] for e in pending)
        out.commits.append([round(time.perf_counter() - t0, 2), rows])
        log.info("%s: committed %d rows", label, rows)
        pending.clear()

    for entry in pipe.iter_rows():
        pending.append({"file": entry["file"], "rows": int(entry["rows"]), "bytes": int(entry["bytes"])})
        if sum(e["rows"] for e in pending) >= commit_every:
            commit()
    if pending:
        commit()
    return out


def _commit(uri: str, st, manifest: dict, new_entries: list[dict], index: pa.Table | None = None) -> dict:
    manifest = dict(manifest, shards=manifest["shards"] + new_entries, version=manifest["version"] + 1)
    if index is not None:
        name = index_file(manifest['version'])
        fs, path = storage.resolve(storage.join(uri, name), st)
        pq.write_table(index, path, filesystem=fs)
        manifest["index"] = name
    storage.write_json_atomic(storage.join(uri, MANIFEST_FILE), manifest, st)
    return manifest


def _decode_concurrency(spec) -> int:
    if spec.cache.decode_concurrency:
        return spec.cache.decode_concurrency
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 4))
    # CPU encoders hold a CPU each, the text actors included: they run beside the decode tasks
    held = 0 if spec.scaling.use_gpu else spec.cache.num_vae_actors + spec.cache.num_text_actors
    return max(1, cpus - held - 1)


def _add_stage_stats(stages: dict, ds) -> None:
    """Accumulate Ray Data's per-operator numbers of an executed pipeline: rows, seconds, busy seconds.

    Reads Ray Data's stats summary (not a public API): if its shape changes, the summary just lacks
    the per-stage rates.
    """
    try:
        summaries, todo = [], [ds._get_stats_summary()]
        while todo:  # the last stage's summary and, through parents, every upstream operator's
            summ = todo.pop()
            summaries.append(summ)
            todo.extend(p for p in summ.parents if p is not None)
        for op in (op for summ in summaries for op in summ.operators_stats):
            rows = op.total_input_num_rows or (op.output_num_rows.sum if op.output_num_rows else 0)
            s = stages.setdefault(op.operator_name, {"rows": 0, "seconds": 0.0, "busy_seconds": 0.0})
            s["rows"] += int(rows or 0)
            s["seconds"] += float(op.time_total_s or 0.0)
            s["busy_seconds"] += float(op.wall_time.sum if op.wall_time else 0.0)
    except Exception as e:  # noqa: BLE001 - stats are informational
        log.debug("no Ray Data stage stats: %s", e)


def _stage_rates(stages: dict) -> dict:
    """Per stage: rows, its wall seconds, rows/s over them, and the busy seconds summed over its workers."""
    return {name: {"rows": s["rows"], "seconds": round(s["seconds"], 2), "busy_seconds": round(s["busy_seconds"], 2),
                   "rows_per_s": round(s["rows"] / s["seconds"], 2) if s["seconds"] else 0.0}
            for name, s in stages.items()}


def _ray_resources(spec) -> dict:
    """An encoder actor's share; SPREAD puts a pool's actors on different nodes of a multi-node cluster."""
    share = {"num_gpus": spec.cache.gpus_per_actor} if spec.scaling.use_gpu else {"num_cpus": 1}
    return {**share, "scheduling_strategy": "SPREAD"}


@dataclass
class Listing:
    refs: list
    captions: dict[str, list[str]]
    """image uri -> every caption of the image (at least one, in source order; training draws one per epoch)"""
    source: object
    """The DatasetSpec to read the images through: the dataset's own, or its extracted archive's folder."""
    auto_captioned: int = 0
    caption_manifest: str | None = None


def list_dataset(spec, ds_spec) -> Listing:
    """The dataset's image refs and their captions; an archive is extracted first and ``caption_strategy: auto``
    captions what has no caption yet (both Ray Data stages, both done once)."""
    from flux_ray.data.archives import extracted_dataset
    from flux_ray.data.auto_captions import AutoCaptions

    source = extracted_dataset(ds_spec, spec)
    refs = sources.list_images(source, spec.storage)
    auto = AutoCaptions(source, spec) if ds_spec.caption_strategy == "auto" else None
    captions = sources.load_captions(refs, source, spec.storage, auto).all_by_uri
    return Listing(refs, captions, source, auto.captioned if auto else 0, auto.uri if auto else None)


def vae_stage(pipe, spec):
    """``pipe`` (rows of uint8 pixels, ``bucket_w/h``, ``skip_reason``) through the VAE actor pool."""
    from ray.data import ActorPoolStrategy

    from flux_ray.data.encoders import VaeEncoder

    return pipe.map_batches(VaeEncoder, batch_size=spec.cache.vae_batch_size * spec.cache.vae_bucket_window,
                            fn_constructor_kwargs={"model_spec": spec.model, "storage": spec.storage,
                                                   "latent_dtype": spec.cache.latent_dtype,
                                                   "batch_size": spec.cache.vae_batch_size,
                                                   "use_gpu": spec.scaling.use_gpu,
                                                   "channels_last": spec.cache.vae_channels_last,
                                                   "compile_backend": spec.cache.encoder_compile_backend(
                                                       spec.scaling.use_gpu)},
                            compute=ActorPoolStrategy(size=spec.cache.num_vae_actors), **_ray_resources(spec))


def cache_dataset(spec, ds_spec, vae_config: dict, summary: CacheSummary, listing: Listing) -> dict:
    """Encode what is missing for one dataset (``listing``: list_dataset's); returns its committed manifest."""
    import ray

    from ray.data import TaskPoolStrategy

    from flux_ray.data.decode import decode_row

    st = spec.storage
    from flux_ray.families import get_family

    key = dataset_key(ds_spec, spec.model, vae_config, spec.cache.latent_dtype)
    uri = CachePaths(spec.cache.uri).latents(key)
    storage.ensure_bucket(uri, st)
    meta = {"dataset_id": ds_spec.id, "vae": vae_identity(spec.model, vae_config), "dtype": spec.cache.latent_dtype,
            **get_family(spec.model.model_family).latent_norm(vae_config)}
    manifest = _read_manifest(uri, st, "latents", key, meta)
    t0 = time.time()
    refs, captions = listing.refs, listing.captions
    done = _committed_column(uri, manifest, st, "sample_id")
    rows = [dict(asdict(r), sample_id=sample_id(r)) for r in refs]
    todo = [r for r in rows if r["sample_id"] not in done]
    log.info("dataset %s: %d images, %d cached, %d to encode -> %s", ds_spec.id, len(rows), len(rows) - len(todo),
             len(todo), uri)
    stages: dict = {}
    written = _Written(manifest, pipe=None)  # nothing to encode: no commits, no bytes
    if todo:
        # One streaming execution: the encoder actors load (and compile) once for the whole dataset. Shards are
        # written by tasks as rows come out; the driver commits them every cache.commit_every rows.
        pipe = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // 8, 256)))
        pipe = pipe.map(decode_row, fn_kwargs={"dataset_spec": listing.source, "storage_spec": st,
                                               "seed": spec.train.seed},
                        compute=TaskPoolStrategy(size=_decode_concurrency(spec)), num_cpus=1)
        pipe = vae_stage(pipe, spec)
        written = _write_and_commit(pipe, uri, st, manifest, min(spec.cache.min_rows_per_file, spec.cache.commit_every),
                                    spec.cache.commit_every, f"dataset {ds_spec.id} ({len(todo)} to encode)")
        manifest = written.manifest
        _add_stage_stats(stages, written.pipe)
    manifest = _commit(uri, st, manifest, [], caption_index(rows, captions))
    summary.datasets[ds_spec.id] = _dataset_stats(uri, st, manifest, len(rows), len(todo), time.time() - t0)
    summary.datasets[ds_spec.id].update(key=key, stages=_stage_rates(stages), bytes_written=written.bytes,
                                        commits=written.commits, steady_images_per_s=_steady_rate(written.commits))
    if listing.caption_manifest:
        summary.datasets[ds_spec.id].update(auto_captioned=listing.auto_captioned,
                                            caption_manifest=listing.caption_manifest)
    return manifest


def caption_index(rows: list[dict], captions: dict[str, list[str]]) -> pa.Table:
    """sample_id -> its first caption (caption, caption_id) and every caption's id (caption_ids, see
    cache_layout.INDEX_CAPTION_IDS): the reader draws one of them per epoch."""
    by_id = {r["sample_id"]: r for r in rows}
    texts = [captions.get(r["uri"]) or [EMPTY_CAPTION] for r in by_id.values()]
    return pa.table({"sample_id": list(by_id), "rel_path": [r["rel_path"] for r in by_id.values()],
                     "caption": [t[0] for t in texts], "caption_id": [sources.caption_id(t[0]) for t in texts],
                     INDEX_CAPTION_IDS: [[sources.caption_id(c) for c in t] for t in texts]})


def _steady_rate(commits: list) -> float:
    """Rows/s between the first and the last commit: the pipeline's rate once encoders are loaded and compiled."""
    if len(commits) < 2 or commits[-1][0] <= commits[0][0]:
        return 0.0
    return round((commits[-1][1] - commits[0][1]) / (commits[-1][0] - commits[0][0]), 2)


def _dataset_stats(uri: str, st, manifest: dict, seen: int, encoded_now: int, seconds: float) -> dict:
    fs, _ = storage.resolve(uri, st)
    index_ids = set(pq.read_table(storage.resolve(storage.join(uri, manifest["index"]), st)[1], filesystem=fs)
                    .column("sample_id").to_pylist())
    skipped, buckets = Counter(), Counter()
    skipped_files: dict[str, str] = {}
    for shard in manifest["shards"]:
        t = read_shard_rows(storage.join(uri, shard["file"]), st,
                            ["sample_id", "rel_path", "skip_reason", "bucket_w", "bucket_h"]).to_pylist()
        for r in t:
            if r["sample_id"] not in index_ids:
                continue
            if r["skip_reason"]:
                skipped[r["skip_reason"]] += 1
                skipped_files[r["rel_path"]] = r["skip_reason"]
            else:
                buckets[f"{r['bucket_w']}x{r['bucket_h']}"] += 1
    return {"images_seen": seen, "encoded_this_run": encoded_now, "usable": sum(buckets.values()),
            "skipped": dict(skipped), "skipped_files": skipped_files, "buckets": dict(sorted(buckets.items())),
            "seconds": round(seconds, 2), "images_per_s": round(encoded_now / seconds, 2) if seconds else 0.0}


def usable_image_rows(image_uri: str, image_manifest: dict, st) -> dict[str, dict]:
    """sample_id -> (rel_path, sizes, latent grid) of the image dataset's current, usable rows."""
    current = set(pq.read_table(storage.resolve(storage.join(image_uri, image_manifest["index"]), st)[1],
                                filesystem=storage.resolve(image_uri, st)[0]).column("sample_id").to_pylist())
    images = {}
    for shard in image_manifest["shards"]:
        for r in read_shard_rows(storage.join(image_uri, shard["file"]), st,
                                 ["sample_id", "rel_path", "skip_reason", "orig_w", "orig_h", "latent_h",
                                  "latent_w"]).to_pylist():
            if r["sample_id"] in current and not r["skip_reason"]:
                images[r["sample_id"]] = r
    return images


def paired_rows(images: dict[str, dict], refs: list, prefix: str, make_id) -> list[dict]:
    """One row per usable image with its conditioning file matched by name (``<prefix>_uri``, ``_rel_path``,
    ``_size``, ``_mtime_ns``; empty without one) and ``<prefix>_id = make_id(sample_id, ref or None)``."""
    from flux_ray.data.masks import match_by_name

    matched = match_by_name([r["rel_path"] for r in images.values()], refs)
    rows = []
    for sid, r in sorted(images.items()):
        ref = matched.get(r["rel_path"])
        rows.append(dict(r, **{f"{prefix}_id": make_id(sid, ref), f"{prefix}_uri": ref.uri if ref else "",
                               f"{prefix}_rel_path": ref.rel_path if ref else "",
                               f"{prefix}_size": ref.size if ref else 0,
                               f"{prefix}_mtime_ns": ref.mtime_ns if ref else 0}))
    return rows


def report_paired_skips(uri: str, manifest: dict, st, id_column: str, wanted: set, stats: dict) -> int:
    """Add the skip rows (of ``wanted`` ids) of a conditioning cache to a dataset's summary: counted by reason,
    listed by file, subtracted from its usable count. Returns how many were skipped."""
    skipped, skipped_files = Counter(), {}
    for shard in manifest["shards"]:
        for r in read_shard_rows(storage.join(uri, shard["file"]), st,
                                 [id_column, "rel_path", "skip_reason"]).to_pylist():
            if r[id_column] in wanted and r["skip_reason"]:
                skipped[r["skip_reason"]] += 1
                skipped_files[r["rel_path"]] = r["skip_reason"]
    for reason, n in skipped.items():
        stats["skipped"][reason] = stats["skipped"].get(reason, 0) + n
    stats["skipped_files"].update(skipped_files)
    stats["usable"] -= sum(skipped.values())
    return sum(skipped.values())


def cache_masks(spec, ds_spec, mask_ds, vae_config: dict, image_manifest: dict, summary: CacheSummary,
                mask_refs: list) -> dict:
    """The loss masks of one image dataset (data/masks.py): a row per usable image, made for the images whose
    (image, mask file) pair no committed row holds; empty and missing masks are skip rows, reported with the
    dataset's bad images and subtracted from its usable count. Returns the committed mask manifest."""
    from ray.data import TaskPoolStrategy

    from flux_ray.data.masks import mask_row

    st = spec.storage
    image_key = dataset_key(ds_spec, spec.model, vae_config, spec.cache.latent_dtype)
    image_uri = CachePaths(spec.cache.uri).latents(image_key)
    key = mask_key(image_key, mask_ds)
    uri = CachePaths(spec.cache.uri).masks(key)
    storage.ensure_bucket(uri, st)
    manifest = _read_manifest(uri, st, "masks", key, {"dataset_id": ds_spec.id, "mask_dataset_id": mask_ds.id})
    rows = paired_rows(usable_image_rows(image_uri, image_manifest, st), mask_refs, "mask", mask_id)
    done = _committed_column(uri, manifest, st, "mask_id")
    todo = [r for r in rows if r["mask_id"] not in done]
    written = _Written(manifest, pipe=None)
    if todo:
        import ray

        pipe = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // 32, 64))).map(
            mask_row, fn_kwargs={"image_ds": ds_spec, "mask_ds": mask_ds, "storage_spec": st,
                                 "seed": spec.train.seed},
            compute=TaskPoolStrategy(size=_decode_concurrency(spec)), num_cpus=1)
        written = _write_and_commit(pipe, uri, st, manifest, spec.cache.min_rows_per_file, spec.cache.commit_every,
                                    f"masks of {ds_spec.id} ({len(todo)} to make)")
    index = pa.table({"sample_id": [r["sample_id"] for r in rows], "mask_id": [r["mask_id"] for r in rows]})
    manifest = _commit(uri, st, written.manifest, [], index)
    stats = summary.datasets[ds_spec.id]
    n_skipped = report_paired_skips(uri, manifest, st, "mask_id", {r["mask_id"] for r in rows}, stats)
    stats["bytes_written"] += written.bytes
    stats["masks"] = {"key": key, "mask_dataset": mask_ds.id, "with_mask": len(rows) - n_skipped,
                      "made_this_run": len(todo), "bytes_written": written.bytes}
    return manifest


def cache_text(spec, captions: set[str], summary: CacheSummary) -> dict:
    """Encode each caption not yet in the text cache exactly once (the empty caption included)."""
    import ray
    from ray.data import ActorPoolStrategy

    from flux_ray.data.encoders import TextEncoder

    st = spec.storage
    key = text_key(spec.model, spec.cache.text_embed_dtype)
    uri = CachePaths(spec.cache.uri).text(key)
    storage.ensure_bucket(uri, st)
    manifest = _read_manifest(uri, st, "text", key, {"dtype": spec.cache.text_embed_dtype,
                                                    "t5_max_length": spec.model.t5_max_length})
    done = _committed_column(uri, manifest, st, "caption_id")
    todo = sorted({sources.caption_id(c): c for c in captions | {EMPTY_CAPTION}}.items())
    todo = [{"caption_id": cid, "caption": c} for cid, c in todo if cid not in done]
    summary.text_key, summary.unique_captions, summary.captions_encoded = key, len(captions | {EMPTY_CAPTION}), len(todo)
    if todo:  # runs beside the latent pipelines (run_cache's thread), so it writes only its own summary fields
        pipe = ray.data.from_items(todo).map_batches(
            TextEncoder, batch_size=spec.cache.text_batch_size,
            compute=ActorPoolStrategy(size=spec.cache.num_text_actors),
            fn_constructor_kwargs={"model_spec": spec.model, "storage": spec.storage,
                                   "embed_dtype": spec.cache.text_embed_dtype,
                                   "use_gpu": spec.scaling.use_gpu,
                                   "compile_backend": spec.cache.text_compile_backend(spec.scaling.use_gpu, len(todo))},
            **_ray_resources(spec))
        t0 = time.time()
        written = _write_and_commit(pipe, uri, st, manifest, spec.cache.min_rows_per_file, len(todo),
                                    f"captions ({len(todo)} to encode)")
        stages: dict = {}
        _add_stage_stats(stages, written.pipe)
        summary.text_stages, summary.text_bytes = _stage_rates(stages), written.bytes
        summary.text_seconds = round(time.time() - t0, 2)
        manifest = written.manifest
    return manifest


def run_cache(spec) -> CacheSummary:
    """Cache every enabled dataset of the spec (train and eval) and their captions.

    Every dataset is listed first, so the captions are known before any image is decoded: the text
    encoders run in a thread of their own beside the datasets' latent pipelines (on one GPU with
    ``cache.gpus_per_actor`` 0.5, the VAE and T5 actors share it; model loads and compiles overlap)."""
    from pathlib import Path

    from flux_ray.families import get_family
    from flux_ray.data.demo import write_demo_data
    from flux_ray.node_cache import localize_model

    t0 = time.time()
    family = get_family(spec.model.model_family)
    family.ensure_base(spec.model)
    vae_config = family.load_vae_config(localize_model(spec.model, spec.storage))  # s3:// model: this node's copy
    summary = CacheSummary(cache_uri=spec.cache.uri)
    listings = {}
    for ds_spec in spec.latent_datasets():
        if ds_spec.make_demo_if_missing and ds_spec.type == "local" and not Path(ds_spec.instance_data_dir).exists():
            write_demo_data(ds_spec.instance_data_dir)
        listings[ds_spec.id] = list_dataset(spec, ds_spec)
    captions = {c for lst in listings.values() for r in lst.refs for c in lst.captions.get(r.uri) or [EMPTY_CAPTION]}
    with ThreadPoolExecutor(1, thread_name_prefix="flux_ray-text") as pool:
        text = pool.submit(cache_text, spec, captions, summary)
        try:
            for ds_spec in spec.latent_datasets():
                manifest = cache_dataset(spec, ds_spec, vae_config, summary, listings[ds_spec.id])
                mask_ds = spec.mask_dataset(ds_spec)
                if mask_ds is not None:
                    cache_masks(spec, ds_spec, mask_ds, vae_config, manifest, summary,
                                sources.list_images(mask_ds, spec.storage))
                reference_ds = spec.reference_dataset(ds_spec)
                if reference_ds is not None:
                    from flux_ray.data.cache_references import cache_references

                    cache_references(spec, ds_spec, reference_ds, vae_config, manifest, summary,
                                     sources.list_images(reference_ds, spec.storage))
                if summary.datasets[ds_spec.id]["usable"] == 0:
                    raise ValueError(f"dataset {ds_spec.id!r}: no usable images after decoding "
                                     f"(skipped: {summary.datasets[ds_spec.id]['skipped']})")
        except BaseException:
            text.exception()  # let the text job finish (it commits what it encodes) before reporting this error
            raise
        text.result()
    summary.bytes_written = summary.text_bytes + sum(d["bytes_written"] for d in summary.datasets.values())
    summary.seconds = round(time.time() - t0, 2)
    storage.write_json_atomic(storage.join(spec.cache.uri, "last_cache_summary.json"), summary.to_dict(), spec.storage)
    return summary
