"""The opt-in step profiler the multi-GPU scaling check uses (flux_ray/train/profile.py)."""
import json

import pytest
import torch

from flux_ray.train.profile import BATCH_RANGE, StepProfiler, kernel_kind


def test_profiles_only_its_window_and_writes_a_summary(tmp_path):
    prof = StepProfiler(start=3, count=2, out_dir=str(tmp_path), rank=1, device=torch.device("cpu"))
    a = torch.randn(64, 64)
    for step in range(1, 7):
        with torch.profiler.record_function(BATCH_RANGE):
            b = a @ a
        (b * 2).sum()
        prof.after_step(step)
        assert (prof.prof is not None) == (step in (2, 3))  # recording during steps 3 and 4
    out = json.loads((tmp_path / "rank1.json").read_text())
    assert out["rank"] == 1 and out["steps"] == [3, 4]
    assert out["wall_s_per_step"] > 0 and out["host_batch_ms_per_step"] > 0
    assert set(out["kernel_ms_per_step"]) == {"gemm", "attention", "nccl", "optimizer", "triton", "other", "total"}


def test_env_switch_and_its_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("FLUX_RAY_PROFILE_STEPS", raising=False)
    assert StepProfiler.from_env(0, torch.device("cpu")) is None
    monkeypatch.setenv("FLUX_RAY_PROFILE_DIR", str(tmp_path))
    monkeypatch.setenv("FLUX_RAY_PROFILE_STEPS", "20,5")
    p = StepProfiler.from_env(0, torch.device("cpu"))
    assert (p.start, p.count) == (20, 5)
    for bad in ("20", "a,b", "1,5", "5,0"):
        monkeypatch.setenv("FLUX_RAY_PROFILE_STEPS", bad)
        with pytest.raises(ValueError, match="FLUX_RAY_PROFILE_STEPS"):
            StepProfiler.from_env(0, torch.device("cpu"))


def test_kernel_kinds():
    assert kernel_kind("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "nccl"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "gemm"
    assert kernel_kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "gemm"
    assert kernel_kind("triton_poi_fused_add_mul_0") == "triton"
    assert kernel_kind("void at::native::multi_tensor_apply_kernel<...>") == "optimizer"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, ...>") == "other"
