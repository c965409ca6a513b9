"""Before an export: which layers and strengths a rank-1 LoRA serves faithfully, measured small and fast.

A portable adapter's fidelity depends mostly on where it steers (the benchmark ranges from 63% to 100% top-1 by
layer) and how hard. Each cell of the map is a miniature export: a calibration on `calibration_tokens` of the
calibration text and a measurement of the resulting rank-1 update against the hook on `eval_tokens` of held-out
text (answer positions, every format, as `verify` measures), with the update applied by hooks instead of written and
reloaded through PEFT (the same numbers: tests hold the two paths to each other). It predicts the full export's
top-1; `scripts/map_check.py` measures how well.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from steer_core.check.verify import heldout_batches
from steer_core.constants import MAP_CALIBRATION_TOKENS, MAP_EVAL_TOKENS, SERVABLE_TOP1, SITES
from steer_core.divergence import kl_per_token
from steer_core.fit.calibrate import calibrate
from steer_core.model import LoadedModel
from steer_core.sites import num_layers
from steer_core.steer import lowrank_updates, steering
from steer_core.vectors.recipe import VectorRecipe
from steer_core.vectors.vector import SteeringVector

NEAR = 0.02  # a prediction this close to SERVABLE_TOP1 could fall on either side of it
STRENGTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # an SAE feature's map: these multiples of the chosen strength
# What steering at a site means, for a map that compares sites (docs/fidelity.md, "The attention writer").
SITE_MEANING = {
    "attn_out": "there the vector is added between block L's attention and its MLP (which then reads it), and "
    "the attention writer o_proj, whose input is nearly constant, adds it exactly where the hook does.",
    "resid_post": "there the vector is added after block L's MLP, by the MLP writer down_proj.",
    "resid_pre": "there the vector is added before block L, by block L-1's MLP writer.",
    "mlp_out": "there the vector is added to block L's MLP output, by the MLP writer down_proj.",
}


class HeldOut:
    """Hook-steered and base next-token distributions on verify's held-out text, computed once per vector."""

    def __init__(self, lm: LoadedModel, vector: SteeringVector, tokens: int, skip_bos: bool = False) -> None:
        self.model = lm.model
        held = list(heldout_batches(lm.model, lm.tokenizer, tokens))
        self.batches = [(b.input_ids.to(lm.device), b.attention_mask.to(lm.device)) for b in held]
        self.measured = [b.measured.to(lm.device) for b in held]  # where verify measures
        self.hook: list[torch.Tensor] = []
        kl_base = 0.0
        self.n = 0
        with torch.no_grad():
            for (ids, mask), keep in zip(self.batches, self.measured, strict=True):
                base = F.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits[keep].float(), -1)
                with steering(self.model, vector, skip_bos=skip_bos):
                    hook = F.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits[keep].float(), -1)
                kl_base += float(kl_per_token(hook, base).sum())
                self.hook.append(hook)
                self.n += len(hook)
        if self.n == 0:
            raise ValueError(f"{tokens} held-out tokens held no answer tokens to measure on; give more")
        self.kl_base = kl_base / self.n

    def measure(self, params: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Top-1 agreement and KL ratio of the low-rank updates `params` against the hook."""
        return self.under(lambda: lowrank_updates(self.model, params))

    def under(self, intervention: Callable[[], AbstractContextManager[None]]) -> dict[str, float]:
        """Top-1 agreement and KL ratio against the hook, each batch run inside a fresh `intervention()`."""
        agree, kl = 0, 0.0
        with torch.no_grad():
            for (ids, mask), keep, hook in zip(self.batches, self.measured, self.hook, strict=True):
                with intervention():
                    logits = self.model(input_ids=ids, attention_mask=mask).logits[keep].float()
                pred = F.log_softmax(logits, -1)
                kl += float(kl_per_token(hook, pred).sum())
                agree += int((hook.argmax(-1) == pred.argmax(-1)).sum())
        return {"top1": agree / self.n, "kl_ratio": kl / self.n / self.kl_base, "kl_hook_base": self.kl_base}


@dataclass(frozen=True)
class MapCell:
    layer: int
    strength: float
    top1: float  # predicted top-1 agreement of the exported adapter with the hook
    kl_ratio: float
    tokens: int  # held-out answer tokens measured
    site: str = "resid_post"

    @property
    def servable(self) -> bool:
        return self.top1 >= SERVABLE_TOP1


@dataclass(frozen=True)
class ServabilityMap:
    cells: list[MapCell]
    chosen: tuple[int, float]  # the (layer, strength) the user picked
    varies: str  # "layer" or "strength"
    unit: str
    seconds: float
    calibration_tokens: int = MAP_CALIBRATION_TOKENS
    eval_tokens: int = MAP_EVAL_TOKENS
    notes: list[str] = field(default_factory=list)
    site: str = "resid_post"  # the chosen cell's site

    def recommendation(self) -> str:
        """What to export: the chosen cell if servable, else the nearest servable layer or strongest servable
        strength; and llama.cpp's exact alternative."""
        chosen = next(c for c in self.cells if (c.layer, c.strength, c.site) == (*self.chosen, self.site))
        unit = "" if self.unit == "abs" else f" × {self.unit} norm"
        sites = {c.site for c in self.cells}
        at = f" ({chosen.site})" if len(sites) > 1 else ""
        lines = [
            f"Layer {chosen.layer}{at} at {chosen.strength:g}{unit}: predicted top-1 {chosen.top1:.1%} — "
            + ("servable." if chosen.servable else f"below {SERVABLE_TOP1:.0%}.")
            + (" Near the line (the map is within ~3 points): the export's own report decides."
               if abs(chosen.top1 - SERVABLE_TOP1) < NEAR else "")
        ]  # fmt: skip
        others = [c for c in self.cells if c.site != chosen.site and c.servable and c.layer == chosen.layer]
        servable = [c for c in self.cells if c.servable and c.site == chosen.site]
        if not chosen.servable and others:
            best = max(others, key=lambda c: c.top1)
            lines.append(
                f"At {best.site} {best.layer}, the same vector is predicted {best.top1:.1%}: {SITE_MEANING[best.site]}"
            )
        if not chosen.servable:
            if not servable:
                lines.append(
                    f"No {self.varies} on this map reaches {SERVABLE_TOP1:.0%}; export in exact mode (a LoRA bias: "
                    "PEFT, not vLLM) or refine the portable adapter (more refinement steps)."
                )
            elif self.varies == "layer":
                best = min(servable, key=lambda c: (abs(c.layer - chosen.layer), -c.top1))
                lines.append(f"Nearest servable layer: {best.layer} (predicted {best.top1:.1%}).")
            else:
                weaker = [c for c in servable if abs(c.strength) <= abs(chosen.strength)]
                if weaker:
                    best = max(weaker, key=lambda c: abs(c.strength))
                    lines.append(f"Strongest servable strength: {best.strength:g}{unit} (predicted {best.top1:.1%}).")
        elif self.varies == "strength":
            stronger = [c for c in servable if abs(c.strength) > abs(chosen.strength)]
            if stronger:
                best = max(stronger, key=lambda c: abs(c.strength))
                lines.append(f"Servable up to {best.strength:g}{unit} (predicted {best.top1:.1%}).")
        lines.append("On llama.cpp, a control vector (GGUF) applies the same steering exactly, at any layer and "
                     "strength: Export → More, or `python -m steer_core control-vector`.")  # fmt: skip
        return " ".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "servable_top1": SERVABLE_TOP1,
            "cells": [{**dataclasses.asdict(c), "servable": c.servable} for c in self.cells],
            "recommendation": self.recommendation(),
        }


def map_cells(
    recipe: VectorRecipe, lm: LoadedModel, layers: Sequence[int] | None = None, sites: Sequence[str] | None = None
) -> list[VectorRecipe]:
    """The recipes of a map: file and contrastive vectors move over layers (the chosen one included) and, if asked,
    over `sites` (the chosen one included); SAE features and control vectors (whose sites are fixed) over multiples
    of the chosen strength."""
    if recipe.layer is not None:
        n = num_layers(lm.model)
        chosen = recipe.layer
        picked = sorted({*(layers if layers is not None else range(0, n, max(1, n // 8))), chosen})
        bad = [layer for layer in picked if not 0 <= layer < n]
        if bad:
            raise ValueError(f"layers {bad} are out of range: this model has layers 0..{n - 1}")
        wrong = [s for s in sites or () if s not in SITES]
        if wrong:
            raise ValueError(f"sites {wrong} are not steering sites; choose from {', '.join(SITES)}")
        on = [recipe.site, *(s for s in dict.fromkeys(sites or ()) if s != recipe.site)]
        return [dataclasses.replace(recipe, layer=layer, site=site) for site in on for layer in picked]  # type: ignore[arg-type]
    if sites and set(sites) != {recipe.site}:
        raise ValueError(
            f"an {recipe.source} vector's sites are fixed by its source, so its map moves over strengths; "
            f"sites {list(sites)} apply to file and contrastive vectors"
        )
    return [dataclasses.replace(recipe, strengths=tuple(s * f for s in recipe.strengths)) for f in STRENGTH_FACTORS]


def predict(
    lm: LoadedModel,
    vector: SteeringVector,
    layer: int,
    strength: float,
    calibration_tokens: int = MAP_CALIBRATION_TOKENS,
    eval_tokens: int = MAP_EVAL_TOKENS,
    *,
    skip_bos: bool = False,
    site: str = "resid_post",
) -> MapCell:
    """One cell: calibrate the portable update on a little text, measure it against the hook on held-out text."""
    cal = calibrate(lm.model, lm.tokenizer, vector, tokens=calibration_tokens, skip_bos=skip_bos)
    params = {f.module: (f.A.float().to(lm.device), f.B.float().to(lm.device)) for f in cal.fits}
    held = HeldOut(lm, vector, eval_tokens, skip_bos=skip_bos)
    m = held.measure(params)
    return MapCell(layer, strength, m["top1"], m["kl_ratio"], held.n, site)


def servability_map(
    lm: LoadedModel,
    recipe: VectorRecipe,
    *,
    layers: Sequence[int] | None = None,
    sites: Sequence[str] | None = None,
    calibration_tokens: int = MAP_CALIBRATION_TOKENS,
    eval_tokens: int = MAP_EVAL_TOKENS,
    skip_bos: bool = False,
    progress: Callable[[float, str], None] | None = None,
    build: Callable[[VectorRecipe], SteeringVector] | None = None,
) -> ServabilityMap:
    """Predicted fidelity of the portable export of `recipe` and its neighbours (see `map_cells`). `build` makes each
    cell's vector (a server's shared, bounded workspace: steer_core.ui.workspace); by default `recipe.build(lm)`."""
    start = time.perf_counter()
    recipes = map_cells(recipe, lm, layers, sites)
    cells = []
    for i, r in enumerate(recipes):
        vector = build(r) if build else r.build(lm)
        point = min(vector.points)
        if progress:
            progress(i / len(recipes), f"layer {point.layer} {point.site}, strength {r.strengths[0]:g}")
        strength = r.strengths[0]
        cells.append(
            predict(
                lm, vector, point.layer, strength, calibration_tokens, eval_tokens, skip_bos=skip_bos, site=point.site
            )
        )
    by_layer = recipe.layer is not None
    return ServabilityMap(
        cells,
        (recipe.layer if recipe.layer is not None else cells[0].layer, recipe.strengths[0]),
        "layer" if by_layer else "strength",
        recipe.strength_unit,
        time.perf_counter() - start,
        calibration_tokens,
        eval_tokens,
        site=cells[0].site if not by_layer else recipe.site,
    )
