"""gradcam_dice dispatch and input validation."""

from __future__ import annotations

import pytest
import torch

from xal_engine import ops
from xal_engine.errors import XalError
from xal_engine.ops import reference


def inputs(b: int = 2, c: int = 3, h: int = 4, w: int = 5, size: tuple[int, int] = (9, 7)):
    gen = torch.Generator().manual_seed(b + c + h + w)
    a, g = torch.randn(b, c, h, w, generator=gen), torch.randn(b, c, h, w, generator=gen)
    return a, g, torch.rand(b, *size, generator=gen) > 0.5


def assert_same(got: reference.RoiAgreement, ref: reference.RoiAgreement, atol: float = 0.0) -> None:
    for x, y in zip(got, ref):
        if y is None:
            assert x is None
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=atol, equal_nan=True)


def test_torch_backend_is_the_reference() -> None:
    a, g, rois = inputs()
    ref = reference.gradcam_dice(a, g, rois, 0.4, return_cam=True)
    assert_same(ops.gradcam_dice(a, g, rois, 0.4, return_cam=True, backend="torch"), ref)
    assert_same(ops.gradcam_dice(a, g, rois, 0.4, return_cam=True), ref)  # auto on CPU -> torch


def test_auto_picks_torch_on_cpu() -> None:
    assert ops.pick_backend("auto", torch.zeros(1, 1, 2, 2)) == "torch"
    assert ops.pick_backend("triton", torch.zeros(1, 1, 2, 2)) == "triton"


def test_triton_backend_on_cpu_under_the_interpreter() -> None:
    kg = pytest.importorskip("xal_engine.kernels.gradcam_dice")
    if not kg._interpreted():
        pytest.skip("kernel not built for TRITON_INTERPRET=1")
    a, g, rois = inputs(b=2, c=3, h=3, w=4, size=(6, 5))
    ref = reference.gradcam_dice(a, g, rois, return_cam=True)
    got = ops.gradcam_dice(a, g, rois, return_cam=True, backend="triton")
    assert_same(got._replace(hit=got.hit.float()), ref._replace(hit=ref.hit.float()), atol=1e-5)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    kg = pytest.importorskip("xal_engine.kernels.gradcam_dice")
    monkeypatch.setattr(kg, "_interpreted", lambda: False)
    with pytest.raises(XalError, match="needs CUDA tensors .*TRITON_INTERPRET=1"):
        ops.gradcam_dice(*inputs(), backend="triton")


def test_rois_convertible_from_numpy_and_integers() -> None:
    a, g, rois = inputs()
    ref = reference.gradcam_dice(a, g, rois)
    assert_same(ops.gradcam_dice(a, g, rois.numpy()), ref)
    assert_same(ops.gradcam_dice(a, g, rois.to(torch.uint8) * 255), ref)


def test_low_precision_inputs_are_computed_in_fp32() -> None:
    a, g, rois = inputs()
    half = ops.gradcam_dice(a.half(), g.bfloat16(), rois, return_cam=True)
    ref = reference.gradcam_dice(a.half().float(), g.bfloat16().float(), rois, return_cam=True)
    assert half.dice.dtype == torch.float32 and half.cam.dtype == torch.float32
    assert_same(half, ref)


def test_empty_batch() -> None:
    a, g, _ = inputs(b=0)
    out = ops.gradcam_dice(a, g, torch.zeros(0, 9, 7, dtype=torch.bool), return_cam=True)
    assert out.dice.shape == (0,) and out.hit.dtype == torch.bool and out.cam.shape == (0, 4, 5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, g, r: (a[0], g, r), r"activations: expected shape \(B, C, h, w\)"),
        (lambda a, g, r: (a, g[:, :2], r), "gradients: shape .* differs from activations"),
        (lambda a, g, r: (a.double(), g, r), "activations: expected float32, float16 or bfloat16"),
        (lambda a, g, r: (a, g, r[:1]), r"rois: expected shape \(B=2, H, W\)"),
        (lambda a, g, r: (a, g, r[:, 0]), r"rois: expected shape"),
        (lambda a, g, r: (a, g, r.tolist()), "rois: expected a tensor or numpy array"),
        (lambda a, g, r: (a, g.numpy(), r), "gradients: expected a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_one_clear_error(change, message: str) -> None:
    with pytest.raises(XalError, match=message):
        ops.gradcam_dice(*change(*inputs()))


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), "0.5"])
def test_bad_threshold(threshold) -> None:
    with pytest.raises(XalError, match="threshold: expected a number in"):
        ops.gradcam_dice(*inputs(), threshold=threshold)


def test_bad_backend() -> None:
    with pytest.raises(XalError, match="backend: expected one of auto, triton, torch, got 'cuda'"):
        ops.gradcam_dice(*inputs(), backend="cuda")  # type: ignore[arg-type]


def test_errors_are_one_line() -> None:
    a, g, rois = inputs()
    with pytest.raises(XalError) as info:
        ops.gradcam_dice(a, g[:, :2], rois)
    assert "\n" not in str(info.value)

