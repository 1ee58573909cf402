"""`xal-engine bench` at tiny sizes: every level runs, checks parity with pytorch-grad-cam, and prints one
table with the expected rows and columns. No timing is asserted (speed lives in benchmarks/)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from xal_engine.bench import checkout, compare, plot, table
from xal_engine.bench.suite import BenchConfig, level_argv, run_suite
from xal_engine.cli import main
from xal_engine.errors import XalError

try:
    BENCHMARKS = checkout.benchmarks_dir()
except XalError:  # an installed package without the checkout's benchmarks/ folder
    pytest.skip("benchmarks/ folder not found next to the package", allow_module_level=True)

TINY = {
    "batch": ("--archs", "resnet18", "--batch-size", "2", "--image-size", "64"),
    "pool": ("--sizes", "64", "--rounds", "1", "--workers", "0", "--in-process",
             "--providers", "loader,plain,xal-engine,grad-cam"),
}


@pytest.fixture(scope="module")
def sections() -> dict[str, list[dict]]:
    """One tiny run of every level (the expensive part, shared by the tests below)."""
    config = BenchConfig(quick=True, device="cpu", write=False, warmup=0, repeats=1, extra=TINY)
    return dict(run_suite(config))


def by_provider(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {(r["benchmark"], r["provider"], r["dtype"]): r for r in rows}


def test_every_level_checked_its_results_against_pytorch_grad_cam(sections: dict[str, list[dict]]) -> None:
    kernel, batch, pool = (by_provider(sections[level]) for level in ("kernel", "batch", "pool"))
    cases = ("quick_7x7_64", "quick_14x14_128", "quick_7x7_224")
    assert set(kernel) == {(c, p, "fp32") for c in cases for p in ("torch", "grad-cam")}
    assert {r["check"] for (_, p, _), r in kernel.items() if p == "grad-cam"} == {"pass"}
    assert {r["check"] for (_, p, _), r in kernel.items() if p == "torch"} == {"reference"}

    assert set(batch) == {("resnet18_64", p, d) for p in ("xal-engine", "grad-cam", "plain") for d in ("fp32", "bf16")}
    assert batch[("resnet18_64", "xal-engine", "fp32")]["check"] == "pass"
    assert batch[("resnet18_64", "xal-engine", "bf16")]["check"] == "pass"
    assert batch[("resnet18_64", "grad-cam", "fp32")]["check"] == "reference"
    unsupported = batch[("resnet18_64", "grad-cam", "bf16")]
    assert "not supported" in unsupported["note"] and "median_ms" not in unsupported

    assert set(pool) == {("pool_1x64_N64", p, "fp32") for p in ("loader", "plain", "xal-engine", "grad-cam")}
    assert pool[("pool_1x64_N64", "xal-engine", "fp32")]["check"] == "pass"
    assert pool[("pool_1x64_N64", "grad-cam", "fp32")]["check"] == "reference"
    assert "1x64x64" in pool[("pool_1x64_N64", "plain", "fp32")]["sizes"]
    assert "warmup=64" in pool[("pool_1x64_N64", "plain", "fp32")]["sizes"]  # one batch, untimed


def test_ratios_are_those_of_the_measured_times(sections: dict[str, list[dict]]) -> None:
    for level, key in (("kernel", "median_ms"), ("batch", "median_ms"), ("pool", "seconds")):
        rows = by_provider(sections[level])
        for (case, provider, dtype), row in rows.items():
            if key not in row:
                assert row["speedup_vs_grad_cam"] == "" and row["ratio_vs_plain"] == ""
                continue
            grad_cam = rows[(case, "grad-cam", "fp32")][key]
            assert row["speedup_vs_grad_cam"] == pytest.approx(grad_cam / row[key], rel=1e-3, abs=1e-3)
            plain = rows.get((case, "plain", dtype))
            assert row["ratio_vs_plain"] == ("" if plain is None else
                                             pytest.approx(plain[key] / row[key], rel=1e-3, abs=1e-3))


def test_table_has_one_line_per_row_and_the_expected_columns(sections: dict[str, list[dict]]) -> None:
    text = table.format_table(list(sections.items()))
    lines = text.splitlines()
    assert lines[0].split() == ["level", "case", "provider", "dtype", "ms", "img/s", "vs", "grad-cam", "vs",
                                "plain", "check", "note"]
    assert len(lines) == 2 + sum(len(rows) for rows in sections.values())
    engine_batch = next(line for line in lines if line.startswith("batch") and "xal-engine  fp32" in line)
    row = by_provider(sections["batch"])[("resnet18_64", "xal-engine", "fp32")]
    assert f"x{row['speedup_vs_grad_cam']:.2f}" in engine_batch and engine_batch.rstrip().endswith("pass")


def test_cli_prints_one_table_and_writes_nothing_with_no_write(capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").glob("*.csv")}
    code = main(["bench", "--quick", "--no-write", "--suite", "kernel", "--repeats", "1", "--warmup", "0",
                 "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split()[:4] == ["level", "case", "provider", "dtype"]
    assert sum(line.startswith("kernel ") for line in out) == 6 and len(out) == 8
    assert {p: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").glob("*.csv")} == before


def test_level_argv_maps_the_config() -> None:
    config = BenchConfig(quick=True, device="cuda", repeats=3, threads=2, extra={"pool": ("--sizes", "9")})
    assert level_argv("kernel", config) == ["--device", "cuda", "--no-write", "--quick", "--threads", "2",
                                            "--repeats", "3"]
    assert level_argv("pool", config) == ["--device", "cuda", "--no-write", "--quick", "--threads", "2",
                                          "--sizes", "9"]


def test_user_errors_are_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                  tmp_path: Path) -> None:
    assert main(["bench", "--suite", "kernel,gpu"]) == 2
    assert capsys.readouterr().err.strip().endswith("expected some of kernel, batch, pool")
    assert main(["bench", "--args", "train=--fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--args: expected LEVEL=ARGS" in err[0]
    monkeypatch.setattr(checkout, "__file__",
                        str(tmp_path / "site-packages" / "xal_engine" / "bench" / "checkout.py"))
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "benchmark scripts not found" in err[0] and "installed wheel" in err[0]


def test_a_provider_that_disagrees_is_refused(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from xal_engine.bench import baseline

    real = baseline.postprocess

    def off_by_1e3(*args: object) -> dict[str, np.ndarray]:
        out = real(*args)
        return {**out, "soft_dice": out["soft_dice"] + 1e-3}

    monkeypatch.setattr(baseline, "postprocess", off_by_1e3)
    code = main(["bench", "--quick", "--no-write", "--suite", "kernel", "--repeats", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "grad-cam: soft_dice differs from the reference by 0.001 (> 0.0001)" in err[0]


def test_check_and_ratios_by_hand() -> None:
    ref = {"dice": np.array([0.5, np.nan]), "hit": np.array([True, False])}
    assert compare.check("p", {"dice": np.array([0.50005, 7.0]), "hit": np.array([True, False])}, ref,
                         {"dice": 1e-4}) == {"dice": pytest.approx(5e-5)}
    with pytest.raises(compare.ParityError, match="hit differs"):
        compare.check("p", {"dice": ref["dice"], "hit": np.array([False, False])}, ref, {"dice": 1e-4})
    # a tie of max S inside and outside the ROI excuses the hit
    compare.check("p", {"dice": ref["dice"], "hit": np.array([False, False])}, ref, {"dice": 1e-4},
                  ties=np.array([True, False]))
    with pytest.raises(compare.ParityError, match="dice differs"):
        compare.check("p", {"dice": np.array([np.inf, 0.0]), "hit": ref["hit"]}, ref, {"dice": 1e-4})
    maps = np.array([[[1.0, 1.0 - 1e-6], [0.2, 0.0]], [[1.0, 0.5], [0.0, 0.0]]])
    rois = np.array([[[True, False], [False, False]], [[True, False], [False, False]]])
    assert compare.near_tie_hits(maps, rois).tolist() == [True, False]

    rows = [{"benchmark": "a", "provider": "grad-cam", "dtype": "fp32", "t": 6.0},
            {"benchmark": "a", "provider": "plain", "dtype": "fp32", "t": 1.5},
            {"benchmark": "a", "provider": "xal-engine", "dtype": "fp32", "t": 2.0},
            {"benchmark": "a", "provider": "xal-engine", "dtype": "bf16", "t": 1.2},
            {"benchmark": "a", "provider": "grad-cam", "dtype": "bf16"}]
    compare.add_ratios(rows, "t")
    assert [(r["speedup_vs_grad_cam"], r["ratio_vs_plain"]) for r in rows] == [
        (1.0, 0.25), (4.0, 1.0), (3.0, 0.75), (5.0, ""), ("", "")]


def test_plot_draws_the_latest_run_of_each_level(tmp_path: Path) -> None:
    columns = ["benchmark", "provider", "dtype", "speedup_vs_grad_cam", "device", "date"]
    old = [{"benchmark": "a", "provider": "xal-engine", "dtype": "fp32", "speedup_vs_grad_cam": "9",
            "device": "cpu", "date": "2026-01-01T00:00:00Z"}]
    new = [{"benchmark": c, "provider": p, "dtype": "fp32", "speedup_vs_grad_cam": s, "device": "gpu",
            "date": "2026-02-01T00:00:00Z"} for c, p, s in (("a", "xal-engine", "3.5"), ("a", "grad-cam", "1"),
                                                           ("b", "xal-engine", "2"), ("b", "plain", ""))]
    with (tmp_path / "batch.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(old + new)
    assert plot.latest_run(old + new) == new
    assert plot.plot_results(tmp_path) == [tmp_path / "batch_speedup.png"]
    assert (tmp_path / "batch_speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_interleaved_times_run_one_call_of_each_provider_per_round() -> None:
    import torch

    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = table.interleaved_times(fns, torch.device("cpu"), warmup=1, repeats=3, budget_s=60.0)
    assert calls == ["a", "b", "c"] * 4  # one warm-up round, then three timed rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_pool_rounds_report_the_median_pass_and_the_largest_memory() -> None:
    from xal_engine.bench.pool import median_pass

    passes = [{"seconds": s, "peak_rss_mb": m, "peak_gpu_mb": 0.0} for s, m in ((3.0, 10.0), (1.0, 30.0), (2.0, 20.0))]
    assert median_pass(passes) == {"seconds": 2.0, "peak_rss_mb": 30.0, "peak_gpu_mb": 0.0}
    assert median_pass(passes[:2])["seconds"] == 1.0  # an even count takes the lower middle pass
