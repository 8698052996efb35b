"""The Kontext reference cache of one image dataset (driver side): references matched by file name, decoded and
cropped on CPU tasks (data/references.py), VAE-encoded by the same actor pool as the images, written to
``references/<reference_key>/`` (cache_layout) beside the latents; incremental like the other caches."""
from __future__ import annotations

import pyarrow as pa

from flux_ray import storage
from flux_ray.data.cache import (CacheSummary, _commit, _committed_column, _decode_concurrency, _read_manifest,
                                 _Written, _write_and_commit, paired_rows, report_paired_skips, usable_image_rows,
                                 vae_stage)
from flux_ray.data.cache_layout import CachePaths, dataset_key, reference_id, reference_key, vae_identity


def cache_references(spec, ds_spec, reference_ds, vae_config: dict, image_manifest: dict, summary: CacheSummary,
                     reference_refs: list) -> dict:
    """A reference row (VAE mean and std) per usable image, made for the images whose (image, reference file) pair
    no committed row holds; missing and bad references are skip rows, reported with the dataset's bad images and
    subtracted from its usable count. Returns the committed reference manifest."""
    from ray.data import TaskPoolStrategy

    from flux_ray.data.references import reference_row

    st = spec.storage
    image_key = dataset_key(ds_spec, spec.model, vae_config, spec.cache.latent_dtype)
    image_uri = CachePaths(spec.cache.uri).latents(image_key)
    key = reference_key(image_key, reference_ds)
    uri = CachePaths(spec.cache.uri).references(key)
    storage.ensure_bucket(uri, st)
    meta = {"dataset_id": ds_spec.id, "reference_dataset_id": reference_ds.id,
            "conditioning_type": reference_ds.conditioning_type, "vae": vae_identity(spec.model, vae_config),
            "dtype": spec.cache.latent_dtype}
    manifest = _read_manifest(uri, st, "references", key, meta)
    rows = paired_rows(usable_image_rows(image_uri, image_manifest, st), reference_refs, "reference", reference_id)
    done = _committed_column(uri, manifest, st, "reference_id")
    todo = [r for r in rows if r["reference_id"] not in done]
    written = _Written(manifest, pipe=None)
    if todo:
        import ray

        pipe = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // 8, 256))).map(
            reference_row, fn_kwargs={"image_ds": ds_spec, "reference_ds": reference_ds, "storage_spec": st,
                                      "seed": spec.train.seed},
            compute=TaskPoolStrategy(size=_decode_concurrency(spec)), num_cpus=1)
        written = _write_and_commit(vae_stage(pipe, spec), uri, st, manifest,
                                    min(spec.cache.min_rows_per_file, spec.cache.commit_every), spec.cache.commit_every,
                                    f"references of {ds_spec.id} ({len(todo)} to encode)")
    index = pa.table({"sample_id": [r["sample_id"] for r in rows],
                      "reference_id": [r["reference_id"] for r in rows]})
    manifest = _commit(uri, st, written.manifest, [], index)
    stats = summary.datasets[ds_spec.id]
    n_skipped = report_paired_skips(uri, manifest, st, "reference_id", {r["reference_id"] for r in rows}, stats)
    stats["bytes_written"] += written.bytes
    stats["references"] = {"key": key, "reference_dataset": reference_ds.id,
                           "conditioning_type": reference_ds.conditioning_type,
                           "with_reference": len(rows) - n_skipped, "made_this_run": len(todo),
                           "bytes_written": written.bytes}
    return manifest
