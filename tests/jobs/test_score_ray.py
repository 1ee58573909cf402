"""Ray scoring: equals the local scorer bit for bit, survives a killed worker, resumes, refuses bad input.

One local Ray instance (2 CPUs) serves the whole module; Ray's start-up dominates the run time.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_score import UNIT, make_model, make_pool, read_run, wait_for_done_units

from xal_engine.cli import main
from xal_engine.core.models import load_checkpoint
from xal_engine.errors import XalError
from xal_engine.jobs.score import ScoreConfig, open_run, score_pool
from xal_engine.jobs.score_ray import (
    MISSING_RAY,
    RayConfig,
    ScorerActor,
    check_reachable,
    import_ray,
    score_pool_ray,
)
from xal_engine.store import Pool
from xal_engine.store.score_run import ScoreRun

N = 48  # 6 work units of 8 images; 64x64 gives layer4 a 2x2 map, so the CAMs are not constant
FAULT_ENV = "XAL_TEST_RAY_FAULT_FILE"


class DiesOnceActor(ScorerActor):
    """A scorer actor whose first call that removes the file named by $XAL_TEST_RAY_FAULT_FILE kills its
    own process (os._exit) after writing its units and before returning, so that Ray retries the call
    on a restarted actor. Removing the file is atomic, so this happens once."""

    def __call__(self, batch):
        out = super().__call__(batch)
        path = os.environ.get(FAULT_ENV)
        if path:
            try:
                os.remove(path)
            except FileNotFoundError:
                return out
            os._exit(1)
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install 'xal-engine[ray]')")
    root = tmp_path_factory.mktemp("ray")
    fault = root / "kill-one-actor"  # the fault-injection switch, armed by one test only
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {FAULT_ENV: str(fault)}})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this file
    yield root, fault
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(cluster):
    root, fault = cluster
    pool = make_pool(root / "pool.zarr", n=N, size=64)
    model = make_model(root / "model.pt")
    local = score_pool(pool, model, config("ref"))
    assert local.complete and local.images == N
    ref = read_run(pool, "ref")
    assert np.nanmax(ref["dice"]) > 0 and np.unique(ref["soft_dice"][np.isfinite(ref["soft_dice"])]).size > 10
    return pool, model, local, ref, fault


def cli_has_ray_flags() -> bool:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["score", "--help"])
    return "--address" in out.getvalue()


needs_cli = pytest.mark.skipif(not cli_has_ray_flags(),
                               reason="xal_engine/cli/score.py does not have --backend ray yet")


def config(run: str, **kw) -> ScoreConfig:
    return ScoreConfig(unit_size=UNIT, run=run, batch_size=UNIT, num_workers=0, device="cpu", **kw)


def assert_bit_equal(got: dict, want: dict) -> None:
    for field, value in want.items():
        np.testing.assert_array_equal(got[field], value, err_msg=field)  # NaNs compare equal


def test_ray_run_equals_the_local_scorer_bit_for_bit(setup):
    pool, model, local, ref, _ = setup
    summary = score_pool_ray(pool, model, config("ray"), RayConfig(workers=2, units_per_call=1))
    assert summary.complete and summary.images == N and summary.units == N // UNIT
    assert summary.units_already_done == 0 and summary.device == "ray:2xcpu"
    assert_bit_equal(read_run(pool, "ray"), ref)
    assert summary.mean_dice == pytest.approx(local.mean_dice, rel=1e-12)
    assert sum(w.images for w in summary.workers) == N
    assert sum(w.units for w in summary.workers) == N // UNIT
    assert all(w.images_per_s > 0 for w in summary.workers)


def test_ray_stores_the_same_cams_as_the_local_scorer(setup):
    pool, model, _, ref, _ = setup
    score_pool(pool, model, config("cams-local", save_cams=True))
    summary = score_pool_ray(pool, model, config("cams-ray", save_cams=True), RayConfig(workers=1))
    assert summary.complete and summary.images == N
    assert_bit_equal(read_run(pool, "cams-ray"), ref)  # the other fields are unchanged
    assert_bit_equal(read_run(pool, "cams-local"), ref)
    runs = Pool.open(pool).group["scores"]
    cams = np.asarray(runs["cams-ray"]["cam"][:])
    assert cams.shape == (N, 2, 2) and cams.dtype == np.float16  # layer4 at 64 x 64
    np.testing.assert_array_equal(cams, np.asarray(runs["cams-local"]["cam"][:]))


def test_ray_stores_the_same_embeddings_and_mc_fields_as_the_local_scorer(setup):
    """--embeddings and --mc-samples through Ray's actors: every field, the new ones included, equals
    the local scorer's bit for bit (MC masks are keyed by pool index, not by the actor or batch)."""
    pool, model, _, ref, _ = setup
    extra = {"embeddings": True, "mc_samples": 3, "mc_dropout": 0.3}
    score_pool(pool, model, config("mc-local", **extra))
    summary = score_pool_ray(pool, model, config("mc-ray", **extra), RayConfig(workers=2, units_per_call=1))
    assert summary.complete and summary.images == N
    fields = ("embedding", "bald", "mc_entropy", "variation_ratio")
    group = Pool.open(pool).group
    got = ScoreRun.open(group, "mc-ray").read((*ref, *fields))
    want = ScoreRun.open(group, "mc-local").read((*ref, *fields))
    assert_bit_equal(got, want)
    assert_bit_equal({k: got[k] for k in ref}, ref)  # the deterministic fields are the plain run's
    assert np.isfinite(got["bald"]).all() and got["embedding"].shape == (N, 512)


def test_rerun_after_completion_does_no_work_on_either_backend(setup):
    pool, model, _, _, _ = setup
    again = score_pool_ray(pool, model, config("ray"), RayConfig(workers=2))
    assert (again.images, again.units, again.units_already_done) == (0, 0, N // UNIT)
    assert again.complete and again.workers == ()
    local = score_pool(pool, model, config("ray"))  # same fingerprint: the local scorer agrees
    assert local.images == 0 and local.complete


def test_a_killed_worker_is_retried_and_the_run_completes(setup):
    pool, model, _, ref, fault = setup
    fault.touch()  # the first actor call that finds it dies (os._exit) after writing its units
    summary = score_pool_ray(pool, model, config("fault"), RayConfig(workers=1, units_per_call=1),
                             actor=DiesOnceActor)
    assert not fault.exists(), "no actor died"
    assert summary.complete and summary.images == N  # the retried call is counted once
    assert sum(w.units for w in summary.workers) == N // UNIT
    assert_bit_equal(read_run(pool, "fault"), ref)


def test_ray_and_local_shards_together_equal_one_run(setup):
    pool, model, _, ref, _ = setup
    second = score_pool_ray(pool, model, config("mixed", shard_id=1, num_shards=2), RayConfig(workers=1))
    done = ScoreRun.open(Pool.open(pool).group, "mixed").done_mask()
    assert not second.complete and second.images == N // 2
    assert done[done.size // 2:].all() and not done[: done.size // 2].any()  # only its own units
    first = score_pool(pool, model, config("mixed", shard_id=0, num_shards=2))
    assert first.complete and first.images == N // 2
    assert_bit_equal(read_run(pool, "mixed"), ref)


def test_a_killed_driver_resumes_from_the_done_flags(setup, tmp_path):
    import ray

    _, model, _, _, _ = setup
    pool = make_pool(tmp_path / "big.zarr", n=12 * UNIT, size=64)
    # a second driver on the same cluster (--address), SIGKILLed once it has finished some units
    script = ("import sys; from xal_engine.jobs.score import ScoreConfig; "
              "from xal_engine.jobs.score_ray import RayConfig, score_pool_ray; "
              f"score_pool_ray(sys.argv[1], sys.argv[2], ScoreConfig(unit_size={UNIT}, run='r', batch_size={UNIT}, "
              "num_workers=0, device='cpu'), RayConfig(address=sys.argv[3], workers=1, units_per_call=1))")
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", script, str(pool), str(model), address],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_done_units(proc, pool / "scores" / "r", timeout=60)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    n_done = int(ScoreRun.open(Pool.open(pool).group, "r").done_mask().sum())
    assert 0 < n_done < 12, f"the kill was not mid-way ({n_done} of 12 units done): {err.decode()[-300:]}"
    resumed = score_pool_ray(pool, model, config("r"), RayConfig(workers=1))
    # the killed job's actor may finish one more unit before Ray reaps it
    assert resumed.units_already_done >= n_done and resumed.complete
    assert resumed.images == 12 * UNIT - UNIT * resumed.units_already_done
    score_pool(pool, model, config("whole"))
    assert_bit_equal(read_run(pool, "r"), read_run(pool, "whole"))


@pytest.mark.slow
def test_a_killed_local_instance_leaves_no_process_and_holds_the_shard_meanwhile(setup, tmp_path):
    """`score --backend ray` on its own local instance: while it runs, its shard lock refuses a second
    scorer; SIGKILLed, every process it started is gone within seconds (Ray's agents alone would wait
    60 s on a dead GCS, its actor about 2 s), and a local rerun completes the run bit for bit."""
    from xal_engine.jobs.reaper import descendants, start_time
    from xal_engine.store.locks import LockHeld

    _, model, _, _, _ = setup
    pool = make_pool(tmp_path / "solo.zarr", n=40 * UNIT, size=64)
    cli = "import sys; from xal_engine.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["score", "--pool", str(pool), "--model", str(model), "--run", "r", "--backend", "ray",
            "--workers", "1", "--units-per-call", "1", "--batch-size", str(UNIT), "--unit-size", str(UNIT), "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-c", cli, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "RAY_ADDRESS": ""})
    started: dict[int, int] = {}
    try:
        done_dir = pool / "scores" / "r" / "done" / "c"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if done_dir.is_dir() and len(list(done_dir.iterdir())) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-500:] if proc.stderr else ""
        with pytest.raises(LockHeld, match=f"score run 'r' shard 0/1 .* is in use by pid {proc.pid}"):
            score_pool(pool, model, config("r"))
        started = descendants(proc.pid)
        assert len(started) >= 3, started  # raylet, GCS, agents, the actor, the reaper
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(start_time(p) == t for p, t in started.items()):
            time.sleep(0.1)
        left = [p for p, t in started.items() if start_time(p) == t]
        assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p, t in started.items():
            if start_time(p) == t:
                os.kill(p, signal.SIGKILL)
        if proc.stderr:
            proc.stderr.close()
    n_done = int(ScoreRun.open(Pool.open(pool).group, "r").done_mask().sum())
    assert 0 < n_done < 40
    resumed = score_pool(pool, model, config("r"))  # the lock went with the driver
    assert resumed.complete and resumed.units_already_done == n_done
    score_pool(pool, model, config("whole"))
    assert_bit_equal(read_run(pool, "r"), read_run(pool, "whole"))


def test_gpu_requests_without_gpus_are_refused(setup):
    pool, model, _, _, _ = setup
    with pytest.raises(XalError, match="needs GPUs on the Ray cluster"):
        score_pool_ray(pool, model, ScoreConfig(unit_size=UNIT, run="gpu", device="cuda"), RayConfig(workers=1))
    with pytest.raises(XalError, match="--device cpu conflicts"):
        score_pool_ray(pool, model, config("gpu"), RayConfig(workers=1, num_gpus_per_worker=1))


def test_another_config_under_the_same_run_name_is_refused(setup):
    pool, model, _, _, _ = setup
    with pytest.raises(XalError, match=r"different configuration \(threshold\)"):
        score_pool_ray(pool, model, config("ray", threshold=0.3), RayConfig(workers=1))


def corrupt_copy(pool: Path, dest: Path, model: Path, run: str) -> Path:
    """A copy of `pool` with run `run` created and unit 1's image chunk overwritten with garbage."""
    shutil.copytree(pool, dest)
    open_run(Pool.open(dest, mode="r+"), model, load_checkpoint(model)[1], config(run))
    (dest / "images" / "c" / "1" / "0" / "0" / "0").write_bytes(b"not a blosc chunk")
    return dest


def test_actor_returns_user_errors_as_rows_and_leaves_the_unit_pending(tmp_path):
    pool = make_pool(tmp_path / "pool.zarr", n=2 * UNIT)
    model = make_model(tmp_path / "model.pt")
    bad = corrupt_copy(pool, tmp_path / "bad.zarr", model, "r")
    actor = ScorerActor(str(bad), str(model), config("r"), "cpu")  # in-process: no Ray needed
    out = actor({"first_unit": np.array([0, 1]), "stop_unit": np.array([1, 2])})
    assert out["unit"].tolist() == [-1] and "images" in out["error"][0] and "8..15" in out["error"][0]
    assert ScoreRun.open(Pool.open(bad).group, "r").done_mask().tolist() == [True, False]
    lost = ScorerActor(str(tmp_path / "elsewhere.zarr"), str(model), config("r"), "cpu")
    out = lost({"first_unit": np.array([0]), "stop_unit": np.array([1])})
    assert "elsewhere.zarr does not exist" in out["error"][0] and out["error"][0].startswith("worker ")


def test_an_actor_error_reaches_the_driver_as_one_xal_error(setup, tmp_path):
    pool, model, _, _, _ = setup
    bad = corrupt_copy(pool, tmp_path / "bad.zarr", model, "r")
    with pytest.raises(XalError, match=r"images.*8\.\.15"):
        score_pool_ray(bad, model, config("r"), RayConfig(workers=1))


@pytest.mark.parametrize("kw, flag", [
    ({"workers": 0}, "--workers"),
    ({"num_gpus_per_worker": -1}, "--num-gpus-per-worker"),
    ({"num_cpus_per_worker": 0}, "--num-cpus-per-worker"),
    ({"units_per_call": 0}, "--units-per-call"),
])
def test_ray_config_errors_name_the_flag(kw, flag):
    with pytest.raises(XalError, match=flag):
        RayConfig(**kw)


def test_an_address_nobody_listens_on_fails_fast():
    with pytest.raises(XalError, match="--address 127.0.0.1:1: no Ray cluster answers there"):
        check_reachable("127.0.0.1:1")  # port 1: connection refused at once
    check_reachable("auto")  # names Ray resolves itself are left to Ray
    check_reachable("ray://head:10001")


def test_missing_ray_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(XalError) as err:
        import_ray()
    assert str(err.value) == MISSING_RAY


@needs_cli
def test_score_cli_backend_ray_prints_per_worker_throughput(setup, capsys):
    pool, model, _, ref, _ = setup
    rc = main(["score", "--pool", str(pool), "--model", str(model), "--run", "cli", "--batch-size", str(UNIT), "--unit-size", str(UNIT),
               "--device", "cpu", "--backend", "ray", "--workers", "1", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["images"] == N and summary["device"] == "ray:1xcpu"
    assert sum(w["images"] for w in summary["workers"]) == N
    assert_bit_equal(read_run(pool, "cli"), ref)


@needs_cli
def test_score_cli_without_ray_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # checked before the pool and the model are read
    argv = ["--pool", str(tmp_path / "p.zarr"), "--model", str(tmp_path / "m.pt"), "--backend", "ray"]
    assert main(["score", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and MISSING_RAY in err
