"""pytest-benchmark: gradcam_dice (dispatching function, torch reference) vs pytorch-grad-cam's
post-processing, at the kernel level's quick sizes on a CPU and its full sizes on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xal_engine import ops
from xal_engine.bench import baseline
from xal_engine.bench.kernel import FULL_CASES, QUICK_CASES, Case
from xal_engine.bench.timing import synchronize
from xal_engine.ops import reference

CASES = FULL_CASES if torch.cuda.is_available() else QUICK_CASES


def inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.batch, case.channels, case.feature, case.feature)
    a, g = torch.randn(shape, generator=gen, device=device), torch.randn(shape, generator=gen, device=device)
    return a, g, torch.rand(case.batch, case.image, case.image, generator=gen, device=device) > 0.7


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("provider", ["ops", "torch", "grad-cam"])
def test_gradcam_dice(benchmark, device: torch.device, case: Case, provider: str) -> None:
    a, g, rois = inputs(case, device)
    fns = {"ops": lambda: ops.gradcam_dice(a, g, rois), "torch": lambda: reference.gradcam_dice(a, g, rois),
           "grad-cam": lambda: baseline.postprocess(a, g, rois)}

    def call() -> object:
        out = fns[provider]()
        synchronize(device)
        return out

    benchmark.group = f"gradcam_dice {case.sizes}"
    out = benchmark(call)
    soft = out["soft_dice"] if isinstance(out, dict) else out.soft_dice.cpu().numpy()
    expected = baseline.postprocess(a, g, rois)["soft_dice"]
    np.testing.assert_allclose(soft, expected, atol=1e-4)
