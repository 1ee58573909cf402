"""The per-image result fields of a scoring run: one registry that every consumer derives from.

``score_batch`` returns them on the device (:class:`BatchScores`), the scorer copies them to the host
in one transfer (:func:`pack` / :func:`unpack`), a score run stores one array per field under
``scores/<run>/``, selection reads them back (:class:`PerImage`) and the batch CSV writes the
scalar ones. Adding a field is one line here plus its computation in ``score_batch``.

A field's per-image shape is a kind: a scalar, one value per class (K,), the low-resolution CAM
(h, w) or the pooled penultimate features (D,), whose sizes a run fixes at creation (:class:`Layout`).
An optional field is computed, copied and stored only by runs that ask for it: ``cam``
(``score --save-cams``), ``embedding`` (``score --embeddings``) and the MC-dropout group ``bald``,
``mc_entropy``, ``variation_ratio`` (``score --mc-samples T``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


# per-image shape kinds: (), (K,), (h, w), (D,)
SCALAR, PER_CLASS, CAM_MAP, EMBEDDING = "scalar", "class", "map", "embedding"


@dataclass(frozen=True)
class Field:
    """One per-image result: its stored dtype, per-image shape kind and fill value."""

    name: str
    dtype: str  # numpy dtype of the stored array (and of the host copy)
    shape: str  # SCALAR (), PER_CLASS (K,), CAM_MAP (h, w) or EMBEDDING (D,); sizes from the run's Layout
    fill: float | int | bool  # value of an image not scored yet
    needs_roi: bool  # NaN (hit: False) for an image without an ROI
    doc: str
    optional: bool = False  # stored only by runs that ask for it

    @property
    def per_class(self) -> bool:
        return self.shape == PER_CLASS

    @property
    def in_batch_csv(self) -> bool:
        # one CSV column per scalar field every run stores (an optional one is absent from most runs)
        return self.shape == SCALAR and not self.optional


NAN = math.nan
FIELDS: tuple[Field, ...] = (
    Field("pred", "int16", SCALAR, -1, False, "argmax of the logits"),
    Field("entropy", "float32", SCALAR, NAN, False, "Shannon entropy of the softmax, nats"),
    Field("margin", "float32", SCALAR, NAN, False, "top-1 minus top-2 probability"),
    Field("least_confidence", "float32", SCALAR, NAN, False, "1 - top-1 probability"),
    Field("dice", "float32", SCALAR, NAN, True, "hard Dice of {CAM >= threshold} with the ROI"),
    Field("soft_dice", "float32", SCALAR, NAN, True, "soft Dice of the CAM with the ROI"),
    Field("energy", "float32", SCALAR, NAN, True, "energy-based pointing game: CAM mass inside the ROI"),
    Field("hit", "bool", SCALAR, False, True, "pointing game: the CAM's maximum lies in the ROI"),
    Field("probs", "float16", PER_CLASS, NAN, False, "softmax of the logits (fp32 on the device)"),
    Field("cam", "float16", CAM_MAP, NAN, False, "normalised low-resolution Grad-CAM N at the target "
          "layer's resolution (score --save-cams)", optional=True),
    # MC dropout (score --mc-samples T): T stochastic passes of the head over the trunk's pooled features
    Field("bald", "float32", SCALAR, NAN, False, "BALD mutual information H[mean_t p_t] - mean_t H[p_t] over "
          "T MC-dropout passes of the head, nats (score --mc-samples)", optional=True),
    Field("mc_entropy", "float32", SCALAR, NAN, False, "entropy of the mean softmax over T MC-dropout passes, "
          "nats (score --mc-samples)", optional=True),
    Field("variation_ratio", "float32", SCALAR, NAN, False, "1 - (passes voting the modal class) / T over T "
          "MC-dropout passes (score --mc-samples)", optional=True),
    Field("embedding", "float16", EMBEDDING, NAN, False, "pooled penultimate features: the input of the final "
          "classifier layer (score --embeddings)", optional=True),
)
BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
REQUIRED: tuple[Field, ...] = tuple(f for f in FIELDS if not f.optional)  # in every run
REQUIRED_NAMES: tuple[str, ...] = tuple(f.name for f in REQUIRED)
MC_NAMES: tuple[str, ...] = ("bald", "mc_entropy", "variation_ratio")  # stored together, or not at all


@dataclass(frozen=True)
class Layout:
    """The fields a run stores and their per-image shapes."""

    n_classes: int  # K
    cam_shape: tuple[int, ...] | None = None  # (h, w) of the stored CAM ((d, h, w) for volumes); None: no cam
    embedding_dim: int | None = None  # D of the stored embedding; None: the run stores no embedding
    mc: bool = False  # the run stores the MC-dropout fields (MC_NAMES)

    def stores(self, field: Field) -> bool:
        """Whether a run of this layout has ``field``: every required one, and the optional ones asked for."""
        if not field.optional:
            return True
        if field.name == "cam":
            return self.cam_shape is not None
        if field.name == "embedding":
            return self.embedding_dim is not None
        return self.mc and field.name in MC_NAMES

    @property
    def fields(self) -> tuple[Field, ...]:
        return tuple(f for f in FIELDS if self.stores(f))

    def tail(self, field: Field) -> tuple[int, ...]:
        """The per-image shape of ``field``: (), (K,), (h, w) (volumes: (d, h, w)) or (D,)."""
        if field.shape == PER_CLASS:
            return (self.n_classes,)
        if field.shape == CAM_MAP:
            if self.cam_shape is None:
                raise ValueError(f"field {field.name!r} needs the run's CAM shape")
            return tuple(self.cam_shape)
        if field.shape == EMBEDDING:
            if self.embedding_dim is None:
                raise ValueError(f"field {field.name!r} needs the run's embedding size")
            return (self.embedding_dim,)
        return ()

    @classmethod
    def of(cls, values: Mapping[str, torch.Tensor] | PerImage[torch.Tensor]) -> Layout:
        """The layout of one batch's results (shapes only: no device synchronisation)."""
        cam, embedding = values.get("cam"), values.get("embedding")
        return cls(n_classes=int(values["probs"].shape[1]),
                   cam_shape=None if cam is None else tuple(int(s) for s in cam.shape[1:]),
                   embedding_dim=None if embedding is None else int(embedding.shape[1]),
                   mc="bald" in values)


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

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._values.get(name, default)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._values.items())

    def as_dict(self) -> dict[str, T]:
        return dict(self._values)

    def rows(self, start: int, stop: int) -> PerImage[T]:
        """Images [start, stop) of every field."""
        return type(self)(**{n: v[start:stop] for n, v in self._values.items()})  # type: ignore[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._values)})"


class BatchScores(PerImage["torch.Tensor"]):
    """Per-image results of one batch on the model's device: probs (B, K) fp32, pred (B,) int64,
    the float fields (B,) fp32 (ROI metrics NaN where no ROI exists), hit (B,) bool; ``cam`` is the
    normalised low-resolution map N (B, h, w) fp32 when asked for, else None (and then not a field).
    The other optional fields (``embedding`` (B, D), the MC group (B,) each) are present only when
    computed."""

    def __init__(self, cam: torch.Tensor | None = None, **values: torch.Tensor) -> None:
        missing = sorted(set(REQUIRED_NAMES) - set(values))
        if missing:
            raise TypeError(f"BatchScores needs every result field; missing {missing}")
        super().__init__(**values, **({} if cam is None else {"cam": cam}))
        self.cam = cam


def concat(parts: list[PerImage[np.ndarray]]) -> PerImage[np.ndarray]:
    """Host results of consecutive batches, rows in order."""
    if len(parts) == 1:
        return parts[0]
    return PerImage(**{n: np.concatenate([p[n] for p in parts]) for n in parts[0]})


def pack(scores: Mapping[str, torch.Tensor] | PerImage[torch.Tensor]) -> torch.Tensor:
    """Every field present as fp32 columns of one (B, F) tensor, registry order (a per-class field
    takes K columns, the CAM h * w, the embedding D), so that one device -> host copy moves them all.
    int16 and bool values are exact in fp32; the CAM and the embedding are rounded to fp16 only on the
    host, like probs."""
    present = [f.name for f in FIELDS if f.name in scores]
    import torch  # not at module import: the stores read this registry without torch

    return torch.cat([scores[n].float().reshape(scores[n].shape[0], -1) for n in present], dim=1)


def unpack(packed: np.ndarray, layout: Layout | None = None) -> PerImage[np.ndarray]:
    """Inverse of :func:`pack` on the host: (B, F) float32 -> each field of ``layout`` in its stored
    dtype and per-image shape. Without a layout: the required fields, K read off the width."""
    if layout is None:
        n_scalar = sum(f.shape == SCALAR for f in REQUIRED)
        n_per_class = sum(f.shape == PER_CLASS for f in REQUIRED)
        layout = Layout(n_classes=(packed.shape[1] - n_scalar) // max(n_per_class, 1))
    out, col = {}, 0
    for f in layout.fields:
        tail = layout.tail(f)
        width = math.prod(tail)
        values = packed[:, col:col + width].reshape(packed.shape[0], *tail)  # (B,), (B, K), (B, h, w), (B, D)
        col += width
        out[f.name] = values > 0.5 if f.dtype == "bool" else values.astype(f.dtype)
    if col != packed.shape[1]:
        raise ValueError(f"packed results have {packed.shape[1]} columns, the layout {layout} needs {col}")
    return PerImage(**out)
