"""Contrastive (CAA / mean-difference, or PCA of differences as repeng does) steering vectors from prompts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from steer_core.activations import forward_until, recording, site_module_name
from steer_core.model import LoadedModel
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector

Method = Literal["mean", "pca"]
Position = Literal["last", "mean"]


def residuals(lm: LoadedModel, prompts: Sequence[str], point: HookPoint, position: Position = "last") -> Tensor:
    """Float[Tensor, "n d_model"]: the residual at `point` on each prompt's last token, or averaged over its tokens.

    Prompts are used as given (no chat template), so what is compared is exactly what was typed.
    """
    name = site_module_name(lm.model, point, "resid")
    rows: list[Tensor] = []

    def on(_name: str, out: Tensor) -> None:
        rows.append((out[0, -1] if position == "last" else out[0].mean(0)).float().cpu())

    with recording(lm.model, [name], on, what="output"):
        for prompt in prompts:
            ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
            forward_until(lm.model, point.writer()[0], input_ids=ids)
    return torch.stack(rows)


def contrastive_vector(
    lm: LoadedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    point: HookPoint,
    *,
    method: Method = "mean",
    position: Position = "last",
) -> SteeringVector:
    """mean: mean(resid | positive) − mean(resid | negative). pca: the first principal component of the pairwise
    differences (positive[i] − negative[i]), signed to agree with the mean difference and given its norm, so both
    methods share one strength scale. Deterministic; scale the result with SteeringVector.scaled()."""
    positive = [p for p in positive if p.strip()]
    negative = [n for n in negative if n.strip()]
    if not positive or not negative:
        raise ValueError("give at least one non-empty positive and one non-empty negative prompt")
    if method not in ("mean", "pca"):
        raise ValueError(f"method {method!r} is not one of mean, pca")
    if method == "pca" and len(positive) != len(negative):
        raise ValueError(f"pca needs pairs: {len(positive)} positive but {len(negative)} negative prompts")
    pos, neg = residuals(lm, positive, point, position), residuals(lm, negative, point, position)
    diff = pos.mean(0) - neg.mean(0)
    if not diff.norm() > 0:
        raise ValueError("the positive and negative prompts give identical activations; make them differ")
    if method == "pca":
        pairs = pos - neg
        if len(pairs) < 2:
            raise ValueError("pca needs at least two pairs; use method 'mean' for one")
        centered = pairs - pairs.mean(0)
        _, _, vh = torch.linalg.svd(centered.double(), full_matrices=False)
        pc = vh[0].float()
        pc = pc if float(pc @ diff) >= 0 else -pc
        diff = pc * diff.norm()
    provenance = {
        "source": "contrastive",
        "method": f"{method} of differences, {position} token" + ("s" if position == "mean" else ""),
        "positive": list(positive),
        "negative": list(negative),
        "raw_norm": float(diff.norm()),
    }
    return SteeringVector({point: diff}, provenance)


def read_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """Prompts from JSON: {"positive": [...], "negative": [...]} or [{"positive": "...", "negative": "..."}, ...]."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"contrastive prompt file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{p.name} is not valid JSON: {err}") from err
    if isinstance(data, dict) and {"positive", "negative"} <= data.keys():
        return [str(s) for s in data["positive"]], [str(s) for s in data["negative"]]
    if isinstance(data, list) and all(isinstance(d, dict) and {"positive", "negative"} <= d.keys() for d in data):
        return [str(d["positive"]) for d in data], [str(d["negative"]) for d in data]
    raise ValueError(
        f"{p.name}: expected {{'positive': [...], 'negative': [...]}} or a list of {{'positive', 'negative'}} pairs"
    )
