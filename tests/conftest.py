"""Shared fixtures. ``s3_server``: a real moto S3 server on 127.0.0.1 for the whole session."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class S3Server:
    endpoint: str
    """http://127.0.0.1:PORT"""
    region: str = "us-east-1"

    @property
    def storage(self):
        from flux_ray.spec import StorageSpec

        return StorageSpec(aws_endpoint_url=self.endpoint, aws_region_name=self.region)

    def create_bucket(self, name: str) -> str:
        """Create a bucket (idempotent) and return its ``s3://name`` URI."""
        from flux_ray import storage

        storage.ensure_bucket(f"s3://{name}", self.storage)
        return f"s3://{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, url: str, timeout_s: float = 30.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited early with code {proc.returncode}")
        try:
            opener.open(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer at {url} within {timeout_s:.0f}s")


@pytest.fixture(scope="session")
def s3_server():
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "NO_PROXY", "no_proxy"]}
    os.environ.update(S3_ENV)
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"]))
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = no_proxy
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_up(proc, endpoint + "/")
        yield S3Server(endpoint=endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- local HTTP receivers (webhooks, Hub stand-in)

class _Recorder:
    """A ThreadingHTTPServer on 127.0.0.1 recording every request; ``answer(method, path, body, headers)``
    returns (status, content type, body bytes)."""

    def __init__(self, answer):
        import http.server
        import threading

        recorder = self
        self.requests: list[dict] = []
        self.answer = answer

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                recorder.requests.append(req)
                status, ctype, data = recorder.answer(req)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def webhook_receiver():
    """Factory: ``webhook_receiver(fail_first=0)`` -> a recorder whose first ``fail_first`` POSTs get a 503."""
    made = []

    def make(fail_first: int = 0):
        def answer(req):
            failed = sum(1 for r in rec.requests[:-1] if r.get("status") == 503)
            req["status"] = 503 if failed < fail_first else 204
            return req["status"], "text/plain", b""
        rec = _Recorder(answer)
        made.append(rec)
        return rec

    yield make
    for rec in made:
        rec.close()


def _hub_answer(hub):
    """Just enough of the Hugging Face Hub's API for create_repo + upload_folder (preupload, commit):
    every file is committed "regular" (inline, base64), so no LFS or Xet transfer is involved."""
    import base64
    import json

    def answer(req):
        path = req["path"].split("?")[0]
        ok = lambda obj: (200, "application/json", json.dumps(obj).encode())  # noqa: E731
        if path == "/api/repos/create":
            body = json.loads(req["body"])
            repo = f"{body.get('organization')}/{body['name']}"
            hub.repos[repo] = {"visibility": body.get("visibility"), "files": {}}
            return ok({"url": f"{hub.url}/{repo}"})
        if path == "/api/validate-yaml":
            return ok({"errors": [], "warnings": []})
        parts = path.split("/")  # /api/models/<org>/<name>/<verb>/<revision>
        if path.startswith("/api/models/") and len(parts) == 7 and parts[5] in ("preupload", "commit"):
            repo = f"{parts[3]}/{parts[4]}"
            if repo not in hub.repos:
                return 404, "application/json", b'{"error": "Repository not found"}'
            if parts[5] == "preupload":
                files = json.loads(req["body"])["files"]
                return ok({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                     for f in files]})
            for line in req["body"].splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    hub.repos[repo]["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return ok({"commitUrl": f"{hub.url}/{repo}/commit/0123abcd", "commitOid": "0123abcd"})
        return 404, "application/json", b'{"error": "not in the stand-in"}'
    return answer


HF_TEST_TOKEN = "hf_fakeTOKEN1234567890"


@dataclass
class LocalHub:
    url: str
    repos: dict
    requests: list


@pytest.fixture(scope="module")
def local_hub():
    """A Hub stand-in on 127.0.0.1; HF_ENDPOINT points at it and HF_TOKEN is a fake token."""
    import huggingface_hub.constants as hf_constants

    hub = LocalHub(url="", repos={}, requests=[])
    rec = _Recorder(None)
    rec.answer = _hub_answer(hub)
    hub.url, hub.requests = rec.url, rec.requests
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", rec.url)
        mp.setattr(hf_constants, "ENDPOINT", rec.url)  # read at import time
        mp.setenv("HF_TOKEN", HF_TEST_TOKEN)
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield hub
    rec.close()


# ---------------------------------------------------------------- tiny model, demo data, local Ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The tiny random Flux, written once per session in diffusers layout."""
    from flux_ray.core.tiny import write_tiny_flux

    return str(write_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux"))


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory) -> str:
    """The tiny random BLIP captioner (caption_strategy: auto), written once per session."""
    from flux_ray.core.tiny_captioner import write_tiny_captioner

    return str(write_tiny_captioner(tmp_path_factory.mktemp("models") / "tiny-captioner"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    """A tiny random CLIPModel + CLIPProcessor (eval.evaluation_type: clip), written once per session."""
    from flux_ray.core.tiny import write_tiny_clip

    # Seed 2: its random towers give the tiny Flux's images positive cosines; with seed 0 the demo job's validation
    # image scores below the clamp (0), and a test of 0 == 0 would show little.
    return str(write_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip", seed=2))


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> str:
    from flux_ray.data.demo import write_demo_data

    d = tmp_path_factory.mktemp("data") / "demo"
    write_demo_data(d, n=24)
    return str(d)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the session with more logical CPUs than cores (Train + Data need them)."""
    import ray

    os.environ.update(S3_ENV)  # workers inherit the test credentials for the moto server
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"},
                              "worker_process_setup_hook": "flux_ray.job.pin_ray_address"})
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def demo_spec_dict(tiny_model_dir: str, data_dir: str, out_dir, cache_uri=None, **sections) -> dict:
    """jobs/demo.yaml pointed at test folders, with section overrides merged in."""
    import yaml

    with open(os.path.join(REPO, "jobs", "demo.yaml")) as f:
        data = yaml.safe_load(f)
    data["model"].update(pretrained_model_name_or_path=tiny_model_dir, make_tiny_if_missing=False)
    data["datasets"][0].update(instance_data_dir=data_dir, make_demo_if_missing=False)
    data["cache"]["uri"] = str(cache_uri or out_dir / "cache")
    data["output"]["uri"] = str(out_dir / "output")
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


@pytest.fixture(scope="session")
def shared_demo_cache(tmp_path_factory):
    """One cache folder for the session (per xdist worker). It is content-addressed (a key per source,
    preprocessing, model and dtype), so jobs on the same inputs find what an earlier test encoded and
    different inputs get their own keys. Tests about encoding itself use their own data folders."""
    return tmp_path_factory.getbasetemp() / "shared_demo_cache"


@pytest.fixture(scope="session")
def demo_spec_data():
    """``demo_spec_dict`` as a fixture: test modules never ``import conftest`` (two conftest modules share that
    name, so which one it finds depends on the import order of the xdist worker)."""
    return demo_spec_dict


@pytest.fixture(scope="session")
def demo_spec(shared_demo_cache):
    """Factory: ``demo_spec(tiny_model_dir, data_dir, out_dir, **sections) -> JobSpec`` (shared cache)."""
    from flux_ray.spec import load_spec

    def make(tiny_model_dir, data_dir, out_dir, overrides=None, **sections):
        return load_spec(data=demo_spec_dict(tiny_model_dir, data_dir, out_dir, cache_uri=shared_demo_cache,
                                             **sections),
                         overrides=overrides)

    return make


@pytest.fixture(scope="session")
def images_rendered_with_encoders():
    """Factory: ``render(spec, transformer) -> [uint8 HxWx3]``, validation's images as they were rendered before the
    prompt embeddings were cached: a (Kontext) pipeline holding CLIP + T5, called with the prompt texts."""
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline

    from flux_ray.core import model as M
    from flux_ray.core.validation import load_reference_image, prompt_library, reference_kwargs

    def render(spec, transformer):
        tok, clip, tok2, t5 = M.load_text_encoders(spec.model)
        cls = FluxKontextPipeline if spec.model.model_flavour == "kontext" else FluxPipeline
        pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(spec.model.base_path, subfolder="scheduler"),
                   vae=M.load_vae(spec.model), text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2,
                   transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        ev, reference, out = spec.eval, load_reference_image(spec.eval.validation_reference_image), []
        for prompt in prompt_library(ev, spec.validation_trigger_word).values():
            for w, h in ev.validation_sizes:
                kwargs = reference_kwargs(reference, w, h)
                if ev.validation_guidance_real > 1:
                    kwargs.update(true_cfg_scale=ev.validation_guidance_real, negative_prompt=ev.validation_negative_prompt)
                with torch.no_grad():
                    img = pipe(prompt=prompt, width=w, height=h, num_inference_steps=ev.validation_num_inference_steps,
                               guidance_scale=ev.validation_guidance, max_sequence_length=spec.model.t5_max_length,
                               generator=torch.Generator().manual_seed(ev.validation_seed), **kwargs).images[0]
                out.append(np.asarray(img))
        return out

    return render


# Longest modules first, so that `pytest -n 2 --dist loadfile --no-loadscope-reorder` (make test) hands out
# the short ones last and both workers finish together. Measured on 2 cores; order within a module is unchanged.
LONGEST_FIRST = ("tests/deploy/test_multi_node.py", "tests/train/test_distributed.py", "tests/tune/test_sweep.py", "tests/deploy/test_job_submit.py",
                 "tests/data/test_cache.py", "tests/test_demo_job.py", "tests/test_delivery.py", "tests/test_progress.py",
                 "tests/train/test_loop.py",
                 "tests/tracking/test_mlflow_server.py", "tests/test_import_simpletuner.py", "tests/core/test_fp8.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = config.rootpath
    items[:] = [it for _, it in sorted(enumerate(items), key=lambda p: (
        rank.get(str(p[1].path.relative_to(root)), len(rank)), p[0]))]
