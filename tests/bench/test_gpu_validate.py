"""benchmarks/gpu_validate.py end to end at tiny sizes on the CPU (the code a GPU run executes, so that
nothing in it runs there first), and its bookkeeping by hand: junit counts, goals, failed steps, budgets.
Files, columns and numbers against references; no timing is asserted."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xal_engine.bench import checkout, validate
from xal_engine.errors import XalError

try:
    ROOT = checkout.benchmarks_dir().parent
except XalError:  # an installed package without the checkout's benchmarks/ folder
    pytest.skip("benchmarks/ folder not found next to the package", allow_module_level=True)

CSVS = {"environment": ["key", "value"], "tests": validate.TEST_COLUMNS, "parity": validate.PARITY_COLUMNS,
        "kernel_time": validate.TIME_COLUMNS, "methods": validate.KERNEL_VS_TORCH_COLUMNS,
        "volumes": validate.KERNEL_VS_TORCH_COLUMNS, "pool": validate.POOL_COLUMNS, "goals": validate.GOAL_COLUMNS}


def read(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """One run of the script as a person types it, at tiny sizes (budgets scaled: a loaded CI machine
    is slow, and the budgets' own logic is tested below)."""
    out = tmp_path_factory.mktemp("gpu")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_validate.py"), "--tiny", "--device", "cpu",
                           "--out", str(out), "--budget-scale", "10", "--workdir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    return proc, out


def test_every_step_passes_and_writes_its_files(tiny_run) -> None:
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for i, (name, _) in enumerate(validate.STEPS, 1):  # a progress line per step, start and end
        assert f"[{i}/{len(validate.STEPS)}] {name}: start (budget" in proc.stdout
        assert f"[{i}/{len(validate.STEPS)}] {name}: PASSED in" in proc.stdout
    for name, columns in CSVS.items():
        header, rows = read(out / f"{name}.csv")
        assert header == columns and rows, name
    header, _ = read(out / "batch.csv")
    assert header[:2] == ["arch", "batch"] and "speedup_vs_grad_cam" in header
    assert (out / "tests_junit.xml").exists() and (out / "tests.log").exists()
    summary = (out / "summary.md").read_text()
    assert "All steps passed." in summary and "profile **tiny**" in summary
    for name, _ in validate.STEPS:
        assert f"## {name}: passed" in summary


def test_environment_names_the_device_driver_and_versions(tiny_run) -> None:
    env = {r["key"]: r["value"] for r in read(tiny_run[1] / "environment.csv")[1]}
    for key in ("device", "driver", "python", "torch", "torchvision", "triton", "zarr", "xal_engine", "git_commit"):
        assert env[key] not in ("", None), key
    assert env["device_type"] == "cpu" and env["profile"] == "tiny"
    import torch
    assert env["torch"] == torch.__version__


def test_tests_step_counts_match_its_junit_xml(tiny_run) -> None:
    out = tiny_run[1]
    rows = read(out / "tests.csv")[1]
    total = rows[-1]
    assert total["file"] == "all" and int(total["passed"]) > 0 and total["failed"] == total["errors"] == "0"
    assert int(total["tests"]) == sum(int(r["tests"]) for r in rows[:-1])
    files = {r["file"] for r in rows[:-1]}  # the tiny mode's subset: dispatch and the kernels' tests
    assert files and all(f == "tests/ops/test_dispatch.py" or f.startswith("tests/kernels/test_kernel_")
                         for f in files), files
    assert validate.junit_counts(out / "tests_junit.xml")[-1]["passed"] == int(total["passed"])


def test_parity_values_are_finite_and_within_the_tolerances(tiny_run) -> None:
    rows = read(tiny_run[1] / "parity.csv")[1]
    cases = {(r["case"], r["dtype"], r["layout"]) for r in rows}
    assert cases == {(c.name, d, lay) for c in validate.TINY.parity for d in ("fp32", "bf16")
                     for lay in ("channels_last", "nchw")}
    for r in rows:
        assert r["status"] == "passed" and r["backend"] == "triton (cpu)"  # the kernel, interpreted
        for key, tol in (("max_cam_diff", 1e-5), ("max_dice_diff", 1e-4), ("max_soft_dice_diff", 1e-4),
                         ("max_energy_diff", 1e-4)):
            value = float(r[key])
            assert math.isfinite(value) and 0.0 <= value <= tol, (r["case"], key, value)
        assert r["hit_mismatches"] == "0"


def test_kernel_time_rows_count_the_bytes_the_kernel_must_read(tiny_run) -> None:
    rows = read(tiny_run[1] / "kernel_time.csv")[1]
    case = validate.TINY.timing[0]  # B=3, C=8, 7x7 -> 32x32
    elements = case.batch * case.channels * case.feature**2
    expected = {"fp32": 2 * 4 * elements + case.batch * case.image**2, "bf16": 2 * 2 * elements + case.batch * case.image**2}
    providers = ("triton", validate.OLD_LAYOUT_PROVIDER, "torch")  # the kernel in its two layouts
    assert {(r["dtype"], r["provider"]) for r in rows} == {(d, p) for d in expected for p in providers}
    for r in rows:
        assert int(r["bytes_read"]) == expected[r["dtype"]] == {"fp32": 12480, "bf16": 7776}[r["dtype"]]
        assert r["timer"] == "host perf_counter" and int(r["calls"]) == 3
        gbps = int(r["bytes_read"]) / (float(r["median_ms"]) / 1e3) / 1e9
        assert float(r["gb_per_s"]) == pytest.approx(gbps, rel=0.05, abs=0.01)
        assert float(r["images_per_s"]) == pytest.approx(case.batch / float(r["median_ms"]) * 1e3, rel=0.01)


def test_batch_and_pool_rows_and_their_ratios(tiny_run) -> None:
    out = tiny_run[1]
    batch = read(out / "batch.csv")[1]
    got = {(r["arch"], r["batch"], r["provider"], r["dtype"]): r for r in batch}
    for b in validate.TINY.batch_sizes:
        assert got[("resnet18", str(b), "xal-engine", "fp32")]["check"] == "pass"
        assert got[("resnet18", str(b), "grad-cam", "fp32")]["check"] == "reference"
        assert "not supported" in got[("resnet18", str(b), "grad-cam", "bf16")]["note"]
        engine_bf16 = got[("resnet18", str(b), "xal-engine", "bf16")]
        assert engine_bf16["speedup_vs_grad_cam"] == "" and validate.MISMATCHED in engine_bf16["note"]
        assert float(got[("resnet18", str(b), "xal-engine", "fp32")]["speedup_vs_grad_cam"]) > 0
    pool = read(out / "pool.csv")[1]
    assert {(r["precision"], r["provider"]) for r in pool} == {(p, q) for p in ("bf16", "fp32")
                                                              for q in ("loader", "plain", "xal-engine")}
    for precision in ("bf16", "fp32"):
        rows = {r["provider"]: r for r in pool if r["precision"] == precision}
        engine, plain = rows["xal-engine"], rows["plain"]
        assert engine["check"] == "pass" and engine["status"] == "passed"
        assert int(engine["n_images"]) == validate.TINY.pool_images
        assert float(engine["ratio_vs_plain"]) == pytest.approx(float(plain["seconds"]) / float(engine["seconds"]),
                                                                rel=0.01, abs=0.002)
        assert float(engine["projected_1m_s"]) == pytest.approx(1e6 / float(engine["images_per_s"]), rel=0.01)


def test_goals_report_the_measured_values_and_do_not_apply_at_tiny_sizes(tiny_run) -> None:
    out = tiny_run[1]
    goals = read(out / "goals.csv")[1]
    pool = {(r["precision"], r["provider"]): r for r in read(out / "pool.csv")[1]}
    assert len(goals) == len(validate.TINY.goals) and {g["status"] for g in goals} == {"n/a (tiny sizes)"}
    assert float(goals[0]["measured"]) == pytest.approx(float(pool[("bf16", "xal-engine")]["ratio_vs_plain"]))
    assert float(goals[2]["measured"]) == pytest.approx(float(pool[("bf16", "xal-engine")]["images_per_s"]))
    assert "## goals: passed" in (out / "summary.md").read_text()


def test_precision_matched_drops_only_the_cross_precision_ratio() -> None:
    fp32 = {"dtype": "fp32", "speedup_vs_grad_cam": 3.0, "note": ""}
    assert validate.precision_matched(fp32) == fp32
    bf16 = validate.precision_matched({"dtype": "bf16", "speedup_vs_grad_cam": 7.5, "ratio_vs_plain": 0.9, "note": ""})
    assert bf16 == {"dtype": "bf16", "speedup_vs_grad_cam": "", "ratio_vs_plain": 0.9, "note": validate.MISMATCHED}


def test_junit_counts_by_hand(tmp_path: Path) -> None:
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.ops.test_a" name="t1" time="0.5"/>'
        '<testcase classname="tests.ops.test_a.TestX" name="t2" time="0.25"><failure message="x"/></testcase>'
        '<testcase classname="tests.kernels.test_k" name="t3" time="1"><skipped message="no gpu"/></testcase>'
        '<testcase classname="tests.kernels.test_k" name="t4" time="1"><error message="e"/></testcase>'
        '</testsuite></testsuites>')
    rows = validate.junit_counts(tmp_path / "j.xml")
    assert rows == [
        {"file": "tests/kernels/test_k.py", "tests": 2, "passed": 0, "failed": 0, "errors": 1, "skipped": 1,
         "seconds": 2.0},
        {"file": "tests/ops/test_a.py", "tests": 2, "passed": 1, "failed": 1, "errors": 0, "skipped": 0,
         "seconds": 0.75},
        {"file": "all", "tests": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1, "seconds": 2.75},
    ]


def test_goals_pass_fail_and_not_measured_by_hand() -> None:
    pool = [{"arch": "resnet18", "precision": "bf16", "provider": "xal-engine", "ratio_vs_plain": 0.97,
             "images_per_s": 15000.0},
            {"arch": "resnet18", "precision": "fp32", "provider": "xal-engine", "ratio_vs_plain": "",
             "images_per_s": ""}]
    batch = [{"arch": "resnet50", "batch": 64, "dtype": "fp32", "provider": "xal-engine", "speedup_vs_grad_cam": 25.0},
             {"arch": "resnet50", "batch": 64, "dtype": "bf16", "provider": "xal-engine", "speedup_vs_grad_cam": 60.0}]
    methods = [{"method": "gradcam", "dtype": "bf16", "speedup_vs_torch": 12.5},
               {"method": "layercam", "dtype": "bf16", "speedup_vs_torch": 4.0},
               {"method": "gradcam++", "dtype": "fp32", "speedup_vs_torch": 30.0}]  # fp32: not the goal's row
    volumes = [{"dtype": "bf16", "largest": "no", "speedup_vs_torch": 50.0},
               {"dtype": "bf16", "largest": "yes", "speedup_vs_torch": 9.0}]
    results = {"pool": validate.StepOutput(pool, [], True, ""), "batch": validate.StepOutput(batch, [], True, ""),
               "methods": validate.StepOutput(methods, [], True, ""),
               "volumes": validate.StepOutput(volumes, [], True, "")}
    rows = validate.evaluate_goals(validate.FULL, results)
    by_method = {"gradcam": (12.5, "PASS"), "layercam": (4.0, "FAIL")}
    assert [(r["measured"], r["status"]) for r in rows] == [
        (0.97, "PASS"), ("", "not measured"), (15000.0, "FAIL"), (25.0, "PASS"), ("", "not measured"),
        *(by_method.get(m, ("", "not measured")) for m in validate.CAM_METHOD_NAMES), (9.0, "FAIL")]


def test_a_failing_step_is_recorded_and_the_next_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: validate.Context) -> validate.StepOutput:
        raise RuntimeError("simulated failure")

    steps = dict(validate.STEPS)
    monkeypatch.setattr(validate, "STEPS", (("environment", steps["environment"]), ("parity", broken),
                                            ("goals", steps["goals"])))
    code = validate.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--steps", "environment,parity,goals"])
    assert code == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "**Failed steps: parity.**" in summary and "RuntimeError: simulated failure" in summary
    assert "## goals: passed" in summary and (tmp_path / "goals.csv").exists()
    assert "simulated failure" in (tmp_path / "parity.error.txt").read_text()
    assert {r["status"] for r in read(tmp_path / "goals.csv")[1]} == {"not measured"}


def test_a_spent_budget_skips_the_remaining_cases_and_fails_the_step(tmp_path: Path) -> None:
    assert validate.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--steps", "parity",
                          "--budget-scale", "0"]) == 1
    rows = read(tmp_path / "parity.csv")[1]
    assert len(rows) == 2 * 2 * len(validate.TINY.parity) and {r["status"] for r in rows} == {"skipped (budget)"}


def test_unknown_steps_are_refused() -> None:
    with pytest.raises(SystemExit):
        validate.parse_args(["--steps", "parity,gpu"])
    assert validate.parse_args(["--steps", "goals"]).steps == ["goals"]


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "tpu"], "device 'tpu' is not valid"),
    (["--budget-scale", "-1"], "--budget-scale: expected a factor >= 0, got -1.0"),
    (["--tiny", "--device", "cpu", "--out", "/proc/no-such-folder/out"], "--out /proc/no-such-folder/out: cannot create"),
])
def test_bad_flags_and_a_missing_device_are_one_line_and_exit_2(args, message) -> None:
    """As a person types them: one line on stderr naming the flag, exit code 2, no traceback."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_validate.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and message in lines[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("gpu_validate.py: error: ")


def test_the_gpu_profile_covers_the_issue_and_fits_in_eight_minutes() -> None:
    full = validate.FULL
    shapes = {(c.channels, c.feature, c.image) for c in full.parity}
    assert {(512, 7, 224), (2048, 7, 224), (1024, 7, 224)} <= shapes  # resnet18/50 layer4, densenet121
    assert {(14, 512), (32, 1024)} <= {(c.feature, c.image) for c in full.parity}
    assert {(c.name, c.channels, c.feature, c.image) for c in full.timing} == {
        (c.name, c.channels, c.feature, c.image) for c in full.parity}
    assert set(full.batch_archs) == {"resnet18", "resnet50", "densenet121"} and full.batch_sizes == (64, 256)
    assert full.pool_images >= 32_768 and full.pool_image == 224 and set(full.pool_precisions) == {"bf16", "fp32"}
    assert set(full.tests) == {"tests/kernels", "tests/ops", "tests/core/test_scoring.py", "tests/jobs/test_score.py"}
    assert all((ROOT / t).exists() for t in full.tests)
    assert set(full.budgets_s) == {name for name, _ in validate.STEPS} == set(validate.TINY.budgets_s)
    assert sum(full.budgets_s.values()) <= 470  # 8 minutes, with ~10 s to start Python and torch
    assert full.goals_apply and not validate.TINY.goals_apply


def test_every_cam_method_and_the_volume_kernel_match_the_reference(tiny_run) -> None:
    """The method and volume steps: one row per method (or volume case) and dtype, the kernel within
    the parity tolerances of the torch reference, both timed, the speedup their ratio."""
    out = tiny_run[1]
    methods = read(out / "methods.csv")[1]
    assert sorted({r["method"] for r in methods}) == sorted(validate.CAM_METHOD_NAMES)
    volumes = read(out / "volumes.csv")[1]
    assert volumes and all("x".join(["3"] * 3) in r["sizes"] for r in volumes)
    for row in methods + volumes:
        assert row["status"] == "passed", row
        assert float(row["max_cam_diff"]) <= validate.TOLERANCES["cam"]
        assert float(row["max_dice_diff"]) <= validate.TOLERANCES["dice"]
        kernel, torch_ms = float(row["kernel_ms"]), float(row["torch_ms"])
        assert kernel > 0 and torch_ms > 0
        assert math.isclose(float(row["speedup_vs_torch"]), torch_ms / kernel, rel_tol=1e-2, abs_tol=1e-3)


def test_the_tests_step_without_its_runner_names_what_to_install(tmp_path: Path, monkeypatch) -> None:
    """A `[cpu]`-only install has no pytest: the tests step fails with what to install, in its detail
    and in tests.log, instead of 'no junit xml'."""
    monkeypatch.setattr(validate, "TEST_RUNNER", "xal_engine_no_such_test_runner")
    ctx = validate.Context(out=tmp_path, device=validate.torch.device("cpu"), profile=validate.TINY, workdir=None)
    ctx.deadline = math.inf
    result = validate.step_tests(ctx)
    want = (f"xal_engine_no_such_test_runner is not installed for {sys.executable}: install the dev extra "
            "(pip install -e '.[cpu,dev]') and run again")
    assert not result.ok and result.rows == [] and result.detail == want
    assert (tmp_path / "tests.log").read_text() == want + "\n" and not (tmp_path / "tests_junit.xml").exists()
