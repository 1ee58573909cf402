"""xal-engine: explainability-guided active learning for medical imaging.

For every pool image: uncertainty of the model, its Grad-CAM attention map, and the agreement of that
map with the expert's region of interest (Dice), computed in one fused pass.
"""

__version__ = "0.1.0"
