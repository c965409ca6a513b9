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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from steer_core.activations import BlockCall, recording_block_calls
from steer_core.check.verify import heldout_batches
from steer_core.constants import DEFAULT_MAX_DOC_TOKENS, MAP_CALIBRATION_TOKENS, MAP_EVAL_TOKENS, SERVABLE_TOP1, SITES
from steer_core.divergence import kl_per_token
from steer_core.fit import passes
from steer_core.fit.calibrate import calibrate, statistics_plan
from steer_core.fit.ridge import STATISTICS_KEPT, gather_at_sites
from steer_core.fit.shares import SHARE_SAMPLE_TOKENS
from steer_core.model import LoadedModel
from steer_core.sites import architecture_for, num_layers
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


class Reference:
    """The held-out text as every cell of a map measures on it, computed once: the batches, where verify measures,
    the unsteered next-token distributions there and (without skip_bos, which needs the model's own input ids) each
    batch's block calls from block `first` on, so that a cell's passes rerun only the blocks its steering and adapter
    can change (activations.forward_from). Nothing here depends on the vector."""

    def __init__(self, lm: LoadedModel, tokens: int, *, first: int = 0, skip_bos: bool = False) -> None:
        self.model, self.tokens, self.skip_bos = lm.model, tokens, skip_bos
        self.first = None if skip_bos else first
        held = list(heldout_batches(lm.model, lm.tokenizer, tokens))
        self.batches = [(b.input_ids.to(lm.device), b.attention_mask.to(lm.device)) for b in held]
        self.measured = [b.measured.to(lm.device) for b in held]  # where verify measures
        self.calls: list[list[BlockCall]] = []
        self.base: list[torch.Tensor] = []
        with torch.no_grad():
            for (ids, mask), keep in zip(self.batches, self.measured, strict=True):
                with recording_block_calls(self.model, first) if self.first is not None else nullcontext() as calls:
                    logits = passes.logits_at(self.model, keep, input_ids=ids, attention_mask=mask)
                self.calls.append(calls or [])
                self.base.append(F.log_softmax(logits.float(), -1))
        self.n = sum(len(b) for b in self.base)
        if self.n == 0:
            raise ValueError(f"{tokens} held-out tokens held no answer tokens to measure on; give more")

    def log_probs(self, intervention: Callable[[], AbstractContextManager[Any]], first: int = 0) -> list[torch.Tensor]:
        """Each batch's next-token log-probabilities at the measured positions, run inside a fresh `intervention()`
        that changes nothing before block `first`."""
        out = []
        with torch.no_grad():
            for (ids, mask), keep, calls in zip(self.batches, self.measured, self.calls, strict=True):
                with intervention():
                    if self.first is None or first < self.first:
                        logits = passes.logits_at(self.model, keep, input_ids=ids, attention_mask=mask)
                    else:
                        logits = passes.replayed_logits_at(self.model, first, calls[first - self.first :], keep)
                out.append(F.log_softmax(logits.float(), -1))
        return out


def first_block(model: nn.Module, vector: SteeringVector, modules: Sequence[str] = ()) -> int:
    """The first block that steering `vector` at its sites, or low-rank updates of `modules`, can change."""
    arch = architecture_for(model)
    return min([vector.first_block] + [arch.block_of(m) for m in modules])


class HeldOut:
    """Hook-steered and base next-token distributions on verify's held-out text, computed once per vector; the base
    (and the blocks before the steering) from a Reference that a map's cells share."""

    def __init__(
        self,
        lm: LoadedModel,
        vector: SteeringVector,
        tokens: int,
        skip_bos: bool = False,
        reference: Reference | None = None,
    ) -> None:
        if reference is not None and (reference.tokens, reference.skip_bos) != (tokens, skip_bos):
            raise ValueError(
                f"a reference of {reference.tokens} tokens (skip_bos={reference.skip_bos}) for a measurement of "
                f"{tokens} (skip_bos={skip_bos})"
            )
        self.model, self.vector = lm.model, vector
        self.ref = reference or Reference(lm, tokens, first=vector.first_block, skip_bos=skip_bos)
        self.n = self.ref.n
        self.hook = self.ref.log_probs(lambda: steering(self.model, vector, skip_bos=skip_bos), vector.first_block)
        kl_base = sum(float(kl_per_token(h, b).sum()) for h, b in zip(self.hook, self.ref.base, strict=True))
        self.kl_base = kl_base / self.n

    @property
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(input ids, attention mask) of each held-out batch."""
        return self.ref.batches

    @property
    def measured(self) -> list[torch.Tensor]:
        return self.ref.measured

    def measure(self, params: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Top-1 agreement and KL ratio of the low-rank updates `params` against the hook."""
        first = first_block(self.model, self.vector, list(params))
        return self.under(lambda: lowrank_updates(self.model, params), first)

    def under(self, intervention: Callable[[], AbstractContextManager[Any]], first: int = 0) -> dict[str, float]:
        """Top-1 agreement and KL ratio against the hook, each batch run inside a fresh `intervention()` that changes
        nothing before block `first` (by default it may change anything)."""
        agree, kl = 0, 0.0
        for hook, pred in zip(self.hook, self.ref.log_probs(intervention, first), strict=True):
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
    reference: Reference | None = None,
) -> MapCell:
    """One cell: calibrate the portable update on a little text, measure it against the hook on held-out text
    (`reference`: the held-out text's base pass, shared by a map's cells)."""
    cal = calibrate(lm.model, lm.tokenizer, vector, tokens=calibration_tokens, skip_bos=skip_bos)
    params = {f.module: (f.A.float().to(lm.device), f.B.float().to(lm.device)) for f in cal.fits}
    held = HeldOut(lm, vector, eval_tokens, skip_bos=skip_bos, reference=reference)
    m = held.measure(params)
    return MapCell(layer, strength, m["top1"], m["kl_ratio"], held.n, site)


def _share_statistics(lm: LoadedModel, vectors: list[SteeringVector], tokens: int, skip_bos: bool) -> None:
    """What each cell's calibration will gather, gathered in one pass (ridge.gather_at_sites)."""
    plans = [statistics_plan(lm.model, v) for v in vectors]
    gather_at_sites(
        lm.model,
        lm.tokenizer,
        vectors,
        [(p.gathered, p.sample) for p in plans],
        sample_tokens=SHARE_SAMPLE_TOKENS,
        tokens=tokens,
        max_doc_tokens=DEFAULT_MAX_DOC_TOKENS,
        skip_bos=skip_bos,
    )


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
    if recipe.layer is None:  # one direction at several strengths: built once (an SAE's load and its FVU), scaled
        chosen = build(recipe) if build else recipe.build(lm)
        vectors = [chosen.scaled(f) for f in STRENGTH_FACTORS]
    else:
        vectors = [build(r) if build else r.build(lm) for r in recipes]
    # The held-out text's base pass, and its blocks before the first one any cell steers, are the same for every cell.
    reference = Reference(lm, eval_tokens, first=min(v.first_block for v in vectors), skip_bos=skip_bos)
    # Cells at other sites: their writers' statistics from one pass over the calibration text per STATISTICS_KEPT
    # cells (a strength map's cells share one site, so its statistics are kept after the first cell anyway).
    group = STATISTICS_KEPT if recipe.layer is not None and all(len(v.points) == 1 for v in vectors) else 0
    # Cells at one layer share the blocks before it on the held-in and unseen text, and the unsteered pass of the
    # next writer's mean response (passes.shared_across_cells): their results are those of each cell alone.
    cells = []
    with passes.shared_across_cells():
        for i, (r, vector) in enumerate(zip(recipes, vectors, strict=True)):
            point = min(vector.points)
            if group and i % group == 0:
                if progress:
                    progress(i / len(recipes), f"calibration statistics of {len(vectors[i : i + group])} sites at once")
                _share_statistics(lm, vectors[i : i + group], calibration_tokens, skip_bos)
            if progress:
                progress(i / len(recipes), f"layer {point.layer} {point.site}, strength {r.strengths[0]:g}")
            cells.append(
                predict(lm, vector, point.layer, r.strengths[0], calibration_tokens, eval_tokens, skip_bos=skip_bos,
                        site=point.site, reference=reference)
            )  # fmt: skip
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
