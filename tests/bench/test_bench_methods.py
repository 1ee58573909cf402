"""The method axis of `xal-engine bench` (kernel and batch levels): one case per CAM method, each
checked against its pytorch-grad-cam class before it is timed. No timing is asserted."""

from __future__ import annotations

import pytest

from xal_engine.bench import batch, kernel
from xal_engine.bench.compare import BenchError

METHODS = "gradcam,gradcam++,xgradcam,hirescam,layercam,eigencam"


def test_kernel_level_has_a_case_per_method() -> None:
    args = kernel.parse_args(["--quick", "--device", "cpu", "--no-write", "--warmup", "0", "--repeats", "1",
                              "--methods", METHODS])
    rows = kernel.run(args)
    names = {r["benchmark"] for r in rows}
    assert {"quick_7x7_64", "quick_7x7_64_gradcam++", "quick_7x7_224_eigencam"} <= names
    assert len(names) == 3 * 6 and all(r["check"] in ("pass", "reference") for r in rows)
    for r in rows:
        if r["provider"] == "grad-cam":
            assert r["speedup_vs_grad_cam"] == 1.0  # each method against its own class


def test_kernel_default_is_gradcam_only() -> None:
    args = kernel.parse_args(["--quick", "--device", "cpu", "--no-write"])
    assert kernel.parse_methods(args.methods) == ("gradcam",)
    with pytest.raises(BenchError, match="--methods: expected some of gradcam, .*got 'gradcam,scorecam'"):
        kernel.parse_methods("gradcam,scorecam")


def test_library_postprocess_of_gradcam_is_the_baseline() -> None:
    import torch

    from xal_engine.bench import baseline

    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(2, 4, 3, 5, generator=gen), torch.randn(2, 4, 3, 5, generator=gen)
    rois = torch.rand(2, 9, 11, generator=gen) > 0.5
    want = baseline.postprocess(a, g, rois)
    got = kernel.library_postprocess("gradcam", a, g, rois)
    assert all((got[k] == want[k]).all() for k in want)
    cam = kernel.library_cam("gradcam", a.numpy(), g.numpy())  # the class's own code: w = mean G
    torch.testing.assert_close(torch.from_numpy(cam), (g.mean((2, 3))[:, :, None, None] * a).sum(1))


def test_batch_level_has_a_case_per_method() -> None:
    args = batch.parse_args(["--archs", "resnet18", "--batch-size", "2", "--image-size", "64", "--device", "cpu",
                             "--no-write", "--warmup", "0", "--repeats", "1", "--dtypes", "fp32",
                             "--methods", "gradcam,layercam,eigencam"])
    rows = batch.run(args)
    assert {(r["benchmark"], r["provider"]) for r in rows} == {
        (f"resnet18_64{s}", p) for s in ("", "_layercam", "_eigencam") for p in ("xal-engine", "grad-cam", "plain")}
    assert all(r["check"] == "pass" for r in rows if r["provider"] == "xal-engine")
