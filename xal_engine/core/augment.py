"""Training augmentation: random flips and integer shifts applied to images and ROIs alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AugmentConfig:
    """Light training augmentation, identical for image and ROI."""

    hflip: float = 0.5  # probability of a left-right flip
    vflip: float = 0.0  # up-down flips change anatomy in most modalities: off by default
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
    and rois (B,H,W) alike, as two gathers. Random numbers come from the CPU ``generator`` (so a seed
    reproduces them on any device); only (B,)-sized draws are copied to the device."""
    b, _, h, w = images.shape
    u = torch.rand(b, 2, generator=generator)
    sy, sx = int(config.max_shift * h), int(config.max_shift * w)
    dy = torch.randint(-sy, sy + 1, (b,), generator=generator)
    dx = torch.randint(-sx, sx + 1, (b,), generator=generator)
    dev = images.device
    ys, vy = _source_coords(h, dy.to(dev), (u[:, 0] < config.vflip).to(dev))  # (B,H)
    xs, vx = _source_coords(w, dx.to(dev), (u[:, 1] < config.hflip).to(dev))  # (B,W)
    mask = vy[:, :, None] & vx[:, None, :]  # (B,H,W): output pixels with a source inside the image

    def move(x: torch.Tensor) -> torch.Tensor:  # x (B,K,H,W)
        k = x.shape[1]
        x = x.gather(2, ys[:, None, :, None].expand(b, k, h, w))
        x = x.gather(3, xs[:, None, None, :].expand(b, k, h, w))
        return x * mask[:, None].to(x.dtype) if x.dtype != torch.bool else x & mask[:, None]

    out_rois = move(rois[:, None])[:, 0] if rois is not None else None
    return move(images), out_rois
