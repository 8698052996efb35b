"""The cache pipeline end to end through Ray Data on CPU with the tiny model, with a stage breakdown.

Generates N demo images, then times: the whole `run_cache` (listing, decode, VAE actor pool, text
actor pool, Parquet, manifests), and each stage alone on the same images (decode+crop tasks
materialized; the VAE encoder on the materialized decoded rows; the text encoder on the unique
captions). Prints a table of images/s per stage.

usage: python bench/cache_pipeline_bench.py [--images 300] [--num-cpus 8] [--workdir /tmp/flux_ray_cache_bench]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--num-cpus", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/flux_ray_cache_bench")
    args = ap.parse_args()

    import ray
    from ray.data import ActorPoolStrategy

    from flux_ray import job
    from flux_ray.core.tiny import write_tiny_flux
    from flux_ray.data import sources
    from flux_ray.data.cache import run_cache
    from flux_ray.data.cache_layout import sample_id
    from flux_ray.data.demo import write_demo_data
    from flux_ray.data.decode import DecodeAndCrop
    from flux_ray.data.encoders import TextEncoder, VaeEncoder
    from flux_ray.spec import load_spec

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    write_tiny_flux(work / "tiny")
    write_demo_data(work / "images", n=args.images)
    spec = load_spec("jobs/demo.yaml", [f"model.pretrained_model_name_or_path={work}/tiny",
                                        f"datasets.demo.instance_data_dir={work}/images",
                                        f"cache.uri={work}/cache", f"output.uri={work}/out"])
    job.init_ray(args.num_cpus)
    rows = []
    t0 = time.perf_counter()
    summary = run_cache(spec)
    total = time.perf_counter() - t0
    rows.append(("run_cache end to end", args.images, total))

    ds_spec = spec.datasets[0]
    t0 = time.perf_counter()
    refs = sources.list_images(ds_spec, spec.storage)
    captions = sources.captions_for(refs, ds_spec, spec.storage)
    rows.append(("list + captions (driver)", len(refs), time.perf_counter() - t0))
    items = [dict(r.__dict__, sample_id=sample_id(r)) for r in refs]
    t0 = time.perf_counter()
    decoded = ray.data.from_items(items).map(DecodeAndCrop, fn_constructor_kwargs={
        "dataset_spec": ds_spec, "storage_spec": spec.storage},
        compute=ActorPoolStrategy(min_size=1, max_size=4)).materialize()
    rows.append(("decode + crop (CPU tasks)", len(items), time.perf_counter() - t0))
    t0 = time.perf_counter()
    decoded.map_batches(VaeEncoder, batch_size=spec.cache.vae_batch_size,
                        compute=ActorPoolStrategy(size=spec.cache.num_vae_actors),
                        fn_constructor_kwargs={"model_spec": spec.model}, num_cpus=1).materialize()
    rows.append(("VAE encode (actor pool)", len(items), time.perf_counter() - t0))
    unique = sorted(set(captions.values()))
    t0 = time.perf_counter()
    ray.data.from_items([{"caption_id": sources.caption_id(c), "caption": c} for c in unique]).map_batches(
        TextEncoder, batch_size=spec.cache.text_batch_size, compute=ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"model_spec": spec.model}, num_cpus=1).materialize()
    rows.append(("text encode (unique captions)", len(unique), time.perf_counter() - t0))

    print(f"\ncache pipeline, tiny Flux, {args.images} images, {args.num_cpus} logical CPUs\n")
    print("| stage | items | seconds | items/s |\n|---|---|---|---|")
    for name, n, s in rows:
        print(f"| {name} | {n} | {s:.1f} | {n / s:.1f} |")
    d = summary.datasets["demo"]
    print(f"\nusable {d['usable']}, skipped {d['skipped']}, buckets {d['buckets']}, "
          f"unique captions {summary.unique_captions}, bytes written {summary.bytes_written}")


if __name__ == "__main__":
    main()
