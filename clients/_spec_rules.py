"""The rules across settings that the flow's config and the apps' run spec both apply, in the same words."""

from __future__ import annotations

from clients.models import SKLEARN_MODELS, summed_arrays

ROUND_ATTEMPTS = 2  # tries of a round that gets too few valid training replies (server.rounds.RoundPolicy)


def privacy_conflict(model: str, privacy_mode: str) -> str | None:
    """Return why ``model`` cannot train under ``privacy_mode`` (None: it can); the flow and the apps say the same."""
    if privacy_mode == "sample-level" and model in SKLEARN_MODELS:
        return (f"sample-level DP-SGD (Opacus) trains PyTorch models, but the model is the scikit-learn {model!r}: "
                "use the model 'torch-logreg', client-level privacy, or train this arm without DP")
    return None


def aggregation_conflict(aggregation: str, privacy_mode: str) -> str | None:
    """Return why ``aggregation`` cannot combine updates under ``privacy_mode`` (None: it can)."""
    if privacy_mode == "client-level" and aggregation != "fedavg":
        return (f"client-level DP calibrates its noise and ε to the mean of the clipped updates, but the arm "
                f"aggregates with {aggregation!r} (a median or Krum can move further with one node): use aggregation "
                "'fedavg', or sample-level privacy")
    return None


def sums_conflict(model: str, *, privacy_mode: str, max_update_norm: float | None) -> str | None:
    """Return why a model whose arrays are summed counts (mnb) cannot train with these settings (None: it can).

    Its nodes send their counts as shares of their examples and the server multiplies the mean back
    into the federation's sums: an update (share minus global sums) has no meaning to clip or bound.
    """
    if not summed_arrays(model):
        return None
    if privacy_mode == "client-level":
        return (f"client-level DP clips each node's update, but {model!r} sends counts that the server adds up, "
                "not an update: use the model 'tfidf-logreg', or train this arm without DP")
    if max_update_norm:
        return (f"max_update_norm bounds a node's update, but {model!r} sends counts that the server adds up: "
                "leave max_update_norm empty for it")
    return None


DISTILL_UNDER_DP = ("a distilled arm learns from its teacher's soft labels on the nodes' data outside any privacy "
                    "budget: turn distill off, or privacy.mode to 'none'")


def longest_round_s(round_timeout_s: float, attempts: int = ROUND_ATTEMPTS) -> float:
    """Return the longest one round may take: every training attempt and the evaluation, each up to the timeout."""
    return (attempts + 1) * round_timeout_s
