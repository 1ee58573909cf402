"""xal-engine: explainability-guided active learning for medical imaging.

For every pool image: uncertainty of the model, its Grad-CAM attention map, and the agreement of that
map with the expert's region of interest (Dice), computed in one fused pass.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Public functions, imported on first use so that `import xal_engine` (and the CLI) stays light.
_LAZY = {
    "gradcam_dice": "xal_engine.ops",
    "score_batch": "xal_engine.core.scoring",
    "BatchScores": "xal_engine.core.scoring",
    "RoiAgreement": "xal_engine.ops",
}
__all__ = ["BatchScores", "RoiAgreement", "__version__", "gradcam_dice", "score_batch"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xal_engine' has no attribute {name!r}")
