"""The fused 3-D Triton kernel against the 3-D torch reference (Triton's interpreter when there is no GPU).

Tolerances as for the 2-D kernel (tests/kernels/test_kernel_gradcam_dice.py): both sides load A into
fp32 and run the same fp32 operations in the same order (torch's CPU trilinear op order), differing
only in summation order, so maps and values agree within 1e-5; fp16/bf16 inputs are compared with the
reference run on the SAME rounded inputs. Outputs are pre-filled with a sentinel so an unwritten
result fails. Shapes stay tiny: the interpreter runs ~1 s per 10^4 output voxels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from xal_engine.errors import XalError
from xal_engine.ops import reference3d
from xal_engine.ops.dispatch import triton_backend_3d as launch
from xal_engine.ops.reference import RoiAgreement

triton = pytest.importorskip("triton")
k3 = pytest.importorskip("xal_engine.kernels.gradcam_dice_3d")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not k3._interpreted():
    pytest.skip("no GPU and the kernel was not built for TRITON_INTERPRET=1", allow_module_level=True)

SENTINEL = -7.0
METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam"]


def poisoned(expected: RoiAgreement, low_res: tuple[int, int, int]) -> RoiAgreement:
    b = expected.dice.shape[0]
    full = [torch.full(shape, SENTINEL, device=DEVICE) for shape in ((b,), (b,), (b,), (b, *low_res))]
    return RoiAgreement(full[0], full[1], full[2], ~expected.hit.to(DEVICE), full[3])


def ambiguous_hits(a, g, rois, method: str, tol: float = 1e-5) -> torch.Tensor:
    """(B,) True where voxels within ``tol`` of max S lie both inside and outside the ROI."""
    s = reference3d.gradcam_maps_3d(a.cpu(), g.cpu(), tuple(rois.shape[1:]), method).flatten(1)
    near = s >= s.amax(1, keepdim=True) - tol
    r = rois.cpu().flatten(1)
    return (near & r).any(1) & (near & ~r).any(1) & (s.amax(1) > 0)


def run_both(a, g, rois, threshold: float = 0.5, method: str = "gradcam"):
    ref = reference3d.gradcam_dice_3d(a.cpu(), g.cpu(), rois.cpu(), threshold, return_cam=True, method=method)
    out = poisoned(ref, tuple(a.shape[2:]))
    got = launch(a.to(DEVICE), g.to(DEVICE), rois.to(DEVICE), threshold, True, method=method, out=out)
    got = RoiAgreement(*(t.cpu() for t in got))
    sure = ~ambiguous_hits(a, g, rois, method)
    assert torch.equal(got.hit[sure], ref.hit[sure])
    return got, ref


def assert_matches(got: RoiAgreement, ref: RoiAgreement, atol: float = 1e-5, hit: bool = True) -> None:
    for name in ("dice", "soft_dice", "energy", "cam"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=atol, equal_nan=True,
                                   msg=lambda m, n=name: f"{n}: {m}")
    if hit:
        assert torch.equal(got.hit, ref.hit)


def random_inputs(b, c, dhw, size, seed, dtype=torch.float32, relu=False):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b, c, *dhw, generator=gen)
    a = a.clamp_min(0) if relu else a  # a stage output: gradcam++'s / xgradcam's ΣA stays away from 0
    g = torch.randn(b, c, *dhw, generator=gen)
    return a.to(dtype), g.to(dtype), torch.rand(b, *size, generator=gen) > 0.6


SHAPES = [  # (B, C, (d, h, w), (D, H, W)): what each exercises
    (3, 5, (3, 4, 5), (11, 13, 17)),  # odd sizes, upsampling on every axis, non-cubic
    (2, 3, (1, 1, 1), (5, 6, 7)),  # 1x1x1 feature volume: all-zero maps
    (2, 6, (6, 5, 4), (4, 3, 5)),  # feature volume larger than the ROI: downsampling
    (2, 70, (2, 3, 4), (9, 7, 10)),  # C = 70: several channel blocks, the last partial
    (1, 3, (2, 3, 3), (3, 4, 300)),  # three column tiles (BLOCK_X = 128), the last partial
    (1, 4, (3, 2, 2), (40, 30, 5)),  # 1200 (z, y) rows: ten row tiles, rows crossing depth slices
    (2, 4, (3, 3, 3), (24, 21, 30)),  # extremes from 8 x 8 x 8 candidate voxels of 15120
]


@pytest.mark.parametrize("b, c, dhw, size", SHAPES)
def test_matches_reference_fp32(b, c, dhw, size) -> None:
    a, g, rois = random_inputs(b, c, dhw, size, seed=b * 100 + c)
    got, ref = run_both(a, g, rois)
    assert_matches(got, ref, hit=False)  # run_both compared the hits away from near-ties


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_low_precision(dtype: torch.dtype) -> None:
    a, g, rois = random_inputs(3, 5, (3, 4, 5), (11, 13, 17), seed=7, dtype=dtype)
    got, ref = run_both(a, g, rois)
    assert_matches(got, ref, atol=1e-5, hit=False)  # same rounded inputs on both sides


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_reference(method: str) -> None:
    a, g, rois = random_inputs(2, 9, (3, 3, 4), (7, 9, 11), seed=11, relu=True)
    got, ref = run_both(a, g, rois, method=method)
    assert_matches(got, ref, hit=False)


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])  # the weights path and the map path
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_methods_low_precision(method: str, dtype: torch.dtype) -> None:
    a, g, rois = random_inputs(2, 5, (2, 3, 4), (5, 9, 8), seed=8, dtype=dtype, relu=True)
    got, ref = run_both(a, g, rois, method=method)
    assert_matches(got, ref, hit=False)


def test_exact_tie_at_threshold() -> None:
    # (1, 1, 2) features [0, 1024] at identity size: S = [0, 1 - 2**-23]; and a voxel exactly at 0.5:
    # M = [0, 1024, 512 + 2**-14] -> N = [0, 1, 0.5 + 2**-24] -> S[2] = 0.5 exactly (as in 2-D).
    a = torch.tensor([0.0, 1024.0, 512.0 + 2.0**-14]).view(1, 1, 1, 1, 3)
    rois = torch.tensor([False, False, True]).view(1, 1, 1, 3)
    got, ref = run_both(a, torch.ones_like(a), rois)
    assert got.dice.item() == pytest.approx(2 / 3, abs=1e-7)
    assert_matches(got, ref, atol=0)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_threshold_extremes(threshold: float) -> None:
    got, ref = run_both(*random_inputs(2, 4, (2, 3, 3), (5, 7, 6), seed=12), threshold=threshold)
    assert_matches(got, ref, hit=False)


def test_all_zero_cam_empty_and_full_roi() -> None:
    a, g, rois = random_inputs(3, 4, (2, 3, 3), (5, 7, 6), seed=5)
    a = a.abs() + 0.1
    g[0] = -g[0].abs() - 0.1  # volume 0: every weight negative -> all-zero CAM
    rois[1] = False  # volume 1: empty ROI
    rois[2] = True  # volume 2: full ROI
    got, ref = run_both(a, g, rois)
    assert_matches(got, ref)
    assert got.dice[0] == 0 and got.energy[0] == 0 and not got.hit[0]
    assert got.dice[1] == 0 and got.soft_dice[1] == 0 and not got.hit[1]
    assert got.energy[2] == 1.0 and got.hit[2]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_non_finite_volume_does_not_disturb_the_others() -> None:
    a, g, rois = random_inputs(4, 5, (2, 3, 4), (6, 5, 7), seed=9)
    a[1, 3, 1, 2, 2] = float("nan")
    g[2, 0, 0, 1, 3] = float("inf")
    a[3, 1, 0, 0, 0] = float("-inf")
    got, ref = run_both(a, g, rois)
    assert torch.isnan(got.dice[1:]).all() and torch.isnan(got.cam[1:]).all() and not got.hit[1:].any()
    assert_matches(got, ref)


def test_first_maximum_wins_across_tiles() -> None:
    # Identity size (1, 2, 200): exact maxima at (0, 0, 5) and (0, 1, 5); the first is in the ROI.
    m = torch.zeros(1, 1, 1, 2, 200)
    m[..., 0, 5] = m[..., 1, 5] = 1024.0
    rois = torch.zeros(1, 1, 2, 200, dtype=torch.bool)
    rois[0, 0, 0, 5] = True
    got, ref = run_both(m, torch.ones_like(m), rois)
    assert got.hit.item() and ref.hit.item()
    assert_matches(got, ref, atol=0)


def test_channels_last_3d_and_strided_rois_need_no_copy() -> None:
    a, g, rois = random_inputs(2, 6, (3, 4, 5), (7, 9, 8), seed=3)
    ref = reference3d.gradcam_dice_3d(a, g, rois, return_cam=True)
    a_cl = a.to(memory_format=torch.channels_last_3d)
    assert k3._voxel_view(a_cl).data_ptr() == a_cl.data_ptr()
    rois_t = rois.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)  # same values, reversed strides
    got = launch(a_cl.to(DEVICE), g.to(DEVICE), rois_t.to(DEVICE), 0.5, True, out=poisoned(ref, (3, 4, 5)))
    assert_matches(RoiAgreement(*(t.cpu() for t in got)), ref, hit=False)


def test_launcher_allocates_and_checks() -> None:
    a, g, rois = random_inputs(2, 3, (2, 2, 3), (4, 5, 6), seed=4)
    ref = reference3d.gradcam_dice_3d(a, g, rois)
    got = launch(a.to(DEVICE), g.to(DEVICE), rois.to(DEVICE))
    assert got.cam is None and got.hit.dtype == torch.bool
    assert_matches(RoiAgreement(*(t.cpu() for t in got[:4]), None), ref._replace(cam=None), hit=False)
    a, rois = a.to(DEVICE), rois.to(DEVICE)
    with pytest.raises(XalError, match="either activations and weights, or low_res alone"):
        k3.gradcam_dice_3d_triton(a, rois)
    with pytest.raises(XalError, match=r"weights: expected float32 \(2, 3\)"):
        k3.gradcam_dice_3d_triton(a, rois, weights=torch.ones(2, 4, device=DEVICE))
    with pytest.raises(XalError, match=r"low_res: expected a contiguous float32 map \(B, d, h, w\)"):
        k3.gradcam_dice_3d_triton(None, rois, low_res=torch.ones(2, 2, 3, device=DEVICE))
    with pytest.raises(XalError, match=r"rois: expected \(2, D, H, W\)"):
        k3.gradcam_dice_3d_triton(a, rois[:, 0], weights=torch.ones(2, 3, device=DEVICE))
    with pytest.raises(XalError, match="out.cam: expected a contiguous torch.float32 tensor of shape"):
        launch(a, g.to(DEVICE), rois, out=poisoned(ref, (2, 3, 2)))
    big = torch.zeros(1, 1, 17, 32, 32, device=DEVICE)
    with pytest.raises(XalError, match="feature volume 17x32x32 exceeds the kernel's 16384 voxels"):
        k3.gradcam_dice_3d_triton(big, torch.zeros(1, 2, 2, 2, dtype=torch.bool, device=DEVICE),
                                  weights=torch.ones(1, 1, device=DEVICE))


def test_empty_batch() -> None:
    a, g, rois = random_inputs(0, 3, (2, 3, 4), (5, 6, 7), seed=0)
    got = launch(a.to(DEVICE), g.to(DEVICE), rois.to(DEVICE), return_cam=True)
    assert got.dice.shape == (0,) and got.cam.shape == (0, 2, 3, 4)


def test_launch_config_bounds() -> None:
    cfg = k3._launch_config(channels=512, voxels=4 * 4 * 4, depth=128, height=128, width=128)
    assert cfg["BLOCK_C"] * cfg["BLOCK_P"] <= 4096 and cfg["BLOCK_R"] * cfg["BLOCK_X"] <= 1024
    assert cfg["BLOCK_X"] == 128 and cfg["BLOCK_R"] == 8
    assert k3._launch_config(channels=3, voxels=1, depth=1, height=1, width=1)["BLOCK_C"] == 4


COMPILE_CHECK = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from xal_engine.kernels.gradcam_dice_3d import _gradcam_dice_3d_kernel as fn, _launch_config

cfg = _launch_config(channels=512, voxels=4 * 4 * 4, depth=128, height=128, width=128)
warps = cfg.pop("num_warps")
ptrs = {"a_ptr": "*bf16", "roi_ptr": "*u8", "hit_ptr": "*u8"}
floats = ("scale_z", "scale_y", "scale_x", "threshold")
wide = ("a_sb", "a_sc", "r_sb")  # strides past 2**31 (large batches) arrive as int64
found = set()
for map_given in (False, True):
    consts = {**cfg, "MAP_GIVEN": map_given}
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "*fp32" if n.endswith("_ptr") else "fp32" if n in floats
                                                       else "i64" if n in wide else "i32")
           for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
    found |= set(re.findall(r"div\\.[a-z]+\\.f32", ptx))
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


@settings(max_examples=8, deadline=None)  # the interpreter takes ~0.3 s per example
@given(
    c=st.integers(1, 6), d=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 4),
    big_d=st.integers(1, 9), big_h=st.integers(1, 9), big_w=st.integers(1, 20), seed=st.integers(0, 2**16),
)
def test_matches_reference_on_any_shape(c, d, h, w, big_d, big_h, big_w, seed) -> None:
    size = (big_d, big_h, big_w)
    a, g, rois = random_inputs(2, c, (d, h, w), size, seed=seed)
    # As in 2-D: keep maps that are all-zero or spread over >= 0.05 (stage 2 amplifies ~2e-7 of
    # interpolation noise on a nearly constant U), with no voxel within 1e-5 of the threshold.
    n = reference3d.low_res_cam_3d(a, g)
    u = torch.nn.functional.interpolate(n[:, None], size=size, mode="trilinear", align_corners=False).flatten(1)
    assume(bool(((n.flatten(1).amax(1) == 0) | (u.amax(1) - u.amin(1) >= 0.05)).all()))
    assume(bool(((reference3d.gradcam_maps_3d(a, g, size) - 0.5).abs() > 1e-5).all()))
    got, ref = run_both(a, g, rois)
    assert_matches(got, ref, hit=False)
