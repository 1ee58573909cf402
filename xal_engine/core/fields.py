"""The per-image result fields of a scoring run: one registry that every consumer derives from.

``score_batch`` returns them on the device (:class:`BatchScores`), the scorer copies them to the host
in one transfer (:func:`pack` / :func:`unpack`), a score run stores one array per field under
``scores/<run>/``, selection reads them back (:class:`PerImage`) and the batch CSV writes the
scalar ones. Adding a field is one line here plus its computation in ``score_batch``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Field:
    """One per-image result: its stored dtype, shape per image and fill value."""

    name: str
    dtype: str  # numpy dtype of the stored array (and of the host copy)
    per_class: bool  # shape per image (K,) when True, () otherwise
    fill: float | int | bool  # value of an image not scored yet
    needs_roi: bool  # NaN (hit: False) for an image without an ROI
    doc: str

    @property
    def in_batch_csv(self) -> bool:
        return not self.per_class  # one CSV column per scalar field


NAN = math.nan
FIELDS: tuple[Field, ...] = (
    Field("pred", "int16", False, -1, False, "argmax of the logits"),
    Field("entropy", "float32", False, NAN, False, "Shannon entropy of the softmax, nats"),
    Field("margin", "float32", False, NAN, False, "top-1 minus top-2 probability"),
    Field("least_confidence", "float32", False, NAN, False, "1 - top-1 probability"),
    Field("dice", "float32", False, NAN, True, "hard Dice of {CAM >= threshold} with the ROI"),
    Field("soft_dice", "float32", False, NAN, True, "soft Dice of the CAM with the ROI"),
    Field("energy", "float32", False, NAN, True, "energy-based pointing game: CAM mass inside the ROI"),
    Field("hit", "bool", False, False, True, "pointing game: the CAM's maximum lies in the ROI"),
    Field("probs", "float16", True, NAN, False, "softmax of the logits (fp32 on the device)"),
)
BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
NAMES: tuple[str, ...] = tuple(BY_NAME)


class PerImage(Generic[T]):
    """Per-image results keyed by field name, as attributes: ``r.dice``, ``r["dice"]``.

    Rows are images; values are tensors (on the device) or numpy arrays (host). Any subset of the
    registry's fields may be present (selection reads only what it ranks by); an unknown name is
    an error.
    """

    def __init__(self, **values: T) -> None:
        unknown = sorted(set(values) - set(BY_NAME))
        if unknown:
            raise TypeError(f"unknown result field(s) {unknown}; known: {', '.join(NAMES)}")
        self._values = {n: values[n] for n in NAMES if n in values}  # registry order

    def __getattr__(self, name: str) -> T:  # only called for names not found normally
        if name.startswith("_"):  # e.g. while unpickling, before _values exists
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}") from None

    def __getitem__(self, name: str) -> T:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._values.items())

    def as_dict(self) -> dict[str, T]:
        return dict(self._values)

    def rows(self, start: int, stop: int) -> PerImage[T]:
        """Images [start, stop) of every field."""
        return type(self)(**{n: v[start:stop] for n, v in self._values.items()})  # type: ignore[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._values)})"


class BatchScores(PerImage[torch.Tensor]):
    """Per-image results of one batch on the model's device: probs (B, K) fp32, pred (B,) int64,
    the float fields (B,) fp32 (ROI metrics NaN where no ROI exists), hit (B,) bool; ``cam`` is the
    normalised low-resolution map N (B, h, w) fp32 when asked for, else None."""

    def __init__(self, cam: torch.Tensor | None = None, **values: torch.Tensor) -> None:
        missing = sorted(set(NAMES) - set(values))
        if missing:
            raise TypeError(f"BatchScores needs every result field; missing {missing}")
        super().__init__(**values)
        self.cam = cam


def concat(parts: list[PerImage[np.ndarray]]) -> PerImage[np.ndarray]:
    """Host results of consecutive batches, rows in order."""
    if len(parts) == 1:
        return parts[0]
    return PerImage(**{n: np.concatenate([p[n] for p in parts]) for n in parts[0]})


def pack(scores: Mapping[str, torch.Tensor] | PerImage[torch.Tensor]) -> torch.Tensor:
    """Every field as fp32 columns of one (B, F) tensor, registry order (a per-class field takes K
    columns), so that one device -> host copy moves them all. int16 and bool values are exact in fp32."""
    return torch.cat([scores[f.name].float().reshape(scores[f.name].shape[0], -1) for f in FIELDS], dim=1)


def unpack(packed: np.ndarray) -> PerImage[np.ndarray]:
    """Inverse of :func:`pack` on the host: (B, F) float32 -> each field in its stored dtype."""
    n_scalar = sum(not f.per_class for f in FIELDS)
    per_class = [f for f in FIELDS if f.per_class]
    k = (packed.shape[1] - n_scalar) // max(len(per_class), 1)
    out, col = {}, 0
    for f in FIELDS:
        width = k if f.per_class else 1
        block = packed[:, col:col + width]
        col += width
        values = block if f.per_class else block[:, 0]
        out[f.name] = values > 0.5 if f.dtype == "bool" else values.astype(f.dtype)
    return PerImage(**out)
