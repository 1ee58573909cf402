"""Pools in an S3 bucket (moto's server on 127.0.0.1, see conftest.py) through the CLI and the jobs:
every step equals the same step on a local copy of the pool, bit for bit; bad locations are one line,
exit 2, and write nothing."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xal_engine.cli import main
from xal_engine.core.fields import REQUIRED_NAMES
from xal_engine.errors import PoolError
from xal_engine.ingest.synthetic import SyntheticConfig, assign_splits, class_names, generate_block
from xal_engine.jobs.score import ScoreConfig, score_pool
from xal_engine.store import PER_IMAGE_ARRAYS, SPLIT_TRAIN, Pool, PoolWriter
from xal_engine.store.location import StoreURL, parse_location
from xal_engine.store.score_run import ScoreRun

pytestmark = pytest.mark.usefixtures("one_thread")

N, SIZE, CHUNK = 96, 32, 16  # 6 chunks; units of one chunk in most runs, so shards and workers get some
CREATE = ["--synthetic", "--n", str(N), "--size", str(SIZE), "--classes", "3", "--seed", "3"]
TRAIN = ["--epochs", "1", "--batch-size", "16", "--num-workers", "0", "--device", "cpu",
         "--target-layer", "layer2", "--seed", "0"]
SCORE = ["--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--unit-size", str(CHUNK)]


def run_fields(pool: str | Path, run: str) -> dict[str, np.ndarray]:
    return ScoreRun.open(Pool.open(pool).group, run).read(REQUIRED_NAMES)


def assert_same_run(a: str | Path, b: str | Path, run_a: str, run_b: str | None = None) -> None:
    want, got = run_fields(a, run_a), run_fields(b, run_b or run_a)
    for name in REQUIRED_NAMES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)  # NaNs compare equal


def pool_arrays(path: str | Path) -> dict[str, np.ndarray]:
    pool = Pool.open(path)
    return {name: np.asarray(pool.group[name][:]) for name in PER_IMAGE_ARRAYS}


def make_pool(path: str | Path) -> str:
    """A synthetic phantom pool in chunks of CHUNK images (many work units), the same at any location."""
    cfg = SyntheticConfig(n=N, size=SIZE, classes=3, channels=1, seed=3)
    split = assign_splits(N, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    with PoolWriter(path, channels=1, height=SIZE, width=SIZE, dtype=np.uint8, classes=class_names(3),
                    chunk_size=CHUNK) as w:
        g = generate_block(cfg, 0, split)
        w.append(g.images, g.rois, g.has_roi, g.labels, g.ids, g.split)
    return str(path)


@pytest.fixture(scope="module")
def pair(s3, tmp_path_factory):
    """The same pool at s3://… and on disk, and a model trained on the local one (the scoring steps
    use it for both)."""
    root = tmp_path_factory.mktemp("pair")
    local, remote = make_pool(root / "pool.zarr"), make_pool(s3.url("pair/pool.zarr"))
    model = root / "model.pt"
    assert main(["train", "--pool", local, "--out", str(model), *TRAIN]) == 0
    return root, local, remote, model


def test_urls_parse_to_object_store_locations_and_file_urls_to_paths():
    assert parse_location("s3://b/p/pool.zarr/") == StoreURL("s3://b/p/pool.zarr")
    assert parse_location("file:///data/pool.zarr") == Path("/data/pool.zarr")
    assert parse_location("pool.zarr") == Path("pool.zarr")
    with pytest.raises(PoolError, match="needs a bucket and a key"):
        parse_location("s3://bucket-only")
    with pytest.raises(PoolError, match="unsupported URL scheme 'ftp://'"):
        parse_location("ftp://host/pool.zarr")


def test_pool_create_at_s3_equals_the_local_pool_and_validates(s3, tmp_path, capsys):
    local, remote = tmp_path / "pool.zarr", s3.url("created/pool.zarr")
    for out in (local, remote):
        assert main(["pool", "create", *CREATE, "--out", str(out)]) == 0
    for name, want in pool_arrays(local).items():
        np.testing.assert_array_equal(pool_arrays(remote)[name], want, err_msg=name)
    assert Pool.open(remote).attrs == Pool.open(local).attrs
    capsys.readouterr()
    assert main(["pool", "validate", remote]) == 0
    assert capsys.readouterr().out.strip() == f"{remote}: valid ({N} images, 1 chunk decoded and checked)"
    assert main(["pool", "info", "--json", remote]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["path"], info["n"]) == (remote, N)
    stored = s3.keys()
    assert "created/pool.zarr/zarr.json" in stored and not [k for k in stored if ".partial" in k]


def test_ingest_into_s3_equals_the_local_ingest(s3, tmp_path, monkeypatch, capsys):
    """`ingest --out s3://…`: the same pool as a local ingest; its report goes to the working directory."""
    from xal_engine.ingest.samples import write_brats_case

    seg = np.zeros((16, 16, 4), np.uint8)
    seg[2:14, 2:14, 1] = 2
    seg[4:8, 4:8, 1] = 4
    for i in range(3):
        write_brats_case(tmp_path / "src", f"BraTS20_Training_{i:03d}", seg)
    monkeypatch.chdir(tmp_path)
    local, remote = tmp_path / "local.zarr", s3.url("ingested/brats.zarr")
    for out in (local, remote):
        assert main(["ingest", "brats", str(tmp_path / "src"), "--out", str(out), "--size", "8",
                     "--min-tumour-voxels", "140", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].endswith(f"-> {remote} [train 2 / val 0 / test 1]; report brats.zarr.ingest.json")
    for name, want in pool_arrays(local).items():
        np.testing.assert_array_equal(pool_arrays(remote)[name], want, err_msg=name)
    assert json.loads((tmp_path / "brats.zarr.ingest.json").read_text())["pool"] == remote
    assert not (tmp_path / "brats.zarr.ingest.progress.jsonl").exists()


def test_training_on_the_s3_pool_gives_the_local_weights(pair):
    root, _, remote, model = pair
    out = root / "model-s3.pt"
    assert main(["train", "--pool", remote, "--out", str(out), *TRAIN]) == 0
    want, got = torch.load(model, weights_only=False), torch.load(out, weights_only=False)
    assert want["state_dict"].keys() == got["state_dict"].keys()
    for name, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], value, rtol=0, atol=0, msg=name)


def test_a_chunk_lost_on_s3_is_refused_on_read_from_one_listing_per_array(s3, monkeypatch):
    """On an object store the stored chunks of an array are listed once, on its first read (not at
    open, and not one request per chunk): a lost chunk is refused, the chunks around it read."""
    url = make_pool(s3.url("lost/pool.zarr"))
    s3.delete("lost/pool.zarr/split/c/1")
    from xal_engine.store import pool as pool_module

    listed = []
    listing = pool_module.missing_chunks
    monkeypatch.setattr(pool_module, "missing_chunks", lambda array: listed.append(array.path) or listing(array))
    p = Pool.open(url)
    assert listed == []
    assert p.read(0, 16).split.shape == (16,) and p.take("split", np.array([40])).shape == (1,)
    with pytest.raises(PoolError, match=r"array 'split' chunk 1 \(images 16\.\.31\)"):
        p.read(16, 32)
    assert p.missing_chunks("split") == [1] and p.missing_chunks("images") == []
    assert sorted(listed) == sorted(PER_IMAGE_ARRAYS)  # read() reads every array, each listed once


def test_score_select_and_label_import_equal_the_local_steps(pair, tmp_path, capsys):
    _, local, remote, model = pair
    for pool in (local, remote):
        assert main(["score", "--pool", str(pool), "--model", str(model), "--run", "r", *SCORE]) == 0
    assert_same_run(local, remote, "r")
    rows = {}
    for name, pool in (("local", local), ("s3", remote)):
        out = tmp_path / f"{name}.csv"
        assert main(["select", "--pool", str(pool), "--run", "r", "--budget", "10", "--device", "cpu",
                     "--out", str(out)]) == 0
        rows[name] = list(csv.reader(out.open()))
    assert rows["s3"] == rows["local"] and len(rows["local"]) == 11
    pool = Pool.open(local)
    train = np.flatnonzero(pool.column("split") == SPLIT_TRAIN)[:5]
    labels = tmp_path / "labels.csv"
    labels.write_text("id,class\n" + "".join(f"{pool.column('ids')[i]},{i % 3}\n" for i in train))
    for target in (local, remote):
        assert main(["label", "--pool", str(target), "--import", str(labels), "--experiment", "e"]) == 0
    capsys.readouterr()
    for name in ("labels", "rois", "has_roi"):
        np.testing.assert_array_equal(pool_arrays(remote)[name], pool_arrays(local)[name], err_msg=name)
    records = [[{k: v for k, v in r.items() if k != "time"} for r in Pool.open(p).labels_history().records()]
               for p in (local, remote)]
    assert records[0] == records[1] and len(records[0]) == 1


def test_shards_on_s3_together_equal_the_local_run(pair):
    _, local, remote, model = pair
    score_pool(local, model, ScoreConfig(run="whole", unit_size=CHUNK, batch_size=8, num_workers=0,
                                         device="cpu"))
    for shard in (0, 1):
        assert main(["score", "--pool", remote, "--model", str(model), "--run", "sharded", *SCORE,
                     "--shard-id", str(shard), "--num-shards", "2"]) == 0
    assert ScoreRun.open(Pool.open(remote).group, "sharded").is_complete()
    assert_same_run(local, remote, "whole", "sharded")


@pytest.mark.slow
def test_score_killed_on_s3_resumes_to_the_uninterrupted_result(pair, s3):
    """SIGKILL once some units' done flags are in the bucket; the same command completes the run, bit
    for bit equal to an uninterrupted local run."""
    _, local, remote, model = pair
    score_pool(local, model, ScoreConfig(run="k", unit_size=8, batch_size=4, num_workers=0, device="cpu"))
    cmd = [sys.executable, "-m", "xal_engine", "score", "--pool", remote, "--model", str(model),
           "--run", "k", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--unit-size", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(s3.keys("pair/pool.zarr/scores/k/done/c/")) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = ScoreRun.open(Pool.open(remote).group, "k")
    n_done = int(run.done_mask().sum())
    assert 0 < n_done < run.n_units, f"the kill was not mid-way ({n_done} of {run.n_units} done)"
    resumed = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True,
                                        timeout=300).stdout)
    assert resumed["complete"] and resumed["units_already_done"] == n_done
    assert_same_run(local, remote, "k")


@pytest.mark.slow
def test_two_round_loop_on_s3_equals_the_local_loop(pair, tmp_path):
    _, local, remote, _ = pair
    metrics = {}
    for name, pool in (("local", local), ("s3", remote)):
        out = tmp_path / name
        assert main(["loop", "--pool", str(pool), "--out", str(out), "--strategy", "dual", "--initial", "20",
                     "--per-round", "10", "--rounds", "2", "--seeds", "1", "--epochs", "1", "--batch-size",
                     "16", "--num-workers", "0", "--device", "cpu", "--target-layer", "layer2"]) == 0
        with (out / "metrics.csv").open() as f:
            metrics[name] = [{k: v for k, v in row.items() if not k.endswith("seconds")}
                             for row in csv.DictReader(f)]
    assert metrics["s3"] == metrics["local"] and len(metrics["local"]) == 3
    experiments = Pool.open(local).subgroups("al")
    assert experiments and experiments == Pool.open(remote).subgroups("al")
    for experiment in experiments:
        np.testing.assert_array_equal(Pool.open(remote).read_labelled_round(experiment),
                                      Pool.open(local).read_labelled_round(experiment))
    config = json.loads((tmp_path / "s3" / "config.json").read_text())
    assert config["pool"] == remote
    sheets = {}
    for name in ("local", "s3"):  # `report` reopens the pool its config.json names: the URL
        from xal_engine.jobs.report import ReportConfig, make_report
        files = make_report(tmp_path / name, None, None, ReportConfig(device="cpu"))
        assert not [n for n in files.notes if "not found" in n], files.notes
        sheets[name] = len(files.sheets)
    assert sheets["s3"] == sheets["local"] >= 1


@pytest.mark.slow
def test_ray_backend_with_two_workers_on_s3_equals_the_local_run(pair):
    pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    from xal_engine.jobs.score_ray import RayConfig, score_pool_ray

    _, local, remote, model = pair
    config = ScoreConfig(run="ray", unit_size=CHUNK, batch_size=8, num_workers=0, device="cpu")
    score_pool(local, model, config)
    summary = score_pool_ray(remote, model, config, RayConfig(workers=2, units_per_call=1))
    assert summary.complete and summary.images == N
    assert len({w.worker for w in summary.workers}) == 2  # both actors got units and wrote them
    assert_same_run(local, remote, "ray")


def test_loader_workers_asked_for_over_s3_read_in_process_and_equal_the_local_run(pair):
    """obstore's runtime does not survive a fork: with --num-workers 1 the scorer reads an object-store
    pool through its in-process read-ahead threads instead, and stores what the local pool gives."""
    _, local, remote, model = pair
    argv = ["score", "--pool", remote, "--model", str(model), "--run", "forked", *SCORE]
    argv[argv.index("--num-workers") + 1] = "1"
    assert main(argv) == 0
    assert main(["score", "--pool", str(local), "--model", str(model), "--run", "forked", *SCORE]) == 0
    assert_same_run(local, remote, "forked")


# ---------------------------------------------------------------------------- bad locations
def _unfinished(s3) -> str:
    url = s3.url("bad/unfinished.zarr")
    writer = PoolWriter(url, channels=1, height=8, width=8, dtype=np.uint8, classes=["a", "b"], chunk_size=4)
    writer.append(np.zeros((4, 1, 8, 8), np.uint8), np.zeros((4, 8, 8), bool), np.zeros(4, bool),
                  np.zeros(4, np.int16), [f"i{i}" for i in range(4)], np.zeros(4, np.uint8))
    return url  # never closed: a killed writer


BAD = {
    "unknown bucket": (lambda s3: "s3://no-such-bucket/p/pool.zarr", {},
                       "s3://no-such-bucket/p/pool.zarr: bucket 'no-such-bucket' does not exist"),
    "wrong credentials": (lambda s3: s3.url("pair/pool.zarr"), {"AWS_SECRET_ACCESS_KEY": "wrong"},
                          "access denied (403 Forbidden): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
    "not a pool": (lambda s3: s3.url("pair"), {}, "is not a pool: no zarr.json"),
    "missing pool": (lambda s3: s3.url("pair/nothing.zarr"), {}, "nothing.zarr does not exist"),
    "incomplete pool": (_unfinished, {}, "is an unfinished pool: its writing was interrupted"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["validate", "score", "select", "label", "train"])
def test_a_bad_location_is_one_line_exit_2_and_writes_nothing(pair, s3, tmp_path, monkeypatch, capsys,
                                                              case, command):
    _, _, _, model = pair
    where, env, message = BAD[case]
    url = where(s3)
    labels = tmp_path / "l.csv"
    labels.write_text("id,class\nx,a\n")
    argv = {"validate": ["pool", "validate", url],
            "score": ["score", "--pool", url, "--model", str(model), *SCORE],
            "select": ["select", "--pool", url, "--budget", "2", "--out", str(tmp_path / "b.csv")],
            "label": ["label", "--pool", url, "--import", str(labels)],
            "train": ["train", "--pool", url, "--out", str(tmp_path / "m.pt"), *TRAIN]}[command]
    before = s3.keys()
    capsys.readouterr()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    monkeypatch.undo()
    assert s3.keys() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.csv"]


def test_pool_create_into_an_unknown_bucket_or_over_a_pool_writes_nothing(s3, pair, capsys):
    before = s3.keys()
    assert main(["pool", "create", *CREATE, "--out", "s3://no-such-bucket/p/pool.zarr"]) == 2
    assert main(["pool", "create", *CREATE, "--out", s3.url("pair/pool.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("xal-engine pool: error: s3://no-such-bucket/p/pool.zarr: bucket 'no-such-bucket' "
                    "does not exist"),
                   (f"xal-engine pool: error: {s3.url('pair/pool.zarr')} already exists (pass --overwrite "
                    "to replace it)")]
    assert s3.keys() == before


def test_an_unreachable_endpoint_fails_fast_with_one_line(s3, tmp_path):
    """A port nobody listens on: bounded retries, then one line (the subprocess timeout guards a hang)."""
    dead = _dead_port()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{dead}"}
    done = subprocess.run([sys.executable, "-m", "xal_engine", "pool", "validate", s3.url("pair/pool.zarr")],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        (f"xal-engine pool: error: {s3.url('pair/pool.zarr')}: cannot reach the object store at "
         f"http://127.0.0.1:{dead} after 3 retries (check AWS_ENDPOINT_URL and the network)")]


def test_storage_options_endpoint_precedence_and_profiles_come_from_the_environment(pair, s3, tmp_path,
                                                                                    monkeypatch):
    _, _, remote, _ = pair
    dead = f"http://127.0.0.1:{_dead_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)  # the service-specific one wins, as in the SDKs
    assert Pool.open(remote).n == N
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    options = tmp_path / "storage.json"  # a file named by XAL_STORAGE_OPTIONS, or inline JSON
    options.write_text(json.dumps({"retry_config": {"max_retries": 1}}))
    for value in (str(options), '{"retry_config": {"max_retries": 1}}'):
        monkeypatch.setenv("XAL_STORAGE_OPTIONS", value)
        with pytest.raises(PoolError, match=f"cannot reach the object store at {dead} after 1 retries"):
            Pool.open(remote)
    monkeypatch.setenv("XAL_STORAGE_OPTIONS", "{not json")
    with pytest.raises(PoolError, match="XAL_STORAGE_OPTIONS: not valid JSON"):
        Pool.open(remote)
    monkeypatch.delenv("XAL_STORAGE_OPTIONS")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    credentials = tmp_path / "credentials"  # a named profile instead of keys in the environment
    credentials.write_text(f"[xal]\naws_access_key_id = {s3.key}\naws_secret_access_key = {s3.secret}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_PROFILE", "xal")
    assert Pool.open(remote).n == N


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unfinished_pool_is_resumed_and_overwrite_replaces_a_pool(s3):
    url = _unfinished(s3)
    with pytest.raises(PoolError, match="unfinished pool"):
        Pool.open(url)
    writer = PoolWriter(url, channels=1, height=8, width=8, dtype=np.uint8, classes=["a", "b"], chunk_size=4,
                        resume=True)
    assert writer.n_written == 4
    writer.append(np.ones((2, 1, 8, 8), np.uint8), np.ones((2, 8, 8), bool), np.ones(2, bool),
                  np.ones(2, np.int16), ["j0", "j1"], np.zeros(2, np.uint8))
    pool = writer.close()
    assert pool.n == 6 and pool.column("ids").tolist() == ["i0", "i1", "i2", "i3", "j0", "j1"]
    assert pool.validate() == []
    with PoolWriter(url, channels=1, height=4, width=4, dtype=np.uint8, classes=["c", "d"],
                    overwrite=True) as w:
        w.append(np.zeros((1, 1, 4, 4), np.uint8), np.zeros((1, 4, 4), bool), np.zeros(1, bool),
                 np.zeros(1, np.int16), ["k"], np.zeros(1, np.uint8))
    again = Pool.open(url)
    assert (again.n, again.classes, again.height) == (1, ["c", "d"], 4)
    assert again.validate() == []
