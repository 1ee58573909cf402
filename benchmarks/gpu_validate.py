"""Validate xal-engine on one GPU in one command (< 8 min on an H100/H200); results in benchmarks/results/gpu/.

    python benchmarks/gpu_validate.py                                  # one H100/H200
    python benchmarks/gpu_validate.py --tiny --device cpu --out /tmp/gpu-validate   # tiny sizes on a CPU (CI)

Writes environment, tests (+ junit xml), parity, kernel_time, batch, pool and goals CSVs and a
summary.md; exit code 1 when a step failed. The steps are those of xal_engine.bench.validate.

Triton decides whether its kernels run interpreted when they are first defined: on a machine without
CUDA (or with --device cpu) this script sets TRITON_INTERPRET=1 before importing xal_engine, so the
kernel's parity and timing steps run the Triton kernel itself in Triton's CPU interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="auto")
    device = pre.parse_known_args(argv)[0].device
    import torch  # does not import triton

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from xal_engine.bench.validate import main as validate
    from xal_engine.errors import XalError

    try:
        return validate(argv)
    except XalError as err:  # a bad flag or a missing device: one line, as the CLI gives it
        print(f"gpu_validate.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
