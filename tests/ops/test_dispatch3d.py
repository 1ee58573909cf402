"""gradcam_dice dispatch for volumes: 5-D activations with 4-D ROIs, and their input checks."""

from __future__ import annotations

import pytest
import torch

from xal_engine import ops
from xal_engine.errors import XalError
from xal_engine.ops import reference, reference3d


def volumes(b: int = 2, c: int = 3, dhw=(2, 3, 4), size=(5, 7, 6)):
    gen = torch.Generator().manual_seed(b + c + sum(dhw))
    a, g = torch.randn(b, c, *dhw, generator=gen), torch.randn(b, c, *dhw, generator=gen)
    return a, g, torch.rand(b, *size, generator=gen) > 0.5


def test_volumes_take_the_3d_reference_on_cpu() -> None:
    a, g, rois = volumes()
    ref = reference3d.gradcam_dice_3d(a, g, rois, 0.4, return_cam=True, method="layercam")
    for backend in ("auto", "torch"):
        got = ops.gradcam_dice(a, g, rois, 0.4, return_cam=True, backend=backend, method="layercam")
        for x, y in zip(got, ref):
            assert torch.equal(x, y)
    assert ops.pick_backend("auto", a) == "torch"


def test_images_are_unchanged() -> None:
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    rois = torch.rand(2, 9, 7, generator=gen) > 0.5
    ref = reference.gradcam_dice(a, g, rois, return_cam=True)
    for x, y in zip(ops.gradcam_dice(a, g, rois, return_cam=True), ref):
        assert torch.equal(x, y)


def test_triton_backend_for_volumes_under_the_interpreter() -> None:
    k3 = pytest.importorskip("xal_engine.kernels.gradcam_dice_3d")
    if not k3._interpreted():
        pytest.skip("kernel not built for TRITON_INTERPRET=1")
    a, g, rois = volumes()
    ref = reference3d.gradcam_dice_3d(a, g, rois, return_cam=True)
    got = ops.gradcam_dice(a, g, rois, return_cam=True, backend="triton")
    for name in ("dice", "soft_dice", "energy", "cam"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=1e-5)


def test_numpy_rois_and_low_precision() -> None:
    a, g, rois = volumes()
    ref = reference3d.gradcam_dice_3d(a.half().float(), g.bfloat16().float(), rois)
    got = ops.gradcam_dice(a.half(), g.bfloat16(), rois.numpy())
    for x, y in zip(got[:4], ref[:4]):
        assert torch.equal(x, y)


EMPTY_AXIS = r"activations: expected shape \(B, C, h, w\) with C, h, w >= 1 or \(B, C, d, h, w\) with C, d, h, w >= 1"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, g, r: (a, g, r[:, 0]), r"rois: expected shape \(B=2, D, H, W\) with D, H, W >= 1 for 5-D"),
        (lambda a, g, r: (a, g, r[:1]), r"rois: expected shape \(B=2, D, H, W\)"),
        (lambda a, g, r: (a, g[:, :, 0], r), r"gradients: shape .* differs from activations"),
        (lambda a, g, r: (a[:, :, :0], g[:, :, :0], r), EMPTY_AXIS),
        (lambda a, g, r: (a[..., None], g[..., None], r), r"activations: expected shape"),
        (lambda a, g, r: (a, g, r.tolist()), r"rois: expected a tensor or numpy array \(B, D, H, W\)"),
    ],
)
def test_bad_volume_inputs_raise_one_clear_line(change, message: str) -> None:
    with pytest.raises(XalError, match=message) as info:
        ops.gradcam_dice(*change(*volumes()))
    assert "\n" not in str(info.value)


def test_2d_reference_still_wants_images() -> None:
    a, g, rois = volumes()
    with pytest.raises(XalError, match=r"activations: expected shape \(B, C, h, w\) with C, h, w >= 1, got"):
        reference.gradcam_dice(a, g, rois)
