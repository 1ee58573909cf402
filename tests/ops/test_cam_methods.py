"""Each CAM method of the seam against pytorch-grad-cam 1.5.7's own method code, model-free.

The library's ``get_cam_weights`` / ``get_cam_image`` run on the same numpy A, G, then its own
``np.maximum(cam, 0)`` and ``scale_cam_image`` (min-max, cv2 bilinear resize): the map pytorch-grad-cam
returns for one layer. Tolerance: maps 1e-5 (gradcam-reference.md); both sides compute in fp32 and
differ in summation order and cv2's bilinear (~1e-7).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.svd_on_activations import (
    get_2d_projection,
    get_2d_projection_with_sign_correction,
)

from xal_engine.core import cam_methods as core_methods
from xal_engine.core.cam_methods import CAM_METHODS as CORE_METHODS
from xal_engine.core.cam_methods import check_cam_method
from xal_engine.errors import XalError
from xal_engine.ops import cam_methods as ops_methods
from xal_engine.ops import gradcam_dice, reference
from xal_engine.ops.cam_methods import CAM_METHODS, eigencam_map, get_cam_method

MAP_ATOL = 1e-5
LIBRARY = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "hirescam": HiResCAM,
           "layercam": LayerCAM, "eigencam": EigenCAM}
SHAPES = [(3, 5, 7, 9, (33, 40)), (2, 17, 4, 6, (23, 31)), (2, 3, 1, 1, (9, 7)), (1, 64, 7, 7, (65, 49))]


class _NoHooks:
    def release(self) -> None:
        return None


def library_cam(name: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's pre-ReLU per-layer map (B, h, w), from its own class code."""
    cls = LIBRARY[name]
    obj = object.__new__(cls)  # no model: only the method's arithmetic is called
    obj.activations_and_grads = _NoHooks()  # what its __del__ releases
    return cls.get_cam_image(obj, None, None, None, a, g, False)


def library_maps(name: str, a: np.ndarray, g: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    cam = np.maximum(library_cam(name, a, g), 0)
    return BaseCAM.aggregate_multi_layers(None, [scale_cam_image(cam, size[::-1])[:, None]])  # (B, H, W)


def inputs(b: int, c: int, h: int, w: int, seed: int, positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((b, c, h, w), dtype=np.float32)
    if positive:  # post-ReLU activations, as at a ResNet stage output
        a = np.maximum(a, 0)
    return a, rng.standard_normal((b, c, h, w), dtype=np.float32)


def test_registry_and_validator() -> None:
    assert list(CAM_METHODS) == ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam"]
    assert CORE_METHODS is CAM_METHODS  # the torch-free names (core) and the registry (ops) agree
    assert core_methods.CAM_METHOD_NAMES == tuple(CAM_METHODS)
    assert core_methods.DEFAULT_CAM_METHOD == ops_methods.DEFAULT_CAM_METHOD == "gradcam"
    assert all(check_cam_method(name) == name == ops_methods.check_cam_method(name) for name in CAM_METHODS)
    for bad in ("GradCAM", "scorecam", "", None):
        for check in (check_cam_method, ops_methods.check_cam_method):
            with pytest.raises(XalError, match=r"^cam method: expected one of gradcam, gradcam\+\+, xgradcam, "
                                               r"hirescam, layercam, eigencam, got "):
                check(bad)
    for name, method in CAM_METHODS.items():
        assert (method.weights is None) != (method.low_res is None), name
        assert method.reference_class == LIBRARY[name].__name__ == core_methods.REFERENCE_CLASSES[name]


GRADIENT_CASES = [(n, p) for n in CAM_METHODS if n != "eigencam" for p in (True, False)
                  # Signed A (a layer without a ReLU: LayerNorm tokens, ConvNeXt) makes ΣA, and so the
                  # denominators 2G² + ΣA·G³ + 1e-6 (gradcam++) and ΣA + 1e-7 (xgradcam), cancel towards 0:
                  # both fp32 implementations then differ by their rounding of ΣA (numpy's pairwise sum vs
                  # torch's) over that denominator, 4e-5 relative here. Compared at positive A only.
                  if p or n not in ("gradcam++", "xgradcam")]


@pytest.mark.parametrize("name, positive", GRADIENT_CASES)
@pytest.mark.parametrize("b, c, h, w, size", SHAPES)
def test_gradient_methods_equal_pytorch_grad_cam(name: str, positive: bool, b: int, c: int, h: int, w: int,
                                                 size: tuple[int, int]) -> None:
    a, g = inputs(b, c, h, w, seed=c * 31 + h, positive=positive)
    want_m = library_cam(name, a, g)
    got_m = get_cam_method(name).cam(torch.from_numpy(a), torch.from_numpy(g)).numpy()
    np.testing.assert_allclose(got_m, want_m, rtol=1e-5, atol=1e-5 * np.abs(want_m).max())
    got = reference.gradcam_maps(torch.from_numpy(a), torch.from_numpy(g), size, name).numpy()
    np.testing.assert_allclose(got, library_maps(name, a, g, size), rtol=0, atol=MAP_ATOL)


def test_methods_differ() -> None:
    """Guard against a registry that maps every name to Grad-CAM: the maps must differ."""
    a, g = inputs(2, 8, 5, 6, seed=1, positive=True)
    maps = {n: reference.gradcam_maps(torch.from_numpy(a), torch.from_numpy(g), (11, 13), n) for n in CAM_METHODS}
    names = list(maps)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert (maps[x] - maps[y]).abs().max() > 1e-2, (x, y)


@pytest.mark.parametrize("b, c, h, w, size", SHAPES[:2] + SHAPES[3:])
def test_eigencam_equals_pytorch_grad_cam_up_to_the_sign(b: int, c: int, h: int, w: int, size: tuple[int, int],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """M = ±(1.5.7's projection); with its own sign correction (shipped in 1.5.7) the maps are equal.

    Tolerance 1e-4 on maps (not 1e-5): the library's SVD runs in fp32, whose first singular vector
    carries an error of about eps32 · σ1 / (σ1 − σ2) (1e-7 × the inverse relative gap, ~10-100 for
    random activations), amplified again by the two min-max stages; ours runs in fp64.
    """
    a, g = inputs(b, c, h, w, seed=c + h * 7, positive=True)
    lib = get_2d_projection(a)  # (B, h, w), LAPACK's sign
    got = eigencam_map(torch.from_numpy(a), torch.from_numpy(g)).numpy()
    scale = np.abs(lib).max()
    for i in range(b):
        same = np.abs(got[i] - lib[i]).max() <= 1e-4 * scale
        flipped = np.abs(got[i] + lib[i]).max() <= 1e-4 * scale
        assert same or flipped
    np.testing.assert_allclose(got, get_2d_projection_with_sign_correction(a), rtol=0, atol=1e-4 * scale)
    assert (np.abs(got.max((1, 2))) >= np.abs(got.min((1, 2)))).all()  # the stated convention
    import pytorch_grad_cam.eigen_cam as eigen_module

    monkeypatch.setattr(eigen_module, "get_2d_projection", get_2d_projection_with_sign_correction)
    want = library_maps("eigencam", a, g, size)
    mine = reference.gradcam_maps(torch.from_numpy(a), torch.from_numpy(g), size, "eigencam").numpy()
    np.testing.assert_allclose(mine, want, rtol=0, atol=1e-4)


def test_eigencam_ignores_gradients() -> None:
    a, g = inputs(2, 6, 4, 5, seed=3)
    x = torch.from_numpy(a)
    torch.testing.assert_close(eigencam_map(x, torch.from_numpy(g)), eigencam_map(x, torch.zeros_like(x)), rtol=0, atol=0)


def test_hand_computed_gradcam_pp_and_xgradcam() -> None:
    """One channel, two pixels: A = [1, 3], G = [2, -1]; ΣA = 4."""
    a = torch.tensor([[[[1.0, 3.0]]]])
    g = torch.tensor([[[[2.0, -1.0]]]])
    # gradcam++: aij = G² / (2G² + 4 G³ + 1e-6) = [4 / 40, 1 / -2]; w = Σ max(G, 0) aij = 2 · 0.1
    torch.testing.assert_close(CAM_METHODS["gradcam++"].weights(a, g), torch.tensor([[0.2]]), rtol=1e-6, atol=0)
    # xgradcam: w = Σ G A / (ΣA + 1e-7) = (2 - 3) / 4
    torch.testing.assert_close(CAM_METHODS["xgradcam"].weights(a, g), torch.tensor([[-0.25]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(CAM_METHODS["hirescam"].cam(a, g), torch.tensor([[[2.0, -3.0]]]))
    torch.testing.assert_close(CAM_METHODS["layercam"].cam(a, g), torch.tensor([[[2.0, 0.0]]]))


@pytest.mark.parametrize("name", list(CAM_METHODS))
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_input_gives_nan_for_that_image_only(name: str) -> None:
    a, g = (torch.from_numpy(x) for x in inputs(3, 4, 5, 6, seed=2, positive=True))
    rois = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(0)) > 0.5
    a[1, 2, 3, 4] = float("nan")
    if CAM_METHODS[name].uses_gradients:
        g[2, 0, 1, 1] = float("-inf")  # layercam's max(G, 0) would hide it
    else:
        a[2, 0, 1, 1] = float("inf")
    got = gradcam_dice(a, g, rois, return_cam=True, method=name, backend="torch")
    assert torch.isnan(got.dice[1:]).all() and not got.hit[1:].any() and torch.isnan(got.cam[1:]).all()
    clean = gradcam_dice(a[:1], g[:1], rois[:1], return_cam=True, method=name, backend="torch")
    torch.testing.assert_close(got.cam[:1], clean.cam, rtol=0, atol=0)
    assert torch.equal(got.dice[:1], clean.dice)


def test_bad_method_is_one_line() -> None:
    a, g = (torch.from_numpy(x) for x in inputs(1, 2, 3, 3, seed=0))
    with pytest.raises(XalError, match=r"cam method: expected one of .*got 'gradcam\+'"):
        gradcam_dice(a, g, torch.ones(1, 4, 4, dtype=torch.bool), method="gradcam+")


@pytest.mark.parametrize("name", list(CAM_METHODS))
def test_empty_batch(name: str) -> None:
    a = torch.zeros(0, 3, 4, 5)
    got = gradcam_dice(a, a, torch.zeros(0, 6, 7, dtype=torch.bool), return_cam=True, method=name, backend="torch")
    assert got.dice.shape == (0,) and got.cam.shape == (0, 4, 5)


def test_multi_layer_maps_equal_pytorch_grad_cam_aggregation() -> None:
    """Two layers of different C, h, w: per-layer scaled maps, max(·, 0), mean, min-max again."""
    size = (29, 37)
    layers = [inputs(2, 6, 7, 9, seed=4, positive=True), inputs(2, 11, 4, 5, seed=5, positive=True)]
    for name in CAM_METHODS:
        per_layer = [scale_cam_image(np.maximum(library_cam(name, a, g), 0), size[::-1])[:, None] for a, g in layers]
        want = BaseCAM.aggregate_multi_layers(None, per_layer)
        got = reference.multi_layer_maps([torch.from_numpy(a) for a, _ in layers],
                                         [torch.from_numpy(g) for _, g in layers], size, name).numpy()
        atol = 1e-4 if name == "eigencam" else MAP_ATOL
        if name == "eigencam":  # compare with the library's sign-corrected projection (see above)
            per_layer = [scale_cam_image(np.maximum(get_2d_projection_with_sign_correction(a), 0), size[::-1])[:, None]
                         for a, _ in layers]
            want = BaseCAM.aggregate_multi_layers(None, per_layer)
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)
    one = reference.multi_layer_maps([torch.from_numpy(layers[0][0])], [torch.from_numpy(layers[0][1])], size)
    torch.testing.assert_close(one, reference.gradcam_maps(*(torch.from_numpy(x) for x in layers[0]), size),
                               rtol=0, atol=0)
