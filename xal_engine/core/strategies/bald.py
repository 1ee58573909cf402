"""``bald``: mutual information between the prediction and the model's weights (Houlsby et al., 2011),
I = H[mean_t p_t] - mean_t H[p_t] over T MC-dropout passes: high where the passes disagree with each
other, not merely where each is unsure (score --mc-samples T)."""

from __future__ import annotations

from xal_engine.core.strategies.terms import FieldStrategy


class Bald(FieldStrategy):
    name = "bald"
    summary = "BALD mutual information of T MC-dropout passes (score --mc-samples T)"
    needs = ("entropy", "bald")
    how = ("score the run with --mc-samples T (a model trained with --head-dropout P, or score "
           "--mc-dropout P)")
    field = "bald"
