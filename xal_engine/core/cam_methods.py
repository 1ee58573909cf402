"""The CAM methods a job can ask for: their names and the validator, for configs and flags.

The method math lives one layer down, in :mod:`xal_engine.ops.cam_methods` (``ops.cam_methods.CAM_METHODS``:
name → :class:`~xal_engine.ops.cam_methods.CamMethod`), because the pure-torch reference and the kernel
dispatch use it and nothing imports upward. This module needs no torch, so that the CLI can list and
check the names without loading it; ``CAM_METHODS`` here is that registry, imported on first use.
"""

from __future__ import annotations

from typing import Any

from xal_engine.errors import XalError

# name -> the pytorch-grad-cam 1.5.7 class it equals (the order of ops.cam_methods.CAM_METHODS)
REFERENCE_CLASSES: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
}
CAM_METHOD_NAMES: tuple[str, ...] = tuple(REFERENCE_CLASSES)
DEFAULT_CAM_METHOD = "gradcam"


def check_cam_method(name: object) -> str:
    """``name`` when it names a CAM method; an XalError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in REFERENCE_CLASSES:
        raise XalError(f"cam method: expected one of {', '.join(CAM_METHOD_NAMES)}, got {name!r}")
    return name


def cam_method_help() -> str:
    """One line for a ``--cam-method`` flag: each name and the pytorch-grad-cam class it equals."""
    return ", ".join(f"{name} ({cls})" for name, cls in REFERENCE_CLASSES.items())


def __getattr__(name: str) -> Any:
    if name in ("CAM_METHODS", "CamMethod", "get_cam_method"):  # the torch side, on first use
        from xal_engine.ops import cam_methods

        return getattr(cam_methods, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# CAM_METHODS, CamMethod and get_cam_method come from ops.cam_methods through __getattr__.
__all__ = ["CAM_METHOD_NAMES", "DEFAULT_CAM_METHOD", "REFERENCE_CLASSES", "cam_method_help", "check_cam_method"]
