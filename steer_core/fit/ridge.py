"""The closed-form fit of A: ridge regression of the per-token target on each writer's input.

The adapter adds (A·x) B to a writer's output. Pre-norm writers: with B = v that is the steering when A·x = 1 for
every token. Post-norm writers (Gemma 2/3): with B = share ⊘ g it is the norm's output + share (shrunk by one scalar
per token) when A·x = rms(W x) (docs/math.md). No adapter is exact there.

One pass over the calibration text, with all the steering applied by hooks, accumulates sufficient statistics
(XᵀX, Xᵀy) batch by batch, so memory does not grow with calibration tokens; the penalty is chosen by two-fold
validation on those same statistics. The statistics do not depend on the vector, so the next vector at the same site
reuses them.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from steer_core import corpus
from steer_core.activations import forward_until, recording
from steer_core.fit.postnorm import norm_eps, rms_target
from steer_core.sites import Kind, architecture_for, weight_of
from steer_core.steer import steering
from steer_core.vectors.vector import SteeringVector

RIDGE_GRID = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class Stats:
    """XᵀX, Xᵀy, yᵀy for two folds, in float64."""

    def __init__(self, d: int, device: torch.device) -> None:
        self.xtx = torch.zeros(2, d, d, dtype=torch.float64, device=device)
        self.xty = torch.zeros(2, d, dtype=torch.float64, device=device)
        self.yty = torch.zeros(2, dtype=torch.float64, device=device)
        self.n = [0, 0]
        self.sq = 0.0  # sum of x² over rows, unweighted: sets the penalty's scale, which a heavy row must not move

    def add(self, fold: int, x: Tensor, y: Tensor) -> None:
        x, y = x.double(), y.double()
        self.sq += float(x.pow(2).sum())
        self.xtx[fold] += x.T @ x
        self.xty[fold] += x.T @ y
        self.yty[fold] += y @ y
        self.n[fold] += len(y)

    def changed(self, added: Stats, removed: Stats | None) -> Stats:
        """These statistics with `added`'s rows and without `removed`'s (rows these hold)."""
        out = self.plus(added, 1.0)
        if removed is not None:
            out.xtx, out.xty, out.yty = out.xtx - removed.xtx, out.xty - removed.xty, out.yty - removed.yty
            out.n = [a - b for a, b in zip(out.n, removed.n, strict=True)]
            out.sq -= removed.sq
        return out

    def plus(self, other: Stats, weight: float) -> Stats:
        """These statistics with `other`'s rows counted `weight` times each (the penalty's scale ignores weights)."""
        out = Stats(self.xtx.shape[-1], self.xtx.device)
        out.xtx, out.xty = self.xtx + weight * other.xtx, self.xty + weight * other.xty
        out.yty = self.yty + weight * other.yty
        out.n = [a + b for a, b in zip(self.n, other.n, strict=True)]
        out.sq = self.sq + other.sq
        return out


def writer_target(model: nn.Module, module: str, layer: int, kind: Kind, xs: Tensor, steered: Tensor) -> Tensor:
    """What A·x should be for each token of the writer input `xs`: 1 on pre-norm models, rms(Wx) on post-norm
    ones, times `steered` (0 where the hook leaves the leading BOS alone, so the adapter should add nothing)."""
    arch = architecture_for(model)
    if arch.post_norm:
        weight = weight_of(model.get_submodule(module)).float()
        y = rms_target(xs @ weight.T.to(xs.device), norm_eps(model, arch, layer, kind))
    else:
        y = torch.ones(len(xs), device=xs.device)
    return y * steered


def steered_positions(input_ids: Tensor, skip_bos: bool, bos_token_id: int | None) -> Tensor:
    """Float[Tensor, "batch seq"]: 1 where the hook adds the vector, 0 at a leading BOS that skip_bos leaves alone."""
    steered = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if skip_bos and bos_token_id is not None:
        steered[:, 0] = (input_ids[:, 0] != bos_token_id).float()
    return steered


# The writers' input statistics, remembered per model for the last few sites. A single site's writers read nothing
# its own steering changes (the hooks act on their outputs or later), so these depend only on the weights (never
# changed in place here), the shipped text and the settings in the key, not on the vector: the next vector at that
# site (another feature, another strength) skips the pass over the calibration text, 23 of a SmolLM2 L15 export's
# ~50 s. 75 MB a site on SmolLM2 (two 1536² float64 folds, position 0 and the rest), 170 MB on Gemma-3-270M; a site
# of a model with d_in = 14336 (Llama-3-8B's down_proj) would hold 6.6 GB, so nothing over STATISTICS_MAX_BYTES in
# all is kept, on the model's device.
STATISTICS_KEPT = 6  # three sites, each with its writer and the next block's attention writer (composite)
STATISTICS_MAX_BYTES = 2**30
_StatsKey = tuple[frozenset[str], frozenset[str], int, int, bool, torch.dtype]
_StatsValue = tuple[dict[str, "tuple[Stats, Stats]"], dict[str, list[Tensor]], int]
_STATISTICS: weakref.WeakKeyDictionary[nn.Module, OrderedDict[_StatsKey, _StatsValue]] = weakref.WeakKeyDictionary()
_STATISTICS_LOCK = threading.Lock()


def _nbytes(value: _StatsValue) -> int:
    stats, sampled, _seen = value
    held = [t for pair in stats.values() for st in pair for t in (st.xtx, st.xty, st.yty)]
    held += [t for rows in sampled.values() for t in rows]
    return sum(t.numel() * t.element_size() for t in held)


def _remembered(model: nn.Module, key: _StatsKey) -> _StatsValue | None:
    with _STATISTICS_LOCK:
        known = _STATISTICS.get(model)
        if known is None or key not in known:
            return None
        known.move_to_end(key)
        return known[key]


def _remember(model: nn.Module, key: _StatsKey, value: _StatsValue) -> None:
    if _nbytes(value) > STATISTICS_MAX_BYTES:
        return
    with _STATISTICS_LOCK:
        known = _STATISTICS.setdefault(model, OrderedDict())
        known[key] = value
        known.move_to_end(key)
        while len(known) > STATISTICS_KEPT or sum(_nbytes(v) for v in known.values()) > STATISTICS_MAX_BYTES:
            known.popitem(last=False)


def forget_statistics(model: nn.Module) -> None:
    """Drop the statistics kept for `model`, so that the next calibration makes a full pass (to time one)."""
    with _STATISTICS_LOCK:
        _STATISTICS.pop(model, None)


@dataclass(frozen=True)
class WriterStatistics:
    """What the pass over the calibration text leaves for the fits."""

    # Per writer: the statistics of every position after the first, and of position 0 (position0 weighs them).
    stats: dict[str, tuple[Stats, Stats]]
    sampled: dict[str, list[Tensor]]  # input rows of the writers asked for (post-norm shares), on the CPU
    tokens: int
    reused: bool  # kept from an earlier calibration at this site
    reused_tokens: int = 0  # of `tokens`, those whose statistics were kept (all if reused; a map's, grown)


def gather(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    writers: dict[str, tuple[int, Kind]],
    *,
    sample: list[str],
    sample_tokens: int,
    tokens: int,
    max_doc_tokens: int,
    skip_bos: bool,
    progress: Callable[[float, str], None] | None = None,
) -> WriterStatistics:
    """The statistics of each writer (module name -> (layer, kind)) on `tokens` held-in tokens, with the steering
    applied by hooks, so each writer sees the inputs it will see once the earlier sites are steered; and up to
    `sample_tokens` input rows of each writer in `sample`."""
    reusable = len(vector.points) == 1  # several sites: a later site's writers read the earlier sites' steering
    key = _key(model, writers, sample, tokens, max_doc_tokens, skip_bos)
    known = _remembered(model, key) if reusable else None
    reused = 0
    if known is not None:
        stats, sampled, seen = known
        reused = seen
        if progress:
            progress(1.0, f"calibrating: {seen} tokens' statistics kept from an earlier calibration at this site")
    elif reusable and not sample and (smaller := _smaller(model, key)) is not None:
        stats, seen, reused = _grown(model, tokenizer, vector, writers, smaller, key, skip_bos, progress)
        sampled = {}
    else:
        batches = corpus.batches(tokenizer, "calibration", tokens, max_doc_tokens=max_doc_tokens, by_length=True)
        stats, sampled, seen = _pass(model, vector, writers, batches, sample, sample_tokens, tokens, skip_bos, progress)
    if set(stats) != set(writers):
        raise ValueError("no calibration tokens reached the writers; check the tokenizer and corpus")
    if reusable and known is None:
        _remember(model, key, (stats, sampled, seen))
    return WriterStatistics(stats, sampled, seen, known is not None, reused)


def _key(
    model: nn.Module, writers: dict[str, tuple[int, Kind]], sample: list[str], tokens: int, max_doc_tokens: int,
    skip_bos: bool,
) -> _StatsKey:  # fmt: skip
    # The dtype too: a model converted in place (model.to(torch.bfloat16)) is the same object with other statistics.
    return frozenset(writers), frozenset(sample), tokens, max_doc_tokens, skip_bos, next(model.parameters()).dtype


def gather_at_sites(
    model: nn.Module,
    tokenizer: Any,
    vectors: list[SteeringVector],
    plans: list[tuple[dict[str, tuple[int, Kind]], list[str]]],
    *,
    sample_tokens: int,
    tokens: int,
    max_doc_tokens: int,
    skip_bos: bool,
) -> None:
    """Keep, for one-site vectors at several sites (a map over layers), the statistics gather() would make for each
    (`plans`: its writers and sampled writers), from one pass over the calibration text instead of one each. Exact:
    a one-site vector's writers read nothing its steering changes, so the pass runs unsteered; each writer's rows
    are the same rows in the same batches. At most STATISTICS_KEPT plans: more would push out the first."""
    if any(len(v.points) != 1 for v in vectors) or len(plans) > STATISTICS_KEPT:
        raise ValueError(f"statistics at several sites are shared for at most {STATISTICS_KEPT} one-site vectors")
    todo = [(w, s) for w, s in plans if _remembered(model, _key(model, w, s, tokens, max_doc_tokens, skip_bos)) is None]
    if not todo:
        return
    union = {name: where for w, _ in todo for name, where in w.items()}
    sample = sorted({name for _, s in todo for name in s})
    batches = corpus.batches(tokenizer, "calibration", tokens, max_doc_tokens=max_doc_tokens, by_length=True)
    stats, sampled, seen = _pass(
        model, vectors[0].scaled(0.0), union, batches, sample, sample_tokens, tokens, skip_bos, None
    )
    for w, s in todo:
        if set(w) <= set(stats):
            value = ({n: stats[n] for n in w}, {n: sampled[n] for n in s}, seen)
            _remember(model, _key(model, w, s, tokens, max_doc_tokens, skip_bos), value)


def _smaller(model: nn.Module, key: _StatsKey) -> tuple[_StatsKey, _StatsValue] | None:
    """The largest statistics kept at this site with the same settings on fewer tokens (a map's, before an export)."""
    with _STATISTICS_LOCK:
        kept = list(_STATISTICS.get(model, {}).items())
    fewer = [(k, v) for k, v in kept if k[2] < key[2] and (k[0], k[1], *k[3:]) == (key[0], key[1], *key[3:])]
    return max(fewer, key=lambda kv: kv[0][2]) if fewer else None


def _grown(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    writers: dict[str, tuple[int, Kind]],
    smaller: tuple[_StatsKey, _StatsValue],
    key: _StatsKey,
    skip_bos: bool,
    progress: Callable[[float, str], None] | None,
) -> tuple[dict[str, tuple[Stats, Stats]], int, int]:
    """The statistics on key's tokens from those kept on fewer: a pass over the documents the larger budget adds
    only (statistics are sums over tokens, so they add), or a full pass where the smaller text is not a prefix."""
    (_w, _s, have, max_doc_tokens, *_), (kept, _sampled, seen) = smaller
    plan = corpus.growth(tokenizer, "calibration", have, key[2], max_doc_tokens=max_doc_tokens)
    if plan is None:
        batches = corpus.batches(tokenizer, "calibration", key[2], max_doc_tokens=max_doc_tokens, by_length=True)
        stats, _, total = _pass(model, vector, writers, batches, [], 0, key[2], skip_bos, progress)
        return stats, total, 0
    added, removed = plan
    if progress:
        progress(0.0, f"calibrating: {seen} tokens' statistics kept from the map at this site")
    plus, _, more = _pass(model, vector, writers, added, [], 0, key[2] - seen, skip_bos, progress)
    minus, _, less = _pass(model, vector, writers, removed, [], 0, 1, skip_bos, None) if removed else ({}, {}, 0)
    stats = {
        name: (body.changed(plus[name][0], minus[name][0] if name in minus else None),
               head.changed(plus[name][1], minus[name][1] if name in minus else None))
        for name, (body, head) in kept.items()
    }  # fmt: skip
    return stats, seen + more - less, seen - less


def _pass(
    model: nn.Module,
    vector: SteeringVector,
    writers: dict[str, tuple[int, Kind]],
    batches: Iterable[corpus.Batch],
    sample: list[str],
    sample_tokens: int,
    tokens: int,
    skip_bos: bool,
    progress: Callable[[float, str], None] | None,
) -> tuple[dict[str, tuple[Stats, Stats]], dict[str, list[Tensor]], int]:
    """One pass over `batches` with the steering on: each writer's statistics, the sampled input rows, tokens seen."""
    device = next(model.parameters()).device
    stats: dict[str, tuple[Stats, Stats]] = {}
    sampled: dict[str, list[Tensor]] = {name: [] for name in sample}
    state: dict[str, Tensor] = {}
    bos_id = getattr(model.config, "bos_token_id", None)

    def on(name: str, x: Tensor) -> None:
        layer, kind = writers[name]
        keep = state["mask"].to(x.device)
        xs = x[keep].float()
        y = writer_target(model, name, layer, kind, xs, state["steered"].to(x.device)[keep])
        if name not in stats:
            stats[name] = (Stats(xs.shape[-1], xs.device), Stats(xs.shape[-1], xs.device))
        fold = state["fold"].to(x.device)[keep]
        first = state["first"].to(x.device)[keep]
        for part, rows in zip(stats[name], (~first, first), strict=True):
            for f in (0, 1):
                part.add(f, xs[rows & (fold == f)], y[rows & (fold == f)])
        if name in sampled and sum(len(t) for t in sampled[name]) < sample_tokens:
            sampled[name].append(xs.cpu())

    last = max(layer for layer, _ in writers.values())
    seen = 0
    with steering(model, vector, skip_bos=skip_bos), recording(model, list(writers), on, what="input"):
        for batch in batches:
            mask = batch.attention_mask.bool()
            state["mask"] = mask.to(device)
            state["steered"] = steered_positions(batch.input_ids, skip_bos, bos_id).to(device)
            state["fold"] = (batch.doc_index % 2).unsqueeze(1).expand_as(mask).to(device)
            first = torch.zeros_like(mask)
            first[:, 0] = True
            state["first"] = first.to(device)
            forward_until(
                model, last, input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
            )
            seen += int(mask.sum())
            if progress:
                progress(min(seen / tokens, 1.0), f"calibrating: {seen}/{tokens} tokens")
    return stats, sampled, seen


def _ridge_path(xtx: Tensor, xty: Tensor, lambdas: list[float]) -> list[Tensor]:
    if len(lambdas) == 1:  # one solve is far cheaper than the eigendecomposition a path shares
        eye = torch.eye(len(xty), dtype=xtx.dtype, device=xtx.device)
        return [torch.linalg.solve(xtx + lambdas[0] * eye, xty)]
    s, vecs = torch.linalg.eigh(xtx)
    proj = vecs.T @ xty
    return [vecs @ (proj / (s + lam)) for lam in lambdas]


def _sse(stats: Stats, fold: int, u: Tensor) -> float:
    return float(stats.yty[fold] - 2 * u @ stats.xty[fold] + u @ stats.xtx[fold] @ u)


def fit_ridge(stats: Stats, grid: tuple[float, ...] = RIDGE_GRID) -> tuple[Tensor, float, float]:
    """(u, chosen relative penalty, validation RMSE / RMS target) from two-fold statistics, the penalty chosen from
    `grid` (relative to the mean squared input) by two-fold validation."""
    if min(stats.n) == 0:
        raise ValueError("calibration produced too few tokens to validate the fit; raise --calibration-tokens")
    total_xtx, total_xty = stats.xtx.sum(0), stats.xty.sum(0)
    scale = stats.sq / total_xtx.shape[0] / sum(stats.n)
    lambdas = [r * scale for r in grid]
    val = torch.zeros(len(lambdas), dtype=torch.float64)
    for fold in (0, 1):
        other = 1 - fold
        # Penalties scale with token count so one relative value means the same for a fold and for the whole.
        for i, u in enumerate(_ridge_path(stats.xtx[fold], stats.xty[fold], [lam * stats.n[fold] for lam in lambdas])):
            val[i] += _sse(stats, other, u)
    best = int(torch.argmin(val))
    u = _ridge_path(total_xtx, total_xty, [lambdas[best] * sum(stats.n)])[0]
    rel = math.sqrt(max(float(val[best]), 0.0) / max(float(stats.yty.sum()), 1e-30))
    return u, grid[best], rel
