"""The strength dial a LoRA engine offers: which engine scales an adapter serves faithfully, measured.

llama-server takes a scale per request (`"lora": [{"id": 0, "scale": s}]`), and every LoRA engine computes
s·(alpha/r)·B(A·x). For a rank-1 adapter that stands for a steering vector, that is the hook at s times the exported
strength plus s times the fit's error B·(A·x − c). The error grows with the effect, so the same relative error moves
more next tokens at 2× than at 0.5×. And a writer that reads what the vector already changed (the next block's
attention writer, a later site of a multi-site vector) sees its input move with s, while A was fitted at 1. So each
scale is measured, as verify measures scale 1: the adapter with PEFT's scaling multiplied by s against the hook with
the vector times s, on held-out text no fit saw (top-1 agreement, KL ratio, the behaviour figure), and greedy
continuations.

The range recorded is the run of checked scales nearest 1 that reaches SERVABLE_TOP1, the servability map's bar.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from steer_core.activations import forward_from, recording_block_calls
from steer_core.adapter.folder import read_folder
from steer_core.check.verify import (
    FidelityReport,
    _first_changed_block,
    _greedy_agreement,
    _peft_of,
    _Totals,
    heldout_batches,
    reference,
)
from steer_core.constants import DEFAULT_GREEDY_TOKENS, ENGINE_SCALES, SERVABLE_TOP1

SCALE_TOKENS = 1024  # held-out tokens per scale: a quarter of verify's, since scale 1 has verify's own report
SCALE_GREEDY_PROMPTS = 4  # one per input format
MAX_SCALES = 8


def check_scales_arg(scales: Sequence[float]) -> tuple[float, ...]:
    """The scales to check, sorted, or an error naming the bad one. Scale 1 is always among them (verify's own)."""
    out = set()
    for s in scales:
        s = float(s)
        if not (math.isfinite(s) and 0 < s <= 8):
            raise ValueError(f"an engine scale to check must be above 0 and at most 8, got {s!r}")
        out.add(s)
    if len(out | {1.0}) > MAX_SCALES:
        raise ValueError(f"check at most {MAX_SCALES} engine scales, got {len(out | {1.0})}")
    return tuple(sorted(out | {1.0}))


@dataclass(frozen=True)
class ScaleReport:
    """Fidelity per engine scale. `by_scale` maps f"{s:g}" to top-1 agreement, KL ratio, effect kept, greedy tokens
    before divergence and the tokens measured; `servable` is the (lowest, highest) scale of `servable_run`."""

    checked: tuple[float, ...]
    by_scale: dict[str, dict[str, float]]
    servable: tuple[float, float] | None
    greedy_tokens: int
    criterion: str = field(default=f"top-1 agreement >= {SERVABLE_TOP1:.0%}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": list(self.checked),
            "servable": list(self.servable) if self.servable else None,
            "criterion": self.criterion,
            "greedy_tokens": self.greedy_tokens,
            "by_scale": self.by_scale,
        }


def servable_run(top1: dict[float, float], bar: float = SERVABLE_TOP1) -> tuple[float, float] | None:
    """The run of checked scales (contiguous, sorted) whose top-1 reaches `bar` and which holds the passing scale
    nearest 1 (the lower one on a tie): the exported strength's own when it passes, else the nearest strengths that
    do (a strength at 94% serves at 0.25-0.5, typically). None when no scale reaches it."""
    scales = sorted(top1)
    passing = [s for s in scales if top1[s] >= bar]
    if not passing:
        return None
    nearest = min(passing, key=lambda s: (abs(math.log(s)), s))
    i = j = scales.index(nearest)
    while i > 0 and top1[scales[i - 1]] >= bar:
        i -= 1
    while j < len(scales) - 1 and top1[scales[j + 1]] >= bar:
        j += 1
    return scales[i], scales[j]


@contextmanager
def engine_scale(adapted: nn.Module, scale: float) -> Iterator[None]:
    """PEFT's scaling times `scale` on every LoRA layer in this context, as a LoRA engine's per-request scale;
    restored exactly after (the saved values, not a division)."""
    layers = [m for m in adapted.modules() if isinstance(m, LoraLayer)]
    saved = [dict(m.scaling) for m in layers]
    try:
        for m in layers:
            m.scale_layer(scale)
        yield
    finally:
        for m, scaling in zip(layers, saved, strict=True):
            m.scaling.clear()
            m.scaling.update(scaling)


def check_scales(
    model: nn.Module,
    tokenizer: Any,
    folder: str | Path,
    at_one: FidelityReport,
    *,
    scales: Sequence[float] = ENGINE_SCALES,
    tokens: int = SCALE_TOKENS,
    greedy_prompts: int = SCALE_GREEDY_PROMPTS,
    greedy_tokens: int = DEFAULT_GREEDY_TOKENS,
    peft_model: nn.Module | None = None,
    base_model: str | None = None,
) -> ScaleReport:
    """Measure the adapter at `folder` at each engine scale against the hook at that multiple of its strength.
    `at_one` is verify's report for scale 1 (measured on more text; not measured again)."""
    checked = check_scales_arg(scales)
    files = read_folder(folder, ours=True).checked(base_model)
    record, vector = files.steering()
    if record.mode == "ablate":
        raise ValueError("an ablation removes a direction whole; it has no strength to scale")
    adapted = peft_model if peft_model is not None else _peft_of(model, files)
    others = [s for s in checked if s != 1.0]
    totals = {s: _Totals() for s in others}
    first = _first_changed_block(vector, record, files.tensors) if isinstance(adapted, PeftModel) else None
    inner = cast(PeftModel, adapted).get_base_model() if first is not None else adapted
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in heldout_batches(model, tokenizer, tokens):
            ids, mask, keep = batch.input_ids.to(device), batch.attention_mask.to(device), batch.measured.to(device)
            if not keep.any():
                continue
            if first is None:
                base_logits = model(input_ids=ids, attention_mask=mask).logits[keep]
            else:
                with recording_block_calls(model, first) as calls:
                    base_logits = model(input_ids=ids, attention_mask=mask).logits[keep]
            base = F.log_softmax(base_logits.float(), -1)
            for s in others:
                with reference(model, vector.scaled(s), record):
                    hook = (model(input_ids=ids, attention_mask=mask).logits[keep] if first is None
                            else forward_from(model, first, calls, keep))  # fmt: skip
                with engine_scale(adapted, s):
                    adapt = (adapted(input_ids=ids, attention_mask=mask).logits[keep] if first is None
                             else forward_from(inner, first, calls, keep))  # fmt: skip
                totals[s].add(batch, keep, base, F.log_softmax(hook.float(), -1), F.log_softmax(adapt.float(), -1))
        by_scale: dict[str, dict[str, float]] = {}
        for s in checked:
            if s == 1.0:
                by_scale["1"] = {
                    "top1_agreement": at_one.top1_agreement,
                    "kl_ratio": at_one.kl_ratio,
                    "effect_kept": at_one.effect_kept,
                    "greedy_prefix_mean": at_one.greedy_prefix_mean,
                    "tokens": at_one.tokens,
                }
                continue
            t = totals[s]
            if t.n == 0:
                raise ValueError(f"{tokens} held-out tokens held no answer tokens to measure the scales on")
            with engine_scale(adapted, s):
                greedy = _greedy_agreement(model, adapted, tokenizer, vector.scaled(s), record, greedy_prompts,
                                           greedy_tokens)  # fmt: skip
            prefixes = [p for _fmt, p in greedy]
            by_scale[f"{s:g}"] = {
                "top1_agreement": t.agree / t.n,
                "kl_ratio": t.kl_ha / t.kl_hb if t.kl_hb > 0 else float("nan"),
                "effect_kept": t.effect.kept()[0],
                "greedy_prefix_mean": sum(prefixes) / len(prefixes) if prefixes else float("nan"),
                "tokens": t.n,
            }
    top1 = {s: by_scale[f"{s:g}"]["top1_agreement"] for s in checked}
    return ScaleReport(checked, by_scale, servable_run(top1), greedy_tokens)
