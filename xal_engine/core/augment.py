"""Training augmentation: random flips and integer shifts applied to images and ROIs alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AugmentConfig:
    """Light training augmentation, identical for image and ROI."""

    hflip: float = 0.5  # probability of a left-right flip
    vflip: float = 0.0  # up-down flips change anatomy in most modalities: off by default
    dflip: float = 0.0  # volumes: flips of the slice order (inferior-superior), off for the same reason
    max_shift: float = 0.0625  # largest translation, as a fraction of the side (zero fill)


def _source_coords(size: int, shift: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (B,), the source coordinate of every output coordinate (B, size) and its validity."""
    src = torch.arange(size, device=shift.device).view(1, -1) - shift.view(-1, 1)  # (B, size)
    valid = (src >= 0) & (src < size)
    src = torch.where(flip.view(-1, 1), size - 1 - src, src).clamp(0, size - 1)
    return src, valid


def augment_batch(images: torch.Tensor, rois: torch.Tensor | None, generator: torch.Generator,
                  config: AugmentConfig = AugmentConfig()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random flips and integer shifts of a batch, one draw per image, applied to images (B,C,H,W)
    and rois (B,H,W) alike, as one gather per axis; volumes (B,C,D,H,W) and rois (B,D,H,W) also
    along D. Random numbers come from the CPU ``generator`` (so a seed reproduces them on any
    device; 2-D batches draw exactly what they drew before volumes existed); only (B,)-sized draws
    are copied to the device."""
    b, _, *spatial = images.shape
    nd = len(spatial)
    flips = ((config.dflip,) if nd == 3 else ()) + (config.vflip, config.hflip)  # per axis (D,) H, W
    u = torch.rand(b, nd, generator=generator)
    shifts = []
    for size in spatial:
        most = int(config.max_shift * size)
        shifts.append(torch.randint(-most, most + 1, (b,), generator=generator))
    dev = images.device
    coords = [_source_coords(size, shift.to(dev), (u[:, i] < p).to(dev))  # (B, size) each
              for i, (size, shift, p) in enumerate(zip(spatial, shifts, flips))]

    def along(t: torch.Tensor, axis: int, lead: int) -> torch.Tensor:
        """(B, n) viewed to broadcast along spatial ``axis`` of a (B, [K,] *spatial) tensor."""
        shape = [b] + [1] * (lead + nd)
        shape[lead + 1 + axis] = t.shape[1]
        return t.view(shape)

    mask = coords[0][1].view(b, -1, *(1,) * (nd - 1))  # (B, *spatial): output voxels with a source inside
    for axis in range(1, nd):
        mask = mask & along(coords[axis][1], axis, 0)

    def move(x: torch.Tensor) -> torch.Tensor:  # x (B, K, *spatial)
        k = x.shape[1]
        for axis, (src, _) in enumerate(coords):
            x = x.gather(2 + axis, along(src, axis, 1).expand(b, k, *spatial))
        return x * mask[:, None].to(x.dtype) if x.dtype != torch.bool else x & mask[:, None]

    out_rois = move(rois[:, None])[:, 0] if rois is not None else None
    return move(images), out_rois
