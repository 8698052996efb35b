"""Issue 22 end to end, one job: a zip of photos without captions -> auto captions with a trigger word (a tiny
random captioner on Ray Data) -> cache -> training with progress lines -> the LoRA published to moto S3 and a local
Hub stand-in with a model card and the validation grid -> webhook events in order (a failed run's too)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import zipfile

import pytest

from flux_ray import storage

pytestmark = pytest.mark.slow
STEPS = 4


PHOTOS, TRIGGER = 8, "ohwx"


@pytest.fixture(scope="module")
def delivered(ray_session, tiny_model_dir, tiny_captioner_dir, demo_data_dir, tmp_path_factory, demo_spec, s3_server,
              local_hub, webhook_receiver):
    from flux_ray import job

    rec = webhook_receiver()
    out = tmp_path_factory.mktemp("delivery")
    names = sorted(f for f in os.listdir(demo_data_dir) if f.endswith(".png"))[:PHOTOS]
    archive = out / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # photos only: the demo's .txt captions stay out
        for n in names:
            zf.write(os.path.join(demo_data_dir, n), f"photos/{n}")
    dataset = {"id": "photos", "instance_data_dir": str(archive), "caption_strategy": "auto",
               "trigger_word": TRIGGER, "resolution": 128,
               "captioner": {"model_name": tiny_captioner_dir, "query_str": "", "max_new_tokens": 4}}
    bucket = s3_server.create_bucket("published")
    spec = demo_spec(tiny_model_dir, demo_data_dir, out, name="delivered", datasets=[dataset],
                     train={"max_train_steps": STEPS, "log_every": 1, "checkpointing_steps": 2},
                     eval={"eval_steps_interval": 2, "validation_step_interval": STEPS},
                     storage={"aws_endpoint_url": s3_server.endpoint},
                     output={"uri": str(out / "output"), "export_formats": ["diffusers", "comfyui"],
                             "publish": {"uri": f"{bucket}/loras", "hub_model_id": "team/delivered-lora",
                                         "formats": ["comfyui"]}},
                     notify={"webhook_url": f"{rec.url}/hook/TOKEN-in-path", "webhook_max_retries": 2})
    stdout, logs = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(stdout):
            summary = job.run(spec)
    finally:
        logging.getLogger().removeHandler(handler)
    return spec, summary, stdout.getvalue(), logs.getvalue(), rec


def test_the_zip_was_captioned_once_with_the_trigger_word_and_cached(delivered):
    from flux_ray.core.model import load_vae_config
    from flux_ray.data.auto_captions import read_manifest
    from flux_ray.data.cache_layout import CachePaths, dataset_key

    import pyarrow.parquet as pq

    spec, summary, _, _, _ = delivered
    stats = summary["cache"]["datasets"]["photos"]
    assert stats["usable"] == PHOTOS and stats["auto_captioned"] == PHOTOS and summary["steps"] == STEPS
    captions = read_manifest(stats["caption_manifest"], None)  # visible and editable, next to the cache
    assert len(captions) == PHOTOS and all(captions.values())
    uri = CachePaths(spec.cache.uri).latents(dataset_key(spec.datasets[0], spec.model, load_vae_config(spec.model),
                                                         spec.cache.latent_dtype))
    index = pq.read_table(storage.join(uri, storage.read_json(storage.join(uri, "manifest.json"))["index"]))
    assert sorted(index["caption"].to_pylist()) == sorted(f"{TRIGGER}, {c}" for c in captions.values())


def test_progress_prints_one_line_per_report(delivered):
    _, summary, stdout, _, _ = delivered
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{s}/{STEPS}" for s in range(1, STEPS + 1)]
    assert all("loss " in line and "samples/s" in line and "ETA " in line for line in lines)
    assert "eval " in lines[1] and "[checkpoint]" in lines[1] and "[validation]" in lines[-1]
    assert lines[-1].split("ETA ")[1].startswith("0:00:00")


def test_webhook_events_arrive_in_order(delivered):
    spec, summary, _, logs, rec = delivered
    events = [json.loads(r["body"]) for r in rec.requests]
    assert [(e["event"], e.get("step")) for e in events] == [
        ("started", None), ("checkpoint", 2), ("validation", 4), ("checkpoint", 4), ("finished", None)]
    assert events[2]["image_uri"].endswith("validation/step-000004.png")
    assert events[-1]["lora"] == summary["lora"] and events[-1]["metrics"]["steps"] == STEPS
    assert events[-1]["published"] == summary["published"]
    assert "TOKEN-in-path" not in logs


def test_published_to_s3_with_model_card_and_grid(delivered, s3_server):
    spec, summary, _, _, _ = delivered
    dest = summary["published"]["storage"]
    assert dest == "s3://published/loras/delivered"
    files = {f.rel_path for f in storage.list_files(dest, spec.storage)}
    comfy = {f for f in files if f.startswith("comfyui/")}
    assert comfy and "pytorch_lora_weights.safetensors" not in files  # only the chosen format
    assert {"README.md", "validation/step-000004.png"} <= files
    assert any(f.startswith("validation/step-000004/") for f in files)
    local = {f.rel_path: f for f in storage.list_files(f"{spec.run_uri}/lora")}
    name = sorted(comfy)[0]
    assert storage.read_bytes(f"{dest}/{name}", spec.storage) == storage.read_bytes(local[name].uri)
    card = storage.read_bytes(f"{dest}/README.md", spec.storage).decode()
    assert card.startswith("---\nbase_model: ") and spec.model.base_path in card
    assert "| lora_rank | 8 |" in card and "| steps | 4 |" in card and "![step-000004.png]" in card
    assert f"instance_prompt: {TRIGGER}" in card  # the trigger word, in the Hub's front matter


def test_published_to_the_hub_through_huggingface_hub(delivered, local_hub):
    spec, summary, _, logs, _ = delivered
    HF_TEST_TOKEN = os.environ["HF_TOKEN"]  # the fake token local_hub sets for huggingface_hub
    assert HF_TEST_TOKEN.startswith("hf_fake")
    repo = local_hub.repos["team/delivered-lora"]
    assert repo["visibility"] == "private"
    assert "README.md" in repo["files"] and "validation/step-000004.png" in repo["files"]
    assert any(p.startswith("comfyui/") for p in repo["files"])
    readme = storage.read_bytes(f"{summary['published']['storage']}/README.md", spec.storage)
    assert repo["files"]["README.md"] == readme
    paths = [r["path"].split("?")[0] for r in local_hub.requests]
    repo_calls = [p for p in paths if p.startswith(("/api/repos/", "/api/models/"))]
    assert repo_calls == ["/api/repos/create", "/api/models/team/delivered-lora/preupload/main",
                          "/api/models/team/delivered-lora/commit/main"]
    assert all({k.lower(): v for k, v in r["headers"].items()}.get("authorization") == f"Bearer {HF_TEST_TOKEN}"
               for r in local_hub.requests if r["path"].startswith(("/api/repos/", "/api/models/")))
    assert HF_TEST_TOKEN not in logs and summary["published"]["hub"].startswith(local_hub.url)


def test_a_failed_run_sends_started_then_failed(ray_session, tiny_model_dir, demo_data_dir, tmp_path,
                                                demo_spec, webhook_receiver):
    from flux_ray import job

    rec = webhook_receiver()
    spec = demo_spec(tiny_model_dir, demo_data_dir, tmp_path, name="fails", cache={"uri": str(tmp_path / "empty")},
                     notify={"webhook_url": rec.url, "webhook_type": "raw"})
    with pytest.raises(Exception) as err:
        job.run(spec, do_cache=False, progress=False)  # `flux-ray train` without a cache
    events = [json.loads(r["body"]) for r in rec.requests]
    assert [e["event"] for e in events] == ["started", "failed"]
    assert type(err.value).__name__ in events[1]["error"]
