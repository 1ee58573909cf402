"""The ``gradcam_dice`` op: its checks, its pure-torch reference and the dispatch to the Triton kernel.

``kernels/`` (installed as ``xal_engine.kernels``) sits below this package and imports from it only
the shared result type (:mod:`xal_engine.ops.agreement`) and :mod:`xal_engine.errors`.
"""

from xal_engine.ops.agreement import RoiAgreement
from xal_engine.ops.checks import check_inputs
from xal_engine.ops.dispatch import BACKENDS, Backend, gradcam_dice, gradcam_dice_layers, pick_backend

__all__ = ["BACKENDS", "Backend", "RoiAgreement", "check_inputs", "gradcam_dice", "gradcam_dice_layers",
           "pick_backend"]
