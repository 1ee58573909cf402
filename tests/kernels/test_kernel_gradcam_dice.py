"""The fused Triton kernel against the torch reference (Triton's interpreter when there is no GPU).

Tolerances: both sides load A and G into fp32 and run the same fp32 operations in the same order;
they differ only in summation order (channel blocks, tree reductions over tiles), a few ulp of the
weights and sums. So fp32 maps and values agree within 1e-5 (the parity target of
gradcam-reference.md), and so do fp16/bf16 inputs compared with the reference run on the SAME
low-precision inputs: the rounding to fp16/bf16 happened before either side saw the data.
Outputs are pre-filled with a sentinel (-7, and the negated expected hit) so an unwritten result fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from xal_engine.errors import XalError
from xal_engine.ops import reference
from xal_engine.ops.dispatch import triton_backend as launch  # the method in torch, then the one launch
from xal_engine.ops.reference import RoiAgreement

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
kg = pytest.importorskip("xal_engine.kernels.gradcam_dice")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not kg._interpreted():
    pytest.skip("no GPU and the kernel was not built for TRITON_INTERPRET=1", allow_module_level=True)

SENTINEL = -7.0  # outside [0, 1] and not NaN


def poisoned(expected: RoiAgreement, h: int, w: int) -> RoiAgreement:
    b = expected.dice.shape[0]
    full = [torch.full(shape, SENTINEL, device=DEVICE) for shape in ((b,), (b,), (b,), (b, h, w))]
    return RoiAgreement(full[0], full[1], full[2], ~expected.hit.to(DEVICE), full[3])


def ambiguous_hits(a: torch.Tensor, g: torch.Tensor, rois: torch.Tensor, tol: float = 1e-5,
                   method: str = "gradcam") -> torch.Tensor:
    """(B,) True where pixels within ``tol`` of max S lie both inside and outside the ROI.

    Upsampled maps often have near-ties at the top, and torch's CPU bilinear differs from the
    op-by-op formula by ~2e-7, so the first maximum (and so ``hit``) is float noise there.
    """
    s = reference.gradcam_maps(a.cpu(), g.cpu(), (rois.shape[1], rois.shape[2]), method).flatten(1)
    near = s >= s.amax(1, keepdim=True) - tol
    r = rois.cpu().flatten(1)
    return (near & r).any(1) & (near & ~r).any(1) & (s.amax(1) > 0)  # an all-zero map has no hit


def run_both(a: torch.Tensor, g: torch.Tensor, rois: torch.Tensor, threshold: float = 0.5,
             method: str = "gradcam"):
    """(kernel, reference) results; the reference runs on CPU in fp32 from the same inputs."""
    ref = reference.gradcam_dice(a.cpu(), g.cpu(), rois.cpu(), threshold, return_cam=True, method=method)
    out = poisoned(ref, a.shape[2], a.shape[3])
    got = launch(a.to(DEVICE), g.to(DEVICE), rois.to(DEVICE), threshold, True, method=method, out=out)
    got = RoiAgreement(*(t.cpu() for t in got))
    sure = ~ambiguous_hits(a, g, rois, method=method)
    assert torch.equal(got.hit[sure], ref.hit[sure])
    return got, ref


def assert_matches(got: RoiAgreement, ref: RoiAgreement, atol: float = 1e-5, hit: bool = True) -> None:
    for name in ("dice", "soft_dice", "energy", "cam"):
        if getattr(ref, name) is None:
            assert getattr(got, name) is None
            continue
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=atol,
                                   equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")
    if hit:  # run_both already compared the hits that are not near-ties
        assert torch.equal(got.hit, ref.hit)


def random_inputs(b: int, c: int, h: int, w: int, size: tuple[int, int], seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b, c, h, w, generator=gen).to(dtype)
    g = torch.randn(b, c, h, w, generator=gen).to(dtype)
    rois = torch.rand(b, *size, generator=gen) > 0.6
    return a, g, rois


SHAPES = [  # (B, C, h, w, (H, W)): what each exercises
    (3, 5, 7, 9, (33, 40)),  # odd sizes, upsampling, non-square
    (2, 3, 1, 1, (17, 23)),  # 1x1 feature map
    (2, 6, 16, 12, (8, 5)),  # h, w > ROI: downsampling
    (2, 70, 8, 8, (30, 21)),  # C = 70 is not a multiple of BLOCK_C = 64
    (1, 4, 3, 11, (129, 37)),  # several row tiles, last one partial
    (1, 3, 5, 5, (20, 300)),  # several column tiles (BLOCK_X = 128), last one partial
]


@pytest.mark.parametrize("b, c, h, w, size", SHAPES)
def test_matches_reference_fp32(b: int, c: int, h: int, w: int, size: tuple[int, int]) -> None:
    got, ref = run_both(*random_inputs(b, c, h, w, size, seed=b * 100 + c + h))
    assert_matches(got, ref, hit=False)


ON_GPU_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="~40 s per megapixel in the interpreter")


@pytest.mark.parametrize(
    "b, c, h, w, size",
    [
        (1, 4096, 2, 2, (8, 8)),  # C = 4096 in one channel block
        (1, 3, 64, 64, (70, 90)),  # 64x64 feature map: BLOCK_HW = 4096, one channel per block
        (1, 2, 150, 100, (20, 20)),  # 15000 feature pixels, close to MAX_FEATURE_PIXELS
        (1, 2, 3, 5, (1030, 3)),  # a tall ROI: 1030 rows
        pytest.param(2, 2048, 14, 14, (1024, 1024), marks=ON_GPU_ONLY),
        pytest.param(2, 64, 64, 64, (1100, 1030), marks=ON_GPU_ONLY),
    ],
)
def test_matches_reference_at_the_size_limits(b: int, c: int, h: int, w: int, size: tuple[int, int]) -> None:
    got, ref = run_both(*random_inputs(b, c, h, w, size, seed=c + h))
    assert_matches(got, ref, hit=False)


def test_feature_map_over_the_limit_is_a_clear_error() -> None:
    a, g, rois = random_inputs(1, 1, 129, 128, (4, 4), seed=0)
    with pytest.raises(XalError, match="activations: feature map 129x128 exceeds"):
        launch(a.to(DEVICE), g.to(DEVICE), rois.to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_low_precision(dtype: torch.dtype) -> None:
    got, ref = run_both(*random_inputs(3, 5, 7, 9, (33, 40), seed=7, dtype=dtype))
    assert_matches(got, ref, atol=1e-5, hit=False)  # same rounded inputs on both sides: see the module docstring


def test_channels_last_and_strided_rois_need_no_copy() -> None:
    a, g, rois = random_inputs(2, 6, 5, 7, (19, 26), seed=3)
    ref = reference.gradcam_dice(a, g, rois, return_cam=True)
    a_cl = a.to(memory_format=torch.channels_last)
    rois_t = rois.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major strides
    assert kg._pixel_view(a_cl) is a_cl
    got = launch(a_cl.to(DEVICE), g.to(DEVICE), rois_t.to(DEVICE), 0.5, True,
                                 out=poisoned(ref, 5, 7))
    assert_matches(RoiAgreement(*(t.cpu() for t in got)), ref)


def test_exact_tie_at_threshold() -> None:
    # The hand case of test_reference: S = [[0, 1 - 2**-23], [0.5, 0]] exactly; 0.5 counts as attended.
    a = torch.tensor([[[[0.0, 1024.0], [512.0 + 2.0**-14, 0.0]]]])
    rois = torch.tensor([[[False, False], [True, False]]])
    got, ref = run_both(a, torch.ones_like(a), rois)
    assert got.dice.item() == pytest.approx(2 / 3, abs=1e-7)
    assert_matches(got, ref, atol=0)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_threshold_extremes(threshold: float) -> None:
    got, ref = run_both(*random_inputs(2, 4, 6, 6, (13, 9), seed=11), threshold=threshold)
    assert_matches(got, ref, hit=False)


def test_all_zero_cam_empty_and_full_roi() -> None:
    a, g, rois = random_inputs(3, 4, 6, 5, (14, 12), seed=5)
    a, g = a.abs() + 0.1, g.clone()
    g[0] = -g[0].abs() - 0.1  # image 0: every weight negative -> all-zero CAM
    rois[1] = False  # image 1: empty ROI
    rois[2] = True  # image 2: full ROI
    got, ref = run_both(a, g, rois)
    assert_matches(got, ref)
    assert got.dice[0] == 0 and got.energy[0] == 0 and not got.hit[0]
    assert got.dice[1] == 0 and got.soft_dice[1] == 0 and not got.hit[1]
    assert got.energy[2] == 1.0 and got.hit[2]


def test_all_zero_cam_at_threshold_zero() -> None:
    a, g, rois = random_inputs(1, 3, 4, 4, (8, 8), seed=6)
    got, ref = run_both(a.abs() + 0.1, -g.abs() - 0.1, rois, threshold=0.0)
    assert got.dice.item() == 0 and not got.hit.item()
    assert_matches(got, ref)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_non_finite_image_does_not_disturb_the_others() -> None:
    a, g, rois = random_inputs(4, 5, 6, 7, (15, 11), seed=9)
    a[1, 3, 2, 2] = float("nan")
    g[2, 0, 5, 6] = float("inf")
    a[3, 1, 0, 0] = float("-inf")
    got, ref = run_both(a, g, rois)
    assert torch.isnan(got.dice[1:]).all() and torch.isnan(got.energy[1:]).all()
    assert not got.hit[1:].any()
    assert_matches(got, ref)
    clean, _ = run_both(a[:1], g[:1], rois[:1])
    assert_matches(RoiAgreement(*(t[:1] for t in got)), clean, atol=0)


def test_launcher_allocates_when_no_buffers_are_given() -> None:
    a, g, rois = random_inputs(2, 3, 4, 5, (9, 10), seed=4)
    ref = reference.gradcam_dice(a, g, rois)
    got = launch(a.to(DEVICE), g.to(DEVICE), rois.to(DEVICE))
    assert got.cam is None and got.hit.dtype == torch.bool
    assert_matches(RoiAgreement(*(t.cpu() for t in got[:4]), None), ref._replace(cam=None))


def test_launch_config_bounds() -> None:
    cfg = kg._launch_config(channels=2048, pixels=14 * 14, height=512, width=512)
    assert cfg["BLOCK_C"] * cfg["BLOCK_HW"] <= 4096 and cfg["BLOCK_Y"] * cfg["BLOCK_X"] <= 1024
    assert kg._launch_config(channels=3, pixels=1, height=1, width=1)["BLOCK_C"] == 4


def test_empty_batch() -> None:
    a, g, rois = random_inputs(0, 3, 4, 5, (6, 7), seed=0)
    got = launch(a.to(DEVICE), g.to(DEVICE), rois.to(DEVICE), return_cam=True)
    assert got.dice.shape == (0,) and got.hit.shape == (0,) and got.cam.shape == (0, 4, 5)


@settings(max_examples=10, deadline=None)  # the interpreter takes ~0.2 s per example
@given(
    c=st.integers(1, 9), h=st.integers(1, 8), w=st.integers(1, 8),
    big_h=st.integers(1, 40), big_w=st.integers(1, 140), seed=st.integers(0, 2**16),
)
def test_matches_reference_on_any_shape(c: int, h: int, w: int, big_h: int, big_w: int, seed: int) -> None:
    a, g, rois = random_inputs(2, c, h, w, (big_h, big_w), seed=seed)
    # S = (U - min U) / (range U + 1e-7) turns ~2e-7 of bilinear float noise (torch's CPU kernel vs
    # the op-by-op formula) into O(1) when U is nearly constant, e.g. a map resized to one column:
    # there no two implementations agree. Keep maps that are all-zero or spread over >= 0.05.
    n = reference.low_res_cam(a, g)
    u = F.interpolate(n[:, None], size=(big_h, big_w), mode="bilinear", align_corners=False).flatten(1)
    assume(bool(((n.flatten(1).amax(1) == 0) | (u.amax(1) - u.amin(1) >= 0.05)).all()))
    # Hard Dice thresholds S at 0.5: a pixel within float noise of it falls on either side depending on
    # the summation order (seed 67, 1x26 ROI: one pixel, Dice 0.333 vs 0.345), so keep maps whose
    # pixels all lie more than 1e-5 (the parity tolerance) away from the threshold.
    s = reference.gradcam_maps(a, g, (big_h, big_w))
    assume(bool(((s - 0.5).abs() > 1e-5).all()))
    got, ref = run_both(a, g, rois)
    assert_matches(got, ref, hit=False)  # run_both compared the hits away from near-ties


def test_first_maximum_wins_across_tiles() -> None:
    # Identity size 1x200 (two column tiles of 128): exact maxima at x = 5 and x = 133, the same lane
    # of both tiles. The first one is in the ROI, the second is not: hit must be True.
    m = torch.zeros(1, 1, 1, 200)
    m[..., 5] = m[..., 133] = 1024.0
    rois = torch.zeros(1, 1, 200, dtype=torch.bool)
    rois[..., 5] = True
    got, ref = run_both(m, torch.ones_like(m), rois)
    assert got.hit.item() and ref.hit.item()
    assert_matches(got, ref, atol=0)


COMPILE_CHECK = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from xal_engine.kernels.gradcam_dice import _gradcam_dice_kernel as fn, _launch_config

ptrs = {"a_ptr": "*bf16", "roi_ptr": "*u8", "hit_ptr": "*u8", "part_ptr": "*i32", "count_ptr": "*i32",
        "layer_ptr": "*i32"}
floats = ("scale_y", "scale_x", "threshold")
found = set()
for shape in ((14 * 14, 512, 512), (7 * 7, 224, 224)):  # 8 x 128 and 32 x 32 tiles
    cfg = _launch_config(2048, *shape)
    warps = cfg.pop("num_warps")
    # channel weights (Grad-CAM, ...), a given map (HiResCAM, ...), two layers' maps
    for map_given, layers in ((False, 1), (True, 1), (True, 2)):
        for split, scan in ((False, False), (True, False), (False, True)):  # one program, bands, full scan
            consts = {**cfg, "MAP_GIVEN": map_given, "SPLIT": split, "SCAN_EXTREMES": scan, "BLOCK_P": 4,
                      "LAYERS": layers}
            sig = {n: "constexpr" if n in consts else ptrs.get(n, "*fp32" if n.endswith("_ptr") else
                                                               "fp32" if n in floats else "i32")
                   for n in fn.arg_names}
            src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
            found |= set(re.findall(r"div\\.[a-z]+\\.f32", ptx))
            if split:
                assert re.search(r"atom\\.[a-z.]*acq_rel[a-z.]*\\.gpu|atom\\.[a-z.]*gpu[a-z.]*acq_rel", ptx), "no acq_rel atomic"
print(sorted(found))
"""


def test_compiles_for_cuda_without_a_gpu() -> None:
    # The interpreter accepts programs the compiler rejects: compile for sm_90 ahead of time (Triton
    # bundles ptxas), in a fresh process without TRITON_INTERPRET. Divisions must be IEEE (div.rn).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_CHECK], check=False, env=env, capture_output=True,
                          text=True, timeout=300)
    if "No module named 'triton.backends.nvidia'" in done.stderr:
        pytest.skip("this Triton build has no CUDA backend")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['div.rn.f32']"


def test_preallocated_outputs_are_checked() -> None:
    a, g, rois = random_inputs(2, 3, 4, 5, (6, 7), seed=0)
    ref = reference.gradcam_dice(a, g, rois, return_cam=True)
    out = poisoned(ref, 4, 5)._replace(cam=torch.empty(2, 5, 4, device=DEVICE))
    with pytest.raises(XalError, match=r"out.cam: expected a contiguous torch.float32 tensor of shape \(2, 4, 5\)"):
        launch(a.to(DEVICE), g.to(DEVICE), rois.to(DEVICE), out=out)


# -- CAM methods: the method's part runs in torch (ops.cam_methods), the kernel gets w or M ----------

METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam"]
METHOD_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[3], (2, 9, 6, 5, (11, 13))]


def method_inputs(b, c, h, w, size, seed, dtype=torch.float32):
    """Post-ReLU activations (a stage output) and signed gradients: gradcam++'s and xgradcam's ΣA
    denominators stay away from 0 (see tests/ops/test_cam_methods.py)."""
    a, g, rois = random_inputs(b, c, h, w, size, seed)
    return a.clamp_min(0).to(dtype), g.to(dtype), rois


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("b, c, h, w, size", METHOD_SHAPES)
def test_every_method_matches_reference(method: str, b: int, c: int, h: int, w: int, size: tuple[int, int]) -> None:
    got, ref = run_both(*method_inputs(b, c, h, w, size, seed=b + c + h), method=method)
    assert_matches(got, ref, hit=False)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_method_matches_reference_low_precision(method: str, dtype: torch.dtype) -> None:
    got, ref = run_both(*method_inputs(3, 5, 7, 9, (33, 40), seed=8, dtype=dtype), method=method)
    assert_matches(got, ref, atol=1e-5, hit=False)  # same rounded inputs on both sides


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_every_method_non_finite_image(method: str) -> None:
    a, g, rois = method_inputs(3, 4, 5, 6, (12, 10), seed=12)
    a[1, 2, 3, 4] = float("nan")
    g[2, 0, 1, 1] = float("-inf")
    if method == "eigencam":  # reads no gradient
        a[2, 0, 1, 1] = float("inf")
    got, ref = run_both(a, g, rois, method=method)
    assert torch.isnan(got.dice[1:]).all() and not got.hit[1:].any()
    assert_matches(got, ref)


def test_default_method_kernel_inputs_are_the_gradcam_weights() -> None:
    a, g, rois = random_inputs(2, 5, 4, 3, (9, 8), seed=2)
    by_name = launch(a.to(DEVICE), g.to(DEVICE), rois.to(DEVICE), 0.5, True, method="gradcam")
    direct = kg.gradcam_dice_triton(a.to(DEVICE), rois.to(DEVICE), 0.5, True,
                                    weights=g.mean(dim=(2, 3)).to(DEVICE))
    for x, y in zip(by_name, direct):
        assert torch.equal(x, y)


def test_launcher_wants_weights_or_a_map() -> None:
    a, _, rois = random_inputs(1, 2, 3, 3, (4, 4), seed=0)
    a, rois = a.to(DEVICE), rois.to(DEVICE)
    with pytest.raises(XalError, match="either activations and weights, or low_res alone"):
        kg.gradcam_dice_triton(a, rois)
    with pytest.raises(XalError, match=r"weights: expected float32 \(1, 2\)"):
        kg.gradcam_dice_triton(a, rois, weights=torch.ones(1, 3, device=DEVICE))
    with pytest.raises(XalError, match="low_res: expected a contiguous float32 map"):
        kg.gradcam_dice_triton(None, rois, low_res=torch.ones(1, 3, 3, dtype=torch.float16, device=DEVICE))


# -- Work layout: the extremes' candidate grid, row bands, tiles (results do not depend on them) ---


@triton.jit
def _candidates_kernel(out_ptr, ok_ptr, scale, size_in, size_out, n, BLOCK: tl.constexpr):
    j = tl.arange(0, BLOCK)
    dst, ok = kg._extreme_dst(j, scale, size_in, size_out, False)
    tl.store(out_ptr + j, dst, mask=j < n)
    tl.store(ok_ptr + j, ok.to(tl.int32), mask=j < n)


def group_ends(size_in: int, size_out: int) -> set[int]:
    """By brute force with the kernel's fp32 formula: the first and last output of every group of
    outputs sharing their lower source neighbour, and the two around the clamp at source 0 (all
    outputs when size_out <= 2 size_in + 2)."""
    if size_out <= 2 * size_in + 2:
        return set(range(size_out))
    scale = np.float32(size_in) / np.float32(size_out)
    raw = scale * (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    lo = np.minimum(np.maximum(raw, np.float32(0)).astype(np.int32), size_in - 1)
    change = np.flatnonzero(np.diff(lo)) + 1  # first output of each group after the first
    bend = int(np.flatnonzero(raw > 0)[0])  # first output not clamped to source 0
    ends = {0, size_out - 1, *change.tolist(), *(change - 1).tolist(), bend, bend - 1}
    return {e for e in ends if 0 <= e < size_out}


@pytest.mark.parametrize("size_in, size_out", [(7, 224), (14, 512), (32, 1024), (56, 224), (3, 1030),
                                               (5, 11), (1, 17), (9, 19), (13, 1000), (128, 129), (16, 8),
                                               (100, 20), (7, 15)])
def test_extreme_candidates_are_exactly_the_group_ends(size_in: int, size_out: int) -> None:
    n = min(size_out, 2 * size_in + 2)
    dst = torch.full((n,), -1, dtype=torch.int32, device=DEVICE)
    ok = torch.zeros(n, dtype=torch.int32, device=DEVICE)
    scale = float(np.float32(size_in) / np.float32(size_out))
    _candidates_kernel[(1,)](dst, ok, scale, size_in, size_out, n, BLOCK=triton.next_power_of_2(n))
    got = set(dst.cpu()[ok.cpu() == 1].tolist())
    assert got == group_ends(size_in, size_out)


def test_bilinear_extremes_lie_on_the_group_ends() -> None:
    # The claim the extremes pass rests on, checked on torch's own upsampling of random maps.
    gen = torch.Generator().manual_seed(21)
    for (h, w), (big_h, big_w) in [((7, 7), (224, 224)), ((5, 9), (61, 200)), ((14, 14), (512, 512))]:
        n = torch.rand(4, 1, h, w, generator=gen)
        u = F.interpolate(n, size=(big_h, big_w), mode="bilinear", align_corners=False)[:, 0]
        rows, cols = sorted(group_ends(h, big_h)), sorted(group_ends(w, big_w))
        grid = u[:, rows][:, :, cols]
        torch.testing.assert_close(grid.amax((1, 2)), u.amax((1, 2)), rtol=0, atol=1e-6)
        torch.testing.assert_close(grid.amin((1, 2)), u.amin((1, 2)), rtol=0, atol=1e-6)


def launch_layout(a, g, rois, **layout) -> RoiAgreement:
    weights = g.mean(dim=(2, 3))
    got = kg.gradcam_dice_triton(a.to(DEVICE), rois.to(DEVICE), 0.5, True, weights=weights.to(DEVICE), **layout)
    return RoiAgreement(*(t.cpu() for t in got))


@pytest.mark.parametrize("b, c, h, w, size", [(2, 5, 7, 7, (224, 96)), (3, 4, 5, 9, (61, 70)),
                                              (1, 3, 6, 4, (130, 33))])
@pytest.mark.parametrize("bands", [2, 3, 7])
def test_bands_and_full_scan_equal_one_program(b: int, c: int, h: int, w: int, size: tuple[int, int],
                                               bands: int) -> None:
    a, g, rois = random_inputs(b, c, h, w, size, seed=bands * 10 + h)
    one = launch_layout(a, g, rois, programs_per_image=1)
    split = launch_layout(a, g, rois, programs_per_image=bands)
    scan = launch_layout(a, g, rois, programs_per_image=bands, scan_extremes=True)
    assert torch.equal(split.cam, one.cam) and torch.equal(scan.cam, one.cam)
    for got in (split, scan):  # band totals are added in another order: a few ulp
        assert torch.equal(got.hit, one.hit)
        for name in ("dice", "soft_dice", "energy"):
            torch.testing.assert_close(getattr(got, name), getattr(one, name), rtol=0, atol=1e-6)


def test_band_counts_are_zero_again_after_a_launch() -> None:
    a, g, rois = random_inputs(3, 4, 5, 6, (40, 30), seed=13)
    first = launch_layout(a, g, rois, programs_per_image=4)
    counts = kg._band_counts(torch.device(DEVICE), 3)
    assert int(counts.abs().sum()) == 0
    again = launch_layout(a, g, rois, programs_per_image=4)
    for x, y in zip(first, again):
        assert torch.equal(x, y)


def test_first_maximum_wins_across_column_blocks_and_bands() -> None:
    # Identity size 64 x 96 in 32 x 32 tiles, column blocks outer: the maxima at (row 5, col 40) and
    # (row 10, col 3) are met in the opposite order to row-major; with two bands (rows 0-31, 32-63)
    # a third maximum at (40, 0) lies in the second. The first in row-major order, (5, 40), is the
    # only one in the ROI: hit must be True.
    m = torch.zeros(1, 1, 64, 96)
    m[0, 0, 5, 40] = m[0, 0, 10, 3] = m[0, 0, 40, 0] = 1024.0
    rois = torch.zeros(1, 64, 96, dtype=torch.bool)
    rois[0, 5, 40] = True
    assert kg._tile(64, 96) == (32, 32)
    for bands in (1, 2):
        got = launch_layout(m, torch.ones_like(m), rois, programs_per_image=bands)
        assert got.hit.item()
    ref = reference.gradcam_dice(m, torch.ones_like(m), rois)
    assert ref.hit.item()


def test_tile_pads_least() -> None:
    assert kg._tile(224, 224) == (32, 32)  # 7 x 7 tiles, no padding (8 x 128 would pad to 256 columns)
    assert kg._tile(512, 512) == (8, 128)
    assert kg._tile(1, 200) == (1, 128)
    by, bx = kg._tile(33, 40)
    assert by * bx <= 1024


def test_band_plan() -> None:
    plan = kg._plan_bands
    assert plan(256, 224, 32, 224, sm_count=132) == (2, 128)  # 256 < 2 x 132 programs: two bands of 4 tiles
    assert plan(1024, 224, 32, 224, sm_count=132) == (1, 224)  # the batch fills the GPU
    assert plan(16, 224, 32, 224, sm_count=132) == (7, 32)  # at most one band per row tile
    assert plan(512, 512, 8, 512, sm_count=132) == (4, 128)  # 512^2: one band per 256^2 pixels
    assert plan(512, 224, 32, 224, sm_count=132, programs_per_image=3) == (3, 96)  # 7 tiles: 3 + 3 + 1
    assert plan(1, 1, 1, 1, sm_count=132) == (1, 1)
    bands, rows = plan(5, 1030, 8, 3, sm_count=132)
    assert bands == 65 or (bands <= kg.MAX_PROGRAMS_PER_IMAGE and (bands - 1) * rows < 1030 <= bands * rows)


def test_programs_per_image_must_be_positive() -> None:
    a, g, rois = random_inputs(1, 2, 3, 3, (4, 4), seed=0)
    with pytest.raises(XalError, match="programs_per_image: expected >= 1, got 0"):
        launch_layout(a, g, rois, programs_per_image=0)


def test_old_layout_knobs_keep_the_results() -> None:
    # gpu_validate times the kernel with one program per image, a full min/max scan and 8 x 128
    # tiles (its layout before the speed work) next to the default: both must compute the same.
    a, g, rois = random_inputs(3, 6, 7, 7, (224, 224), seed=17)
    new = launch_layout(a, g, rois)
    old = launch_layout(a, g, rois, programs_per_image=1, scan_extremes=True, tile=(8, 128))
    assert torch.equal(old.cam, new.cam) and torch.equal(old.hit, new.hit)
    for name in ("dice", "soft_dice", "energy"):
        torch.testing.assert_close(getattr(old, name), getattr(new, name), rtol=0, atol=1e-6)
    with pytest.raises(XalError, match=r"tile: expected two powers of two with at most 1024 pixels, got \(8, 256\)"):
        launch_layout(a, g, rois, tile=(8, 256))
