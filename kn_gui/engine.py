"""Adapters from the engine's return shapes to what the panels show. No tensor math: kn_core computes."""

from __future__ import annotations


def neuron_tokens(lm, layer: int, neuron: int, k: int = 12) -> dict:
    """The tokens a neuron's value vector promotes and suppresses (kn_core.evaluation.neuron_tokens)."""
    from kn_core.evaluation import neuron_tokens as engine_tokens

    result = engine_tokens(lm, layer, neuron, top_k=k)
    return {
        "promoted": [(row["token"], row["logit"]) for row in result["promotes"]],
        "suppressed": [(row["token"], row["logit"]) for row in result["suppresses"]],
        "norm": result.get("norm"),
    }
