"""pytest-benchmark suites (``pytest benchmarks/suites --benchmark-only``); not part of the default test run.

pyproject's addopts disable benchmarks for the default run (``--benchmark-disable``); collecting this
folder turns them back on, as ``--benchmark-enable`` would, unless ``--benchmark-disable`` is given on
the command line itself (each benchmark then runs once, as a smoke test). Without a GPU the ``ops``
provider takes the torch reference (the Triton kernel would run in Triton's interpreter).
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
    if "--benchmark-disable" not in config.invocation_params.args:  # addopts' copy is not in args
        config.option.benchmark_enable = True


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
