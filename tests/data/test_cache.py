"""The cache job on a real local Ray: incremental, resumable, deduplicated, robust to bad files, S3."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from flux_ray import storage
from flux_ray.data.cache_layout import CachePaths, dataset_key, text_key
from flux_ray.spec import load_spec

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _copy_images(src: str, dst, names: list[str]) -> None:
    os.makedirs(dst, exist_ok=True)
    for n in names:
        for ext in (".txt",):
            shutil.copy(os.path.join(src, os.path.splitext(n)[0] + ext), dst)
        shutil.copy(os.path.join(src, n), dst)


def _images(d: str) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.endswith((".png", ".jpg")))


def _manifest(spec, ds_index=0):
    from flux_ray.core.model import load_vae_config

    key = dataset_key(spec.datasets[ds_index], spec.model, load_vae_config(spec.model), spec.cache.latent_dtype)
    uri = CachePaths(spec.cache.uri).latents(key)
    return uri, storage.read_json(storage.join(uri, "manifest.json"), spec.storage)


def test_adding_images_encodes_only_the_new_ones(ray_session, tiny_model_dir, demo_data_dir, tmp_path, demo_spec):
    from flux_ray.data.cache import run_cache

    names = _images(demo_data_dir)
    data = tmp_path / "imgs"
    _copy_images(demo_data_dir, data, names[:12])
    spec = demo_spec(tiny_model_dir, str(data), tmp_path, cache={"uri": str(tmp_path / "cache")})  # its own cache
    first = run_cache(spec)
    assert first.datasets["demo"]["encoded_this_run"] == 12 and first.datasets["demo"]["usable"] == 12
    captions = {open(data / (os.path.splitext(n)[0] + ".txt")).read().strip() for n in names[:12]}
    assert first.unique_captions == len(captions) + 1  # + the empty caption for dropout
    assert first.captions_encoded == len(captions) + 1
    # per-stage numbers from Ray Data: every image went through decode and the VAE stage
    stages = first.datasets["demo"]["stages"]
    decode = next(v for k, v in stages.items() if "decode_row" in k)
    vae = next(v for k, v in stages.items() if "VaeEncoder" in k)
    assert decode["rows"] == 12 and vae["rows"] == 12 and decode["rows_per_s"] > 0 and vae["busy_seconds"] > 0
    assert any("TextEncoder" in k for k in first.text_stages) and first.text_seconds > 0
    # the commit timeline and bytes: what this run wrote, in the manifest's own numbers
    assert first.datasets["demo"]["commits"][-1][1] == 12
    _, manifest = _manifest(spec)
    assert first.datasets["demo"]["bytes_written"] == sum(s["bytes"] for s in manifest["shards"]) > 0
    assert first.bytes_written == first.text_bytes + first.datasets["demo"]["bytes_written"] and first.text_bytes > 0
    _copy_images(demo_data_dir, data, names[12:15])
    second = run_cache(spec)
    assert second.datasets["demo"]["encoded_this_run"] == 3 and second.datasets["demo"]["usable"] == 15
    assert second.datasets["demo"]["key"] == first.datasets["demo"]["key"]
    assert second.datasets["demo"]["commits"][-1][1] == 3
    third = run_cache(spec)
    assert third.datasets["demo"]["encoded_this_run"] == 0 and third.captions_encoded == 0
    assert third.datasets["demo"]["commits"] == [] and third.bytes_written == 0
    assert third.datasets["demo"]["steady_images_per_s"] == 0.0
    uri, manifest = _manifest(spec)
    total_rows = sum(s["rows"] for s in manifest["shards"])
    assert total_rows == 15
    assert all(s["rows"] > 1 for s in manifest["shards"])  # no one-row files
    # each committed row knows its bucket, original size and crop box
    row = pq.read_table(os.path.join(uri, manifest["shards"][0]["file"])).to_pylist()[0]
    assert row["bucket_w"] % 64 == 0 and row["orig_w"] > 0 and len(row["crop_box"]) == 4
    assert row["latent_h"] == row["bucket_h"] // 8


def test_steady_rate_is_rows_per_second_between_the_first_and_last_commit():
    from flux_ray.data.cache import _steady_rate

    assert _steady_rate([[100.0, 2000], [140.0, 4000], [180.0, 6000]]) == 50.0  # start-up before 100 s left out
    assert _steady_rate([[30.0, 512]]) == 0.0 and _steady_rate([]) == 0.0  # one commit: no rate


def test_changing_preprocessing_or_dtype_makes_a_new_cache(tiny_model_dir, demo_data_dir, tmp_path, demo_spec):
    from flux_ray.core.model import load_vae_config

    spec = demo_spec(tiny_model_dir, demo_data_dir, tmp_path)
    vae = load_vae_config(spec.model)
    base = dataset_key(spec.datasets[0], spec.model, vae, "bf16")
    assert base == dataset_key(spec.datasets[0].model_copy(), spec.model, vae, "bf16")
    assert base != dataset_key(spec.datasets[0].model_copy(update={"resolution": 256}), spec.model, vae, "bf16")
    assert base != dataset_key(spec.datasets[0].model_copy(update={"crop_style": "random"}), spec.model, vae, "bf16")
    assert base != dataset_key(spec.datasets[0], spec.model, vae, "fp32")
    assert base != dataset_key(spec.datasets[0], spec.model, {**vae, "scaling_factor": 1.0}, "bf16")
    assert text_key(spec.model, "bf16") != text_key(spec.model.model_copy(update={"tokenizer_max_length": 64}), "bf16")


def test_bad_files_are_skipped_with_reasons_and_counted(ray_session, tiny_model_dir, demo_data_dir, tmp_path, demo_spec):
    from flux_ray.data.cache import run_cache

    data = tmp_path / "mixed"
    _copy_images(demo_data_dir, data, _images(demo_data_dir)[:6])
    good = (data / _images(str(data))[0]).read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 3])
    (data / "not_an_image.png").write_text("hello")
    Image.new("RGB", (20, 20), "red").save(data / "tiny.png")
    Image.new("RGB", (900, 60), "blue").save(data / "sliver.png")
    buf = io.BytesIO()
    Image.new("CMYK", (128, 128), (0, 255, 0, 0)).save(buf, format="JPEG")
    (data / "cmyk.jpg").write_bytes(buf.getvalue())
    Image.new("P", (128, 96)).save(data / "palette.png")
    spec = demo_spec(tiny_model_dir, str(data), tmp_path, cache={"uri": str(tmp_path / "cache")},
                     overrides=["datasets.demo.minimum_image_size=32"])
    summary = run_cache(spec).datasets["demo"]
    assert summary["usable"] == 8  # 6 demo + CMYK + palette converted to RGB
    assert summary["skipped_files"] == {"truncated.png": "unreadable", "not_an_image.png": "unreadable",
                                        "tiny.png": "too_small", "sliver.png": "extreme_aspect"}
    assert summary["skipped"] == {"unreadable": 2, "too_small": 1, "extreme_aspect": 1}
    again = run_cache(spec).datasets["demo"]
    assert again["encoded_this_run"] == 0 and again["skipped"] == summary["skipped"]  # bad files not retried


def test_dataset_with_no_usable_image_fails_after_the_text_job_commits(ray_session, tiny_model_dir, tmp_path,
                                                                      demo_spec):
    """The text job runs beside the datasets: a dataset error waits for it, so its captions are committed, and
    the error names the dataset and the skip reasons."""
    from flux_ray.data.cache import run_cache

    data = tmp_path / "broken"
    data.mkdir()
    (data / "not_an_image.png").write_text("hello")
    (data / "not_an_image.txt").write_text("a caption nobody will train on")
    spec = demo_spec(tiny_model_dir, str(data), tmp_path, cache={"uri": str(tmp_path / "cache")})
    with pytest.raises(ValueError, match=r"dataset 'demo': no usable images after decoding .*'unreadable': 1"):
        run_cache(spec)
    text_uri = CachePaths(spec.cache.uri).text(text_key(spec.model, spec.cache.text_embed_dtype))
    manifest = storage.read_json(storage.join(text_uri, "manifest.json"), spec.storage)
    captions = {c for s in manifest["shards"]
                for c in pq.read_table(os.path.join(text_uri, s["file"]), columns=["caption"]).column("caption").to_pylist()}
    assert captions == {"", "a caption nobody will train on"}


def test_killed_cache_job_resumes_with_only_the_missing_work(ray_session, tiny_model_dir, demo_data_dir, tmp_path):
    """SIGKILL the `flux-ray cache` driver once chunks are committed; the rerun encodes only the rest.

    The last file of the folder is a named pipe that no one writes to: its decode task blocks, so the
    job commits the other blocks and can never finish. The kill point does not depend on timing."""
    images = tmp_path / "imgs"
    _copy_images(demo_data_dir, images, _images(demo_data_dir))
    fifo = images / "zz_never_written.png"
    os.mkfifo(fifo)
    (images / "zz_never_written.txt").write_text("a caption")
    data = dict(yaml.safe_load(open(os.path.join(REPO, "jobs", "demo.yaml"))))
    data["model"].update(pretrained_model_name_or_path=tiny_model_dir, make_tiny_if_missing=False)
    data["datasets"][0].update(instance_data_dir=str(images), make_demo_if_missing=False)
    data["cache"].update(uri=str(tmp_path / "cache"), commit_every=8, vae_batch_size=2, min_rows_per_file=1)
    data["output"]["uri"] = str(tmp_path / "out")
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    spec = load_spec(str(spec_path))
    # The driver joins the session's cluster; killing it ends its Ray Data job with it.
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, RAY_AUTH_MODE="token")
    proc = subprocess.Popen([sys.executable, "-m", "flux_ray.cli", "cache", str(spec_path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    committed = 0
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                committed = sum(s["rows"] for s in _manifest(spec)[1]["shards"])
            except (FileNotFoundError, OSError, ValueError):
                committed = 0
            if committed >= 8:
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        try:  # let a decode task still blocked on the pipe see EOF
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        fifo.unlink()
        (images / "zz_never_written.txt").unlink()
    uri, manifest = _manifest(spec)
    committed = sum(s["rows"] for s in manifest["shards"])  # what the killed job left, read after the kill
    assert 0 < committed < 24, "the job should be killed after its first chunk and before the last"
    before = {s["file"] for s in manifest["shards"]}
    from flux_ray.data.cache import run_cache

    summary = run_cache(spec).datasets["demo"]
    assert summary["encoded_this_run"] == 24 - committed
    assert summary["usable"] == 24
    _, manifest = _manifest(spec)
    assert before <= {s["file"] for s in manifest["shards"]}
    ids = [r for s in manifest["shards"] for r in pq.read_table(os.path.join(uri, s["file"]),
                                                                columns=["sample_id"]).column("sample_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 24


def test_images_and_cache_on_s3_and_training_reads_it(ray_session, s3_server, tiny_model_dir, demo_data_dir, tmp_path,
                                                     demo_spec):
    """Images read from S3, cache and run output written to S3 (moto over HTTP), training reads the cache."""
    from flux_ray import job

    bucket = s3_server.create_bucket("flux-ray-test")
    client = storage.boto3_client(s3_server.storage)
    for name in os.listdir(demo_data_dir):
        client.upload_file(os.path.join(demo_data_dir, name), "flux-ray-test", f"images/{name}")
    data = {"id": "s3demo", "type": "s3", "aws_bucket_name": "flux-ray-test", "aws_data_prefix": "images/",
            "aws_endpoint_url": s3_server.endpoint, "caption_strategy": "textfile", "resolution": 128}
    spec = demo_spec(tiny_model_dir, demo_data_dir, tmp_path, datasets=[data],
                     storage={"aws_endpoint_url": s3_server.endpoint},
                     cache={"uri": f"{bucket}/cache"}, output={"uri": f"{bucket}/runs"},
                     train={"max_train_steps": 4, "log_every": 2, "checkpointing_steps": 2},
                     eval={"eval_steps_interval": None, "validation_step_interval": None},
                     tracking={"mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    summary = job.run(spec)
    assert summary["cache"]["datasets"]["s3demo"]["usable"] == 24
    assert summary["steps"] == 4
    keys = {o["Key"] for p in client.get_paginator("list_objects_v2").paginate(Bucket="flux-ray-test")
            for o in p.get("Contents", [])}
    assert any(k.startswith("cache/latents/") and k.endswith("manifest.json") for k in keys)
    assert any(k.startswith("cache/text/") and k.endswith(".parquet") for k in keys)
    assert "runs/demo/lora/pytorch_lora_weights.safetensors" in keys
    assert "runs/demo/run_summary.json" in keys
    assert any(k.startswith("runs/demo/checkpoint_") for k in keys)
    assert not any("testing" in k for k in keys)
