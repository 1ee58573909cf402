"""CPU threads: the default never oversubscribes the cores, --threads reaches torch, scores do not depend on it."""

import subprocess
import sys
import textwrap

import pytest
import torch

from xal_engine.errors import XalError
from xal_engine.jobs import runtime
from xal_engine.jobs.runtime import default_threads, resolve_threads, torch_threads


@pytest.mark.parametrize(("cores", "workers", "expected"), [
    (1, 0, 1), (1, 2, 1), (1, 8, 1),
    (2, 0, 2), (2, 2, 1), (2, 8, 1),
    (16, 0, 16), (16, 2, 14), (16, 8, 8),
])
def test_default_threads_plus_workers_fit_the_cores(cores: int, workers: int, expected: int) -> None:
    threads = default_threads(cores, workers)
    assert threads == expected
    assert threads >= 1 and (threads + workers <= cores or threads == 1)


def test_resolve_threads_explicit_env_and_mocked_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert runtime.available_cores() == 6
    assert resolve_threads(None, 2) == 4  # 6 cores of the affinity mask, 2 loader workers
    assert resolve_threads(None, 2, cores=16) == 14
    assert resolve_threads(3, 8) == 3  # explicit wins
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads(None, 0, cores=16) == 1  # the user's environment wins over the rule
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: (_ for _ in ()).throw(OSError()),
                        raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: None)
    assert runtime.available_cores() == 1
    with pytest.raises(XalError, match=r"--threads must be at least 1, got 0"):
        resolve_threads(0, 0)


def test_torch_threads_sets_and_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_threads_flag_reaches_torch_in_a_fresh_process(tmp_path) -> None:
    """`xal-engine train --threads 1` in a fresh process: intra-op and inter-op pools both 1 while
    training (recorded by a patched train), and the flag validated."""
    probe = textwrap.dedent(f"""
        import sys, torch
        import xal_engine.jobs.train as jt
        seen = []
        def fake(pool, config, **kw):
            seen.append((torch.get_num_threads(), torch.get_num_interop_threads(), config.threads))
            raise SystemExit(0)
        jt._train = fake  # train() applies the threads, then calls this
        from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool
        create_synthetic_pool(SyntheticConfig(n=24, size=32, classes=2, channels=1, seed=0),
                              {str(tmp_path / 'p.zarr')!r}, show_progress=False)
        from xal_engine.cli import main
        try:
            main(["train", "--pool", {str(tmp_path / 'p.zarr')!r}, "--out", {str(tmp_path / 'm.pt')!r},
                  "--threads", "1", "--num-workers", "0"])
        except SystemExit:
            pass
        print(seen)
    """)
    out = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[(1, 1, 1)]"
    bad = subprocess.run([sys.executable, "-m", "xal_engine", "train", "--pool", str(tmp_path / "p.zarr"),
                          "--out", str(tmp_path / "m.pt"), "--threads", "0"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("--threads must be at least 1, got 0")
    assert len(bad.stderr.strip().splitlines()) == 1
