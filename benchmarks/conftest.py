"""pytest-benchmark suites (``pytest benchmarks --benchmark-only``); not part of the default test run.

pyproject's addopts disable benchmarks for the default run (``--benchmark-disable``); collecting this
folder turns them back on, as ``--benchmark-enable`` would. Without a GPU the ``ops`` provider takes
the torch reference (the Triton kernel would run in Triton's interpreter).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One thread, as in the scripts: numpy/cv2 are single-threaded, and spinning intra-op threads on a
    # shared CPU make timings erratic.
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.option.benchmark_enable = True


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
