"""pytest-benchmark: score_batch vs pytorch-grad-cam's GradCAM + numpy metrics vs plain inference on one
batch, at the batch level's quick sizes on a CPU (resnet18) and its full sizes on CUDA (three models)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM

from xal_engine.bench import baseline
from xal_engine.bench.batch import ARCHS, Case, Inputs, engine, make_inputs, plain
from xal_engine.bench.timing import synchronize
from xal_engine.core.models import resolve_layer

CUDA = torch.cuda.is_available()
CASES = [Case(arch, 64, 224, 1) for arch in ARCHS] if CUDA else [Case("resnet18", 8, 64, 1)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def case_inputs(request: pytest.FixtureRequest, device: torch.device) -> tuple[Case, Inputs]:
    return request.param, make_inputs(request.param, device)


@pytest.mark.parametrize("provider", ["xal-engine", "grad-cam", "plain"])
def test_score_batch(benchmark, device: torch.device, case_inputs: tuple[Case, Inputs], provider: str) -> None:
    case, inputs = case_inputs
    if provider == "grad-cam":
        model = copy.deepcopy(inputs.model)  # its hooks stay on the model it wraps
        cam = GradCAM(model=model, target_layers=[resolve_layer(model, inputs.layer)])
        fn = lambda: baseline.pipeline(cam, inputs.images, inputs.rois_host)
    elif provider == "xal-engine":
        fn = lambda: engine(inputs, "fp32")
    else:
        fn = lambda: plain(inputs, "fp32")

    def call() -> object:
        out = fn()
        synchronize(device)
        return out

    benchmark.group = f"score_batch {case.sizes}"
    out = benchmark(call)
    if provider == "plain":
        assert out.shape == (case.batch,)
        return
    soft = out["soft_dice"] if isinstance(out, dict) else out[1][:, 2].numpy()  # (B, 6): soft Dice column
    model = copy.deepcopy(inputs.model)
    ref = baseline.pipeline(GradCAM(model=model, target_layers=[resolve_layer(model, inputs.layer)]),
                            inputs.images, inputs.rois_host)
    np.testing.assert_allclose(soft, ref["soft_dice"], atol=1e-4)
