"""KL between next-token distributions: the one measure calibration, refinement and verification share."""

from __future__ import annotations

from torch import Tensor


def kl_per_token(p_log: Tensor, q_log: Tensor, p: Tensor | None = None) -> Tensor:
    """KL(p ‖ q) over the last axis from log-probabilities; pass p = p_log.exp() to reuse it."""
    p = p_log.exp() if p is None else p
    # KL is never negative; float rounding can make near-identical distributions come out at -1e-9.
    return (p * (p_log - q_log)).sum(-1).clamp_min(0.0)
