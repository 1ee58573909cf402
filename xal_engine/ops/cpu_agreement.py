"""Stage 2 and the ROI agreement on the CPU: the reference's operations, cache-blocked and in place.

``upsample_normalise`` followed by ``roi_agreement`` (:mod:`xal_engine.ops.reference`) allocates a
dozen fresh (B, H, W) tensors per batch, and each pass streams them through memory: at 224x224 the
allocations' page faults and the memory traffic, not the arithmetic, cost most of it. Here the same
operations, in the same order, run over slices of a few images whose (k, H, W) working set stays in
cache, into buffers allocated once per shape (:class:`Workspace`), with out= and in-place ops:

    U = bilinear(N)                     upsample_bilinear2d(out=U)
    mn, mx = min U, max U               aminmax
    S = (U - mn) / ((mx - mn) + 1e-7)   sub_, div_   (max(U - mn) = mx - mn exactly: rounding is monotone)
    T = S >= tau                        ge(out=T)
    sums of S, S R, T, T R, R; max S, argmax S

Every elementwise result is the reference's bit for bit, and every per-image reduction runs over the
same row with the same kernel (a slice holds at least two images, so torch reduces each row whole
rather than splitting it between threads), so the outputs equal the reference's bit for bit; the
tests check that on random and edge-case inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xal_engine.ops import cpu_fused
from xal_engine.ops.agreement import RoiAgreement
from xal_engine.ops.cam_methods import CamMethod, get_cam_method
from xal_engine.ops.reference import EPS, agreement_from_sums, agreement_result, low_res_cam

SLICE_PIXELS = 1 << 19  # pixels per slice (2 MiB of fp32): a few images at 224x224, one L2/L3-sized block
EXACT_COUNTS = 1 << 24  # pixel counts are summed in fp32: exact below 2**24 pixels per image


class Workspace:
    """Per-slice buffers, kept for the next call of the same (k, H, W): a scoring run reuses them."""

    def __init__(self) -> None:
        self.key: tuple[int, int, int] | None = None
        self.u = self.r = self.t = self.prod = torch.empty(0)
        self.like_key: tuple[torch.Size, tuple[int, ...]] | None = None
        self.products = torch.empty(0)

    def like(self, x: Tensor) -> Tensor:
        """A kept fp32 buffer of x's shape and strides (the layout an elementwise op with x would give)."""
        if self.like_key != (x.shape, x.stride()):
            self.like_key = (x.shape, x.stride())
            self.products = torch.empty_like(x, dtype=torch.float32, memory_format=torch.preserve_format)
        return self.products

    def get(self, k: int, h: int, w: int) -> Workspace:
        if self.key != (k, h, w):
            self.key = (k, h, w)
            self.u = torch.empty((k, 1, h, w), dtype=torch.float32)  # U, then S in place
            self.r, self.t, self.prod = (torch.empty((k, h * w), dtype=torch.float32) for _ in range(3))
        return self


_WORKSPACE = Workspace()


def slices(batch: int, k: int) -> list[tuple[int, int]]:
    """[a, b) ranges of k images covering the batch; a last range of one image joins the one before
    (every range holds at least two, see the module docstring)."""
    cuts = list(range(0, batch, k))
    if len(cuts) > 1 and batch - cuts[-1] < 2:
        cuts.pop()
    return list(zip(cuts, [*cuts[1:], batch]))


def slice_images(batch: int, pixels: int) -> int:
    """Images per slice: about SLICE_PIXELS pixels, at least 2 (see the module docstring), at most the batch."""
    return min(batch, max(2, SLICE_PIXELS // max(pixels, 1)))


def upsample_agreement(cam: Tensor, rois: Tensor, threshold: float,
                       workspace: Workspace | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dice, soft_dice, energy, hit) of the stage-1 maps N (B, h, w) fp32 on the CPU against bool ROIs
    (B, H, W): ``roi_agreement(upsample_normalise(N, (H, W)), rois, threshold)``, bit for bit."""
    batch, (height, width) = cam.shape[0], rois.shape[1:]
    pixels = height * width
    if batch < 2 or pixels >= EXACT_COUNTS:  # one image: torch splits its row between threads, as
        from xal_engine.ops.reference import roi_agreement, upsample_normalise  # the reference does

        return roi_agreement(upsample_normalise(cam, (height, width)), rois, threshold)
    if cpu_fused.fused_matches_torch(*cam.shape[1:], height, width) and cam.dtype == torch.float32:
        fused = cpu_fused.agreement(cam, rois.reshape(batch, pixels), (height, width), threshold)
        if fused is not None:  # None: a map with a sign bit, which only a hand-made map has
            return fused
    return upsample_agreement_torch(cam, rois, threshold, workspace)


def upsample_agreement_torch(cam: Tensor, rois: Tensor, threshold: float,
                             workspace: Workspace | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`upsample_agreement` through torch operations over cache-sized slices (B >= 2)."""
    batch, (height, width) = cam.shape[0], rois.shape[1:]
    pixels = height * width
    ws = workspace if workspace is not None else _WORKSPACE
    flat_rois = rois.reshape(batch, pixels)
    dice, soft, energy = (torch.empty(batch, dtype=torch.float32) for _ in range(3))
    hit = torch.empty(batch, dtype=torch.bool)
    for a, b in slices(batch, slice_images(batch, pixels)):
        buf = ws.get(b - a, height, width)
        torch._C._nn.upsample_bilinear2d(cam[a:b, None], (height, width), False, out=buf.u)
        s = buf.u.view(b - a, pixels)  # [k, P]: U, then S in place
        low, high = s.amin(1, keepdim=True), s.amax(1, keepdim=True)
        s.sub_(low)  # U - min U
        s.div_((high - low) + EPS)  # / (max(U - min U) + 1e-7)
        r = flat_rois[a:b]
        buf.r.copy_(r)  # R as 0/1 floats: products and counts in fp32, exact counts below 2**24
        torch.ge(s, threshold, out=buf.t)  # T = S >= tau as 0/1
        n_roi, n_att = buf.r.sum(1), buf.t.sum(1)
        n_both = torch.mul(buf.t, buf.r, out=buf.prod).sum(1)  # |T & R|
        s_roi = torch.mul(s, buf.r, out=buf.prod).sum(1)  # sum(S R): the values of where(R, S, 0)
        parts = agreement_from_sums(n_both, n_att, n_roi, s_roi, s.sum(1), s.amax(1),
                                    r.gather(1, s.argmax(1, keepdim=True))[:, 0])
        for out, v in zip((dice, soft, energy, hit), parts):
            out[a:b] = v
    return dice, soft, energy, hit


def low_res_cam_cpu(activations: Tensor, gradients: Tensor, method: str | CamMethod,
                    workspace: Workspace | None = None) -> Tensor:
    """``reference.low_res_cam`` with a weight method's products w_k A_k in a kept buffer of A's
    layout (fresh ones cost 13 MB per 64-image batch of 16 x 56 x 56 maps, whose page faults cost
    more than the sum): the same operations in the same order, the same bits."""
    kept = get_cam_method(method).weights is not None and activations.dtype == torch.float32
    ws = workspace if workspace is not None else _WORKSPACE
    return low_res_cam(activations, gradients, method, products=ws.like(activations) if kept else None)


def gradcam_dice_cpu(activations: Tensor, gradients: Tensor, rois: Tensor, threshold: float,
                     return_cam: bool, *, method: str | CamMethod = "gradcam") -> RoiAgreement:
    """``reference.gradcam_dice_checked`` for CPU tensors, the same values bit for bit (not a graph): a weight
    method's channels-last fp32 A in one compiled pass from A to the metrics (``cpu_fused.cam_agreement``)
    where its shape passes the probe; otherwise stage 1 through :func:`low_res_cam_cpu` and stage 2
    with the agreement through :func:`upsample_agreement`."""
    cam_method = get_cam_method(method)
    # values only, as the kernel's: a graph tensor (a hooked A without detach) is read, not differentiated
    activations, gradients = activations.detach(), gradients.detach()
    if cam_method.weights is not None and _fused_from_activations(activations, rois):
        weights = cam_method.weights(activations, gradients.float()).float()  # [B, C], as low_res_cam's
        cam, *metrics = cpu_fused.cam_agreement(activations, weights, rois.reshape(rois.shape[0], -1),
                                                tuple(rois.shape[1:]), threshold)
        return RoiAgreement(*metrics, cam if return_cam else None)
    cam = low_res_cam_cpu(activations, gradients, cam_method)  # [B, h, w]
    return agreement_result(cam, rois, threshold, return_cam, upsample_agreement)


def _fused_from_activations(activations: Tensor, rois: Tensor) -> bool:
    """Whether A (B, C, h, w) takes ``cpu_fused.cam_agreement``: fp32, channels-last and not also
    contiguous (there torch sums each pixel's C products as one contiguous row; h * w > 1), B >= 2,
    fewer than 2**24 ROI pixels, and a shape the probe passes."""
    if activations.dtype != torch.float32 or activations.dim() != 4 or activations.shape[0] < 2:
        return False
    if not activations.is_contiguous(memory_format=torch.channels_last) or activations.is_contiguous():
        return False
    height, width = rois.shape[1:]
    return height * width < EXACT_COUNTS and cpu_fused.cam_fused_matches_torch(*activations.shape[1:], height, width)
