"""Contrastive (CAA / mean-difference) steering vectors from two lists of prompts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from steer_core.activations import forward_until, recording, site_module_name
from steer_core.model import LoadedModel
from steer_core.sites import HookPoint
from steer_core.vector import SteeringVector


def _last_token_residuals(lm: LoadedModel, prompts: Sequence[str], point: HookPoint) -> Tensor:
    """Float[Tensor, "n d_model"]: the residual at `point` on each prompt's last token."""
    name = site_module_name(lm.model, point, "resid")
    rows: list[Tensor] = []
    with recording(lm.model, [name], lambda _n, out: rows.append(out[0, -1].float().cpu()), what="output"):
        for prompt in prompts:
            ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
            forward_until(lm.model, point.writer()[0], input_ids=ids)
    return torch.stack(rows)


def mean_difference(
    lm: LoadedModel, positive: Sequence[str], negative: Sequence[str], point: HookPoint
) -> SteeringVector:
    """mean(resid | positive) − mean(resid | negative) at the last token: deterministic, unit-free.

    Scale it with SteeringVector.scaled(); its norm is reported in the provenance.
    """
    positive = [p for p in positive if p.strip()]
    negative = [n for n in negative if n.strip()]
    if not positive or not negative:
        raise ValueError("give at least one non-empty positive and one non-empty negative prompt")
    diff = _last_token_residuals(lm, positive, point).mean(0) - _last_token_residuals(lm, negative, point).mean(0)
    if not diff.norm() > 0:
        raise ValueError("the positive and negative prompts give identical activations; make them differ")
    provenance = {
        "source": "contrastive",
        "method": "mean difference, last token",
        "positive": list(positive),
        "negative": list(negative),
        "raw_norm": float(diff.norm()),
    }
    return SteeringVector({point: diff}, provenance)
