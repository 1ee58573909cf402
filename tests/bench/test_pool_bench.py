"""The pool level's warm-up, precision matching and TF32 handling, and the timing helpers it uses.
Numbers and behaviour only: no test asserts a speed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xal_engine.bench import pool as level
from xal_engine.bench.pools import repeated_pool
from xal_engine.bench.timing import device_times_ms, no_tf32
from xal_engine.store import Pool


def test_defaults_are_the_users_size_and_quick_is_the_cpu_check() -> None:
    full = level.parse_args([])
    assert (full.image_size, full.channels, full.warmup_images) == (224, 3, 64)
    quick = level.parse_args(["--quick", "--batch-size", "16"])
    assert (quick.image_size, quick.channels, quick.warmup_images, quick.sizes) == (64, 1, 16, "256,1024")
    assert level.parse_args(["--warmup-images", "0"]).warmup_images == 0
    with pytest.raises(SystemExit):
        level.parse_args(["--warmup-images", "-1"])
    assert level.case_name(2000, full) == "pool_3x224_N2000"
    assert "3x224x224 resnet18 batch=64 workers=2 warmup=64" in level.case_sizes(2000, full)


def test_repeated_pool_repeats_the_generated_images_with_unique_ids(tmp_path: Path) -> None:
    pool = repeated_pool(tmp_path / "p.zarr", 40, size=32, channels=1, distinct=16)
    batch = pool.read(0, 40)
    assert pool.n == 40 and batch.images.shape == (40, 1, 32, 32) and batch.images.dtype == np.uint8
    assert np.array_equal(batch.images[16:32], batch.images[:16])
    assert np.array_equal(batch.rois[32:], batch.rois[:8])
    assert list(batch.ids[:2]) == ["img_0000000", "img_0000001"] and len(set(batch.ids)) == 40


def test_warm_up_pass_is_outside_the_timed_pass_and_tf32_is_off(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pool_path = str(repeated_pool(tmp_path / "p.zarr", 16, size=32, channels=1).path)
    clock = [0.0]
    calls: list[tuple[str, str, bool, bool]] = []

    def fake_pass(provider, path, model_path, args, device, run_name) -> None:
        calls.append((path, run_name, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        clock[0] += 100.0 if run_name == "bench-warmup" else 3.0  # the warm-up "costs" 100 s

    monkeypatch.setattr(level, "_one_pass", fake_pass)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    torch.backends.cudnn.allow_tf32 = True
    args = level.parse_args(["--device", "cpu", "--threads", "0"])
    result = level.run_provider("plain", pool_path, "model.pt", args, warmup_path="warm.zarr")
    assert result["seconds"] == 3.0 and result["n_images"] == 16  # the warm-up is not in the timed pass
    assert calls == [("warm.zarr", "bench-warmup", False, False), (pool_path, "bench", False, False)]
    assert torch.backends.cudnn.allow_tf32  # restored
    calls.clear()
    assert level.run_provider("loader", pool_path, "model.pt", args)["seconds"] == 3.0
    assert [c[1] for c in calls] == ["bench"]  # no warm-up pool: one pass


def test_no_tf32_restores_the_flags_even_after_an_error() -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
        with pytest.raises(ValueError), no_tf32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            raise ValueError
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_device_times_on_a_cpu_are_host_timed_after_one_warm_up_call() -> None:
    calls = []
    times, timer = device_times_ms(lambda: calls.append(1), torch.device("cpu"), cpu_repeats=4)
    assert timer == "host perf_counter" and len(times) == 4 and len(calls) == 5
    assert all(t >= 0 for t in times)


@pytest.fixture(scope="module")
def bf16_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    args = level.parse_args(["--quick", "--sizes", "64", "--rounds", "1", "--workers", "0", "--in-process",
                             "--precision", "bf16", "--device", "cpu", "--no-write",
                             "--workdir", str(tmp_path_factory.mktemp("pool"))])
    return level.run(args)


def test_bf16_engine_rows_are_never_compared_with_fp32_grad_cam(bf16_rows: list[dict]) -> None:
    rows = {r["provider"]: r for r in bf16_rows}
    # pytorch-grad-cam cannot run under bf16 autocast: no row, and so no speedup vs it
    assert set(rows) == {"loader", "plain", "xal-engine"}
    assert {r["dtype"] for r in bf16_rows} == {"bf16"}
    assert all(r["speedup_vs_grad_cam"] == "" for r in bf16_rows)
    engine, plain = rows["xal-engine"], rows["plain"]
    assert engine["check"] == "pass"  # checked against the fp32 reference, bf16 tolerance
    assert engine["ratio_vs_plain"] == pytest.approx(plain["seconds"] / engine["seconds"], rel=1e-3, abs=1e-3)


def test_grad_cam_runs_in_fp32_and_says_why_not_in_bf16(tmp_path: Path) -> None:
    args = level.parse_args(["--device", "cpu", "--arch", "tiny", "--channels", "1", "--image-size", "32"])
    pool_path = str(repeated_pool(tmp_path / "p.zarr", 4, size=32, channels=1).path)
    model_path = level.save_model(tmp_path / "m.pt", args)
    assert level.grad_cam_unsupported(pool_path, model_path, args) is None
    args.precision = "bf16"
    why = level.grad_cam_unsupported(pool_path, model_path, args)
    assert why is not None and why.startswith("not supported by pytorch-grad-cam 1.5.7 in bf16")
    assert Pool.open(pool_path).n == 4
