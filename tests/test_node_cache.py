"""s3:// inputs fetched once per node into the node cache (moto S3 on 127.0.0.1)."""
from __future__ import annotations

import threading
from pathlib import Path

from flux_ray import node_cache, storage
from flux_ray.spec import ModelSpec


def test_a_model_folder_is_fetched_once_by_concurrent_processes_of_a_node(s3_server, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    bucket = s3_server.create_bucket("nodecache")
    uri = f"{bucket}/models/tiny-flux"
    storage.copy_dir(tiny_model_dir, uri, s3_server.storage)
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "cache"))
    reads, real_read = [], storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda u, st=None: reads.append(u) or real_read(u, st))
    spec = ModelSpec(pretrained_model_name_or_path=uri, assistant_lora_path=None)
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(node_cache.localize_model(spec, s3_server.storage)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = {m.pretrained_model_name_or_path for m in out}
    assert len(paths) == 1
    local = Path(paths.pop())
    files = storage.list_files(uri, s3_server.storage)
    assert len(reads) == len(files)  # one download for the 4 of them
    for f in files:
        assert (local / f.rel_path).read_bytes() == (Path(tiny_model_dir) / f.rel_path).read_bytes()
    assert node_cache.localize_model(spec, s3_server.storage).pretrained_model_name_or_path == str(local)
    assert len(reads) == len(files)


def test_a_single_file_uri_and_local_paths(s3_server, tmp_path, monkeypatch):
    bucket = s3_server.create_bucket("nodecache")
    storage.write_bytes_atomic(f"{bucket}/prompts.json", b'{"a": "a red circle"}', s3_server.storage)
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "cache"))
    local = node_cache.fetch(f"{bucket}/prompts.json", s3_server.storage)
    assert Path(local).name == "prompts.json" and Path(local).read_text() == '{"a": "a red circle"}'
    spec = ModelSpec(pretrained_model_name_or_path="/models/flux")
    assert node_cache.localize_model(spec) is spec  # nothing remote: unchanged


def test_an_s3_checkpoint_to_resume_from_is_read_from_the_node_copy(s3_server, tmp_path, monkeypatch):
    """train.resume_from_checkpoint: s3://... (worker.py): the checkpoint folder is fetched, then loaded locally."""
    import torch

    from flux_ray.train.checkpoint import Position, checkpoint_position, save_checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    local = save_checkpoint(tmp_path / "ckpt", lora_sd=model.state_dict(), optim_sd=opt.state_dict(),
                            lr_scheduler=sched, position=Position(step=7, epoch=1, batch_index=3))
    bucket = s3_server.create_bucket("nodecache")
    uri = f"{bucket}/runs/r/checkpoint_000001"
    storage.copy_dir(str(local), uri, s3_server.storage)
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "cache"))
    copy = node_cache.local_path(uri, s3_server.storage)
    assert copy.startswith(str(tmp_path / "cache"))
    assert checkpoint_position(copy) == Position(step=7, epoch=1, batch_index=3)
    assert node_cache.local_path(str(local)) == str(local)
