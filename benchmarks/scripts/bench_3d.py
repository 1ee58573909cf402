"""3-D Grad-CAM -> Dice per volume: xal-engine's 3-D path vs pytorch-grad-cam's 3-D GradCAM vs MONAI's GradCAM.

    python benchmarks/scripts/bench_3d.py [--sizes 64 128] [--batch 2] [--repeats 5] [--device auto]

Model: a small random-init MONAI ResNet (basic blocks 1-1-1-1, widths 8-16-32-64, ``spatial_dims=3``,
one input channel, three classes), target layer ``layer4``; input (B, 1, S, S, S) random, one target
class per volume (different classes in the batch), a box ROI, tau = 0.5. Providers, each timed per
batch and reported per volume (median, p20, p80 over ``--repeats`` after one warm-up):

- ``xal``: forward hook + ``torch.autograd.grad`` of the per-volume target logits (no parameter
  gradients) + ``xal_engine.ops.gradcam_dice`` on the 5-D A, G (the 3-D kernel on CUDA, the 3-D
  reference on CPU): dice, soft dice, energy, hit.
- ``xal-op``: ``ops.gradcam_dice`` alone on captured A, G (the kernel-level cost). On CUDA also
  ``xal-op-torch``: the 3-D torch reference on the same device (the kernel's own baseline).
- ``pytorch-grad-cam``: ``GradCAM(model, [layer4])(x, targets)`` (full backward, host copies,
  ``scipy.ndimage.zoom`` per volume) + numpy Dice.
- ``monai``: ``monai.visualize.GradCAM`` called once per volume with its int class (a batched call with
  mixed classes is wrong, see tests/ops/test_reference3d_parity.py), 1 - its inverted output, + torch Dice.

``dice_mean`` is a sanity column, not a comparison: pytorch-grad-cam's cubic zoom moves Dice (see the
parity tests), and MONAI turns a volume whose CAM is all <= 0 into an all-ones map after inversion
(its normaliser maps a constant map to 0, i.e. "most attended") where xal-engine defines S = 0.

Appends one row per (provider, size) to benchmarks/results/bench_3d.csv with the speed-up over
pytorch-grad-cam, device, versions, the 1-minute load average before and after, and the date.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from xal_engine import ops
from xal_engine.bench.timing import append_rows, provenance, summarise, timeit
from xal_engine.ops.reference import roi_agreement

RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench_3d.csv"
COLUMNS = ["provider", "size", "batch", "feature", "median_ms_per_volume", "p20_ms_per_volume",
           "p80_ms_per_volume", "speedup_vs_pytorch_grad_cam", "dice_mean", "device", "threads",
           "load_avg_1m_before", "load_avg_1m_after", "xal_engine", "torch", "triton", "monai", "grad_cam",
           "scipy", "date", "git_commit"]


def build_model(device: torch.device) -> torch.nn.Module:
    from monai.networks.nets import ResNet

    torch.manual_seed(0)
    net = ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64], spatial_dims=3,
                 n_input_channels=1, num_classes=3)
    return net.eval().to(device)


def capture(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor):
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), store["a"])
    return store["a"].detach(), g


def numpy_dice(maps: np.ndarray, rois: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    att = maps.reshape(len(maps), -1) >= threshold
    r = rois.reshape(len(rois), -1)
    den = att.sum(1) + r.sum(1)
    return np.where(den > 0, 2 * (att & r).sum(1) / np.maximum(den, 1), 0.0)


def run_size(size: int, batch: int, repeats: int, device: torch.device) -> list[dict]:
    from monai.visualize import GradCAM as MonaiGradCAM
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = build_model(device)
    layer = model.layer4
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(batch, 1, size, size, size, generator=gen).to(device)
    targets = (torch.arange(batch) % 3).to(device)
    rois = torch.zeros(batch, size, size, size, dtype=torch.bool)
    q = size // 4
    rois[:, q:3 * q, q:3 * q, q:2 * q] = True
    rois = rois.to(device)
    rois_np = rois.cpu().numpy()

    def xal():
        a, g = capture(model, layer, x, targets)
        return ops.gradcam_dice(a, g, rois)

    a, g = capture(model, layer, x, targets)
    pgc = GradCAM(model, [layer])
    pgc_targets = [ClassifierOutputTarget(int(t)) for t in targets]

    def pytorch_grad_cam():
        return numpy_dice(pgc(x, pgc_targets), rois_np)

    mon = MonaiGradCAM(nn_module=model, target_layers="layer4")

    def monai():
        maps = torch.cat([1 - mon(x=x[i:i + 1], class_idx=int(t)) for i, t in enumerate(targets.tolist())])
        return roi_agreement(maps[:, 0], rois)[0]

    providers = {"xal": xal, "xal-op": lambda: ops.gradcam_dice(a, g, rois)}
    if device.type == "cuda":
        providers["xal-op-torch"] = lambda: ops.gradcam_dice(a, g, rois, backend="torch")
    providers |= {"pytorch-grad-cam": pytorch_grad_cam, "monai": monai}

    rows = []
    for name, fn in providers.items():
        load_before = os.getloadavg()[0]
        times = timeit(fn, device, warmup=1, repeats=repeats, budget_s=120.0)
        load_after = os.getloadavg()[0]
        out = fn()
        dice = out.dice if hasattr(out, "dice") else out
        stats = summarise([t / batch for t in times])
        rows.append({"provider": name, "size": size, "batch": batch, "feature": "x".join(map(str, a.shape[2:])),
                     "median_ms_per_volume": round(stats["median_ms"], 2),
                     "p20_ms_per_volume": round(stats["p20_ms"], 2), "p80_ms_per_volume": round(stats["p80_ms"], 2),
                     "dice_mean": round(float(np.mean(np.asarray(torch.as_tensor(dice).cpu()))), 4),
                     "threads": torch.get_num_threads(), "load_avg_1m_before": round(load_before, 2),
                     "load_avg_1m_after": round(load_after, 2)})
        print(f"{size}^3 {name:18s} {stats['median_ms']:10.1f} ms/volume (p20 {stats['p20_ms']:.1f}, "
              f"p80 {stats['p80_ms']:.1f}), load {load_before:.2f} -> {load_after:.2f}", flush=True)
    pgc.__exit__(None, None, None)
    base = next(r["median_ms_per_volume"] for r in rows if r["provider"] == "pytorch-grad-cam")
    for r in rows:
        r["speedup_vs_pytorch_grad_cam"] = round(base / r["median_ms_per_volume"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    import monai
    import pytorch_grad_cam
    import scipy

    grad_cam_version = getattr(pytorch_grad_cam, "__version__", None)
    if grad_cam_version is None:
        from importlib.metadata import version

        grad_cam_version = version("grad-cam")
    meta = {**provenance(device), "monai": monai.__version__, "grad_cam": grad_cam_version,
            "scipy": scipy.__version__}
    rows = []
    for size in args.sizes:
        rows += [{**r, **{k: meta[k] for k in COLUMNS if k in meta}} for r in run_size(size, args.batch,
                                                                                     args.repeats, device)]
    append_rows(args.out, rows, COLUMNS)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
