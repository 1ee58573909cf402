"""Model inputs: pool pixels to float32 (with optional per-channel normalisation), and the device."""

from __future__ import annotations

import torch

from xal_engine.errors import XalError

_SCALE = {torch.uint8: 1.0 / 255.0, torch.uint16: 1.0 / 65535.0}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for ImageNet-pretrained weights: the RGB values for 3 channels, else
    their averages for every channel (matching the averaged stem filters of adapt_conv_weight)."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (sum(IMAGENET_MEAN) / 3,) * channels, (sum(IMAGENET_STD) / 3,) * channels


def to_unit_float(images: torch.Tensor, mean: tuple[float, ...] | None = None,
                  std: tuple[float, ...] | None = None) -> torch.Tensor:
    """Pool images -> float32 model input: uint8 / 255, uint16 / 65535, floats as they are, then
    ``(x - mean) / std`` per channel when given (one value broadcasts to every channel)."""
    x = images.to(torch.float32)
    if images.dtype in _SCALE:
        x = x * _SCALE[images.dtype]
    elif not images.dtype.is_floating_point:
        raise XalError(f"images have dtype {images.dtype}; expected uint8, uint16 or a float type")
    if mean is not None or std is not None:
        m = torch.tensor(mean if mean is not None else (0.0,), dtype=torch.float32, device=x.device)
        s = torch.tensor(std if std is not None else (1.0,), dtype=torch.float32, device=x.device)
        x = (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)  # (n,C,H,W) with (1,C|1,1,1)
    return x


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA request without CUDA is an XalError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise XalError(f"device {name!r} is not valid; expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise XalError(f"device {name!r} requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise XalError(f"device {name!r} is not supported; expected cpu, cuda, cuda:N or auto")
    return device
