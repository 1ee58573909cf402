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


Normalization = tuple[float, ...] | torch.Tensor | None  # per-channel values, or (1, C|1, 1, 1) on the device


def normalization_tensors(mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                          device: torch.device | str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mean, std) as (1, C|1, 1, 1) fp32 tensors on ``device``, made once per run rather than once
    per batch (two host->device copies each); (None, None) when neither is given."""
    if mean is None and std is None:
        return None, None
    m = torch.tensor(mean if mean is not None else (0.0,), dtype=torch.float32, device=device)
    s = torch.tensor(std if std is not None else (1.0,), dtype=torch.float32, device=device)
    return m.view(1, -1, 1, 1), s.view(1, -1, 1, 1)


def to_unit_float(images: torch.Tensor, mean: Normalization = None, std: Normalization = None) -> torch.Tensor:
    """Pool images -> float32 model input: uint8 / 255, uint16 / 65535, floats as they are, then
    ``(x - mean) / std`` per channel when given (one value broadcasts to every channel; tensors from
    :func:`normalization_tensors` are used as they are). Keeps the memory format of ``images``."""
    x = images.to(torch.float32)
    if images.dtype in _SCALE:
        x = x * _SCALE[images.dtype]
    elif not images.dtype.is_floating_point:
        raise XalError(f"images have dtype {images.dtype}; expected uint8, uint16 or a float type")
    if mean is not None or std is not None:
        if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
            mean, std = normalization_tensors(mean, std, x.device)  # type: ignore[arg-type]
        x = (x - per_channel(mean, x.ndim)) / per_channel(std, x.ndim)  # (n,C,H,W) with (1,C|1,1,1)
    return x


def channels_last(ndim: int) -> torch.memory_format:
    """The channels-last layout of an ``ndim``-D batch: images (n, C, H, W) or volumes (n, C, D, H, W)."""
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def per_channel(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(1, C|1, 1, 1) normalisation constants viewed to broadcast over an ``ndim``-D batch."""
    return values if values.ndim == ndim else values.reshape(1, -1, *(1,) * (ndim - 2))


def model_input(images: torch.Tensor, mean: Normalization = None, std: Normalization = None) -> torch.Tensor:
    """Pool images (n, C, H, W) (volumes: (n, C, D, H, W)) -> channels-last float32 model input
    (:func:`to_unit_float`): the layout change runs on the pool dtype (uint8: a quarter of the bytes)
    before the conversion."""
    return to_unit_float(images.contiguous(memory_format=channels_last(images.ndim)), mean, std)


class ModelInputs:
    """:func:`model_input` for a run's batches, with the normalisation constants on ``device`` made
    once and the float input written into one reused channels-last buffer (a fresh 38 MB tensor per
    64-image 224x224x3 batch costs its page faults on the CPU). The same values, bit for bit; a
    returned input is valid until the next call."""

    def __init__(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                 device: torch.device | str) -> None:
        self.mean, self.std = normalization_tensors(mean, std, device)
        self.buffer: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        scale = _SCALE.get(images.dtype)
        if scale is None and not images.dtype.is_floating_point:
            raise XalError(f"images have dtype {images.dtype}; expected uint8, uint16 or a float type")
        n, tail = images.shape[0], tuple(images.shape[1:])
        buf = self.buffer
        if buf is None or tuple(buf.shape[1:]) != tail or buf.shape[0] < n or buf.device != images.device:
            buf = self.buffer = torch.empty((n, *tail), dtype=torch.float32, device=images.device,
                                            memory_format=channels_last(images.ndim))
        x = buf[:n]  # channels-last still: a slice along N
        x.copy_(images)  # the dtype conversion of to_unit_float, into the buffer
        if scale is not None:
            x.mul_(scale)
        if self.mean is not None:
            x.sub_(per_channel(self.mean, x.ndim)).div_(per_channel(self.std, x.ndim))  # (x - mean) / std
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
