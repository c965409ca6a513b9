"""Fit the rank-1 adapter's input side A so that A·x reproduces the per-token scalar the steering needs.

Pre-norm writers: the adapter adds (A·x) v, which is the steering when A·x = 1 for every token.
Post-norm writers (Gemma 2/3): the adapter adds (A·x) (v ⊘ g) before the norm N, which gives N's output + v
(shrunk by one scalar per token) when A·x = rms(W x) (math.md). No adapter is exact there.

The fit is ridge regression from sufficient statistics (XᵀX, Xᵀy) accumulated batch by batch, so memory does not grow
with calibration tokens. The penalty is chosen by two-fold validation on those same statistics.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steer_core import corpus
from steer_core.activations import forward_from, forward_until, recording, recording_block_calls
from steer_core.constants import DEFAULT_CALIBRATION_TOKENS, DEFAULT_MAX_DOC_TOKENS
from steer_core.divergence import kl_per_token
from steer_core.sites import Architecture, HookPoint, architecture_for, num_layers
from steer_core.steer import lowrank_updates, steering
from steer_core.vector import SteeringVector

RIDGE_GRID = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Position 0 is an attention sink every later token reads from, so its error costs more than one token's; how much
# more depends on the layer (SmolLM2, 4x: L6 top-1 42% at weight 1, 64% at 100; L12 71% at 1, 62% at 100). Each
# candidate weight is fitted, and a heavier one wins only if it at least halves KL(hook ‖ adapter) on SELECT_TOKENS
# held-in tokens: where the sink matters the gain is 4× (L6), while a 20% held-in gain at L24 was a 2.5× loss
# held out.
FIRST_WEIGHTS = (1.0, 10.0, 100.0)
SELECT_MARGIN = 0.5
SELECT_TOKENS = 384  # 6 texts of 64 tokens: the candidates' KL differ 3-8×; this costs ~3 s at SmolLM2 L15
# Post-norm writers' shares of v are fitted on this many sampled tokens per writer, with at most this many L-BFGS
# iterations. Gemma-3-270M L9: the loss on 2,048 tokens is 195 fitted on 512 and 183 fitted on 2,048, flat after
# ~100 iterations (from 30,180 at the split).
SHARE_SAMPLE_TOKENS = 1024
SHARE_STEPS = 200
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class WriterFit:
    """One writer module's rank-1 update: the adapter adds (A·x) B to the writer's output."""

    point: HookPoint
    module: str
    writer: tuple[int, str]  # (layer, "attn" | "mlp") of `module`
    A: Tensor  # Float[Tensor, "d_in"]
    B: Tensor  # Float[Tensor, "d_out"]
    target: str  # "one" (pre-norm) or "rms(Wx)" (post-norm)
    ridge: float  # the chosen penalty, relative to mean(diag(XᵀX))
    tokens: int
    cv_rel_rmse: float  # two-fold validation RMSE of A·x against its target, over the target's RMS
    b_unscaled_norm: float  # |B| before balance(): u·x = (A·x) · |B| / b_unscaled_norm
    refined_steps: int = 0  # end-to-end steps on KL(hook ‖ adapter) after the closed form (refine.py)


@dataclass(frozen=True)
class Calibration:
    fits: list[WriterFit]
    tokens: int
    seconds: float
    skip_bos: bool
    corpus: dict[str, str] = field(default_factory=dict)
    refine: dict[str, float] | None = None
    first_weight: float = 1.0  # how many tokens' worth position 0 counted in the least squares
    selection_kl: dict[float, float] = field(default_factory=dict)  # first weight -> held-in KL(hook ‖ adapter)
    # post-norm: fit_shares' losses per site, held-in KL(hook ‖ adapter) of the split and the fitted B, which was used
    shares: dict[str, Any] = field(default_factory=dict)
    reused_statistics: bool = False  # the writers' input statistics came from an earlier calibration at this site


class _Stats:
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

    def plus(self, other: _Stats, weight: float) -> _Stats:
        """These statistics with `other`'s rows counted `weight` times each (the penalty's scale ignores weights)."""
        out = _Stats(self.xtx.shape[-1], self.xtx.device)
        out.xtx, out.xty = self.xtx + weight * other.xtx, self.xty + weight * other.xty
        out.yty = self.yty + weight * other.yty
        out.n = [a + b for a, b in zip(self.n, other.n, strict=True)]
        out.sq = self.sq + other.sq
        return out


# The writers' input statistics, remembered per model for the last few sites. A single site's writers read nothing
# its own steering changes (the hooks act on their outputs or later), so these depend only on the weights (never
# changed in place here), the shipped text and the settings in the key, not on the vector: the next vector at that
# site (another feature, another strength) skips the pass over the calibration text, 23 of a SmolLM2 L15 export's
# ~50 s. 75 MB a site on SmolLM2 (two 1536² float64 folds, position 0 and the rest), 170 MB on Gemma-3-270M; a site
# of a model with d_in = 14336 (Llama-3-8B's down_proj) would hold 6.6 GB, so nothing over STATISTICS_MAX_BYTES in
# all is kept, on the model's device.
STATISTICS_KEPT = 3
STATISTICS_MAX_BYTES = 2**30
_StatsKey = tuple[frozenset[str], frozenset[str], int, int, bool]
_StatsValue = tuple[dict[str, "tuple[_Stats, _Stats]"], dict[str, list[Tensor]], int]
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


def _ridge_path(xtx: Tensor, xty: Tensor, lambdas: list[float]) -> list[Tensor]:
    if len(lambdas) == 1:  # one solve is far cheaper than the eigendecomposition a path shares
        eye = torch.eye(len(xty), dtype=xtx.dtype, device=xtx.device)
        return [torch.linalg.solve(xtx + lambdas[0] * eye, xty)]
    s, vecs = torch.linalg.eigh(xtx)
    proj = vecs.T @ xty
    return [vecs @ (proj / (s + lam)) for lam in lambdas]


def _sse(stats: _Stats, fold: int, u: Tensor) -> float:
    return float(stats.yty[fold] - 2 * u @ stats.xty[fold] + u @ stats.xtx[fold] @ u)


def fit_ridge(stats: _Stats, grid: tuple[float, ...] = RIDGE_GRID) -> tuple[Tensor, float, float]:
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


def _gain(norm: nn.Module) -> Tensor:
    """g = 1 + w of a Gemma-style RMSNorm (its output is z / rms(z) ⊙ g)."""
    return 1.0 + norm.weight.detach().float()


def _norm_gain(model: nn.Module, arch: Architecture, layer: int, kind: str) -> Tensor:
    """The gain of the post-norm after a writer."""
    name = arch.post_norm_name(layer, kind)  # type: ignore[arg-type]
    assert name is not None
    return _gain(model.get_submodule(name))


def _norm_eps(model: nn.Module, arch: Architecture, layer: int, kind: str) -> float:
    name = arch.post_norm_name(layer, kind)  # type: ignore[arg-type]
    assert name is not None
    module = model.get_submodule(name)
    return float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6)))


def rms_target(z: Tensor, eps: float) -> Tensor:
    """rms(z) exactly as Gemma's RMSNorm divides by it."""
    return torch.sqrt(z.float().pow(2).mean(-1) + eps)


def writer_target(model: nn.Module, module: str, layer: int, kind: str, xs: Tensor, steered: Tensor) -> Tensor:
    """What A·x should be for each token of the writer input `xs`: 1 on pre-norm models, rms(Wx) on post-norm
    ones, times `steered` (0 where the hook leaves the leading BOS alone, so the adapter should add nothing)."""
    arch = architecture_for(model)
    if arch.post_norm:
        weight = model.get_submodule(module).weight.float()
        y = rms_target(xs @ weight.T.to(xs.device), _norm_eps(model, arch, layer, kind))
    else:
        y = torch.ones(len(xs), device=xs.device)
    return y * steered


def steered_positions(input_ids: Tensor, skip_bos: bool, bos_token_id: int | None) -> Tensor:
    """Float[Tensor, "batch seq"]: 1 where the hook adds the vector, 0 at a leading BOS that skip_bos leaves alone."""
    steered = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if skip_bos and bos_token_id is not None:
        steered[:, 0] = (input_ids[:, 0] != bos_token_id).float()
    return steered


def split_shares(v: Tensor, g_attn: Tensor, g_mlp: Tensor) -> tuple[Tensor, Tensor]:
    """Split v between a post-norm layer's two writers to keep the norms' shrink small (math.md).

    A writer whose norm has gain g delivers its share s as (N(z) + s) / sqrt(1 + rms(s ⊘ g)²) for s orthogonal to
    N(z): its own output and s both shrink, and a dimension costs least where the gain is large. Minimising
    rms(a ⊘ g_attn)² + rms(m ⊘ g_mlp)² with a + m = v gives a = v g_attn² / (g_attn² + g_mlp²). The attention
    share also reaches the layer's MLP input, where it is small next to the residual stream it joins.
    """
    wa, wm = g_attn.float().pow(2), g_mlp.float().pow(2)
    # A dimension where both gains are 0 (Gemma-3-270M has them) is out of either writer's reach: split it evenly.
    a = torch.where(wa + wm > 0, v.float() * wa / (wa + wm).clamp_min(1e-30), v.float() / 2)
    return a, v.float() - a


def through_gain(share: Tensor, g: Tensor) -> Tensor:
    """B = share ⊘ g: what the writer adds before its norm so the norm's output gains `share`. Where g = 0 the norm
    zeroes whatever the writer adds, so B is 0 there (the report measures what that costs)."""
    return torch.where(g != 0, share / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(share))


def reader_metric(model: nn.Module, arch: Architecture, writer_layer: int) -> Tensor:
    """How much the rest of the model reads each residual dimension written at `writer_layer`: the mean, over every
    later norm that reads the residual stream, of its squared gain (each scaled to mean 1).

    A norm's input dimension i reaches the block as h_i g_i / rms(h), so a change there matters in proportion to
    g_i². On Gemma-3-270M this is the cheap stand-in for the diagonal Fisher information of the residual stream
    (log-correlation 0.98 at layer 9, measured with a backward pass per token), and it is large exactly where the
    post-norm writers' gains are small (log-correlation -0.90): the dimensions steering needs most are the ones the
    writers reach least.
    """
    gains = []
    n = num_layers(model)
    names = [f"{arch.layers_path}.{i}.{r}" for i in range(writer_layer + 1, n) for r in arch.reader_norms]
    for name in [*names, arch.final_norm]:
        try:
            g2 = _gain(model.get_submodule(name)).cpu().pow(2)
        except AttributeError:
            continue
        if float(g2.mean()) > 0:
            gains.append(g2 / g2.mean())
    if not gains:
        raise ValueError(f"no residual-reading norms found after layer {writer_layer}")
    return torch.stack(gains).mean(0)


def fit_shares(
    v: Tensor,
    zhat: dict[str, Tensor],
    gains: dict[str, Tensor],
    metric: Tensor,
    init: dict[str, Tensor],
    steps: int = SHARE_STEPS,
) -> tuple[dict[str, Tensor], float, float]:
    """B of each post-norm writer (keyed like `zhat`), fitted so their summed additions come closest to v.

    With A·x = rms(W x), a writer with B = u turns its normalised output n̂ (rms 1) into (n̂ + u) / rms(n̂ + u), so
    it adds g ⊙ ((n̂ + u) / rms(n̂ + u) - n̂) to the residual stream, token by token. The fit minimises the mean over
    the sampled tokens' n̂ of ‖Σ additions - v‖² weighted by `metric` (reader_metric), starting from `init`
    (split_shares). Unlike split_shares it trades the norm's shrink against where the error lands: a dimension the
    later layers barely read can be left unsteered, one they read hard is worth shrinking the writer's output for.
    Returns (B per writer, loss at init, loss after).
    """
    u = {k: init[k].detach().float().clone().requires_grad_(True) for k in zhat}
    # L-BFGS: Adam needed ~3,000 steps (60 s) to leave the split's basin on Gemma-3-270M L9; this takes ~2 s.
    opt = torch.optim.LBFGS(list(u.values()), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        err = -v.float()
        for k, n in zhat.items():
            s = n + u[k]
            err = err + gains[k] * (s / s.pow(2).mean(-1, keepdim=True).sqrt() - n)
        return (err.pow(2) * metric).sum(-1).mean()

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        return value

    with torch.enable_grad():
        before = float(loss().detach())
        if steps > 0:
            opt.step(closure)  # type: ignore[arg-type]
        after = float(loss().detach())
    if not after < before:  # never worse than where it started
        return {k: t.detach().float() for k, t in init.items()}, before, before
    return {k: t.detach() for k, t in u.items()}, before, after


def balance(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale so |A| = |B|: same product, better conditioned in low-precision serving."""
    s = math.sqrt(float(b.norm()) / max(float(a.norm()), 1e-30))
    return a * s, b / s


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    *,
    tokens: int = DEFAULT_CALIBRATION_TOKENS,
    skip_bos: bool = False,
    max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS,
    split_writers: bool = True,
    first_weights: tuple[float, ...] = FIRST_WEIGHTS,
    select_tokens: int = SELECT_TOKENS,
    share_steps: int = SHARE_STEPS,
    progress: Progress | None = None,
) -> Calibration:
    """Fit one rank-1 update per steering site on the held-in split, with all the steering applied by hooks.

    Running with the hooks on means each writer sees the inputs it will see once the earlier sites are steered.
    split_writers (post-norm models, resid sites): share each vector between the layer's attention and MLP writers
    by their norms' gains (split_shares) instead of giving it all to the MLP writer. Measured on Gemma-3-270M L9,
    0.25× a random direction: top-1 59.5% -> 66.0%, KL ratio 0.747 -> 0.461. No effect on pre-norm models.
    share_steps: then fit both writers' B to the vector where the later layers read it (fit_shares) and keep the
    fitted B if its held-in KL is lower; 0 keeps the split. Same site: top-1 66.0% -> 85.9%, KL ratio 0.461 -> 0.067.
    first_weights: how much position 0 counts in the fit; with several, the first is the default and another wins
    only if its adapter is clearly closer to the hook on `select_tokens` held-in tokens (FIRST_WEIGHTS).
    """
    start = time.perf_counter()
    arch = architecture_for(model)
    device = next(model.parameters()).device
    writers: dict[str, tuple[HookPoint, int, str]] = {}
    shares: dict[str, Tensor] = {}
    # Post-norm writers sharing a site: their normalised outputs on some tokens, for fit_shares.
    sampled: dict[str, list[Tensor]] = {}
    for point in vector.points:
        layer, kind = point.writer()
        v = vector.directions[point].float().cpu()
        parts = {kind: v}
        if split_writers and arch.post_norm and point.site in ("resid_pre", "resid_post"):
            g = {k: _norm_gain(model, arch, layer, k).cpu() for k in ("attn", "mlp")}
            parts = dict(zip(("attn", "mlp"), split_shares(v, g["attn"], g["mlp"]), strict=True))
        for part_kind, share in parts.items():
            name = arch.writer_name(layer, part_kind)  # type: ignore[arg-type]
            if name in writers:
                raise ValueError(
                    f"{point.tl_name} and {writers[name][0].tl_name} are both written by {name}; "
                    "add their vectors into one site instead"
                )
            writers[name] = (point, layer, part_kind)
            shares[name] = share
            if len(parts) > 1 and share_steps > 0:
                sampled[name] = []
    # Per writer: statistics of position 0 and of every later position, combined with a weight at the end.
    stats: dict[str, tuple[_Stats, _Stats]] = {}
    state: dict[str, Tensor] = {}
    bos_id = getattr(model.config, "bos_token_id", None)

    def on(name: str, x: Tensor) -> None:
        _point, layer, kind = writers[name]
        keep = state["mask"].to(x.device)
        xs = x[keep].float()
        y = writer_target(model, name, layer, kind, xs, state["steered"].to(x.device)[keep])
        if name not in stats:
            stats[name] = (_Stats(xs.shape[-1], xs.device), _Stats(xs.shape[-1], xs.device))
        fold = state["fold"].to(x.device)[keep]
        first = state["first"].to(x.device)[keep]
        for part, rows in zip(stats[name], (~first, first), strict=True):
            for f in (0, 1):
                part.add(f, xs[rows & (fold == f)], y[rows & (fold == f)])
        if name in sampled and sum(len(t) for t in sampled[name]) < SHARE_SAMPLE_TOKENS:
            sampled[name].append(xs.cpu())

    last = max(layer for _, layer, _ in writers.values())
    seen = 0
    # Several sites: a later site's writers read what the earlier sites' steering changed, so nothing is reused.
    reusable = len(vector.points) == 1
    key = (frozenset(writers), frozenset(sampled), tokens, max_doc_tokens, skip_bos)
    known = _remembered(model, key) if reusable else None
    if known is not None:
        stats, sampled, seen = known
        if progress:
            progress(1.0, f"calibrating: {seen} tokens' statistics kept from an earlier calibration at this site")
    else:
        with steering(model, vector, skip_bos=skip_bos), recording(model, list(writers), on, what="input"):
            batches = corpus.batches(tokenizer, "calibration", tokens, max_doc_tokens=max_doc_tokens, by_length=True)
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
    if set(stats) != set(writers):
        raise ValueError("no calibration tokens reached the writers; check the tokenizer and corpus")
    if reusable and known is None:
        _remember(model, key, (stats, sampled, seen))

    # B does not depend on the fit. The last steps run on the CPU: with device_map="auto" the pieces live on
    # different devices.
    bs = {
        name: through_gain(shares[name], _norm_gain(model, arch, layer, kind).cpu()) if arch.post_norm else shares[name]
        for name, (_point, layer, kind) in writers.items()
    }
    fitted_bs: dict[str, Tensor] = {}
    share_losses: dict[str, dict[str, float]] = {}
    for point in vector.points:
        names = [n for n in sampled if writers[n][0] == point]
        if not names:
            continue
        layer = writers[names[0]][1]
        zhat, gains = {}, {}
        for n in names:
            kind = writers[n][2]
            z = torch.cat(sampled[n])[:SHARE_SAMPLE_TOKENS] @ model.get_submodule(n).weight.detach().float().cpu().T
            zhat[n] = z / rms_target(z, _norm_eps(model, arch, layer, kind)).unsqueeze(-1)
            gains[n] = _norm_gain(model, arch, layer, kind).cpu()
        fitted, before, after = fit_shares(
            vector.directions[point].float().cpu(),
            zhat,
            gains,
            reader_metric(model, arch, layer),
            {n: bs[n] for n in names},
            share_steps,
        )
        fitted_bs.update(fitted)
        share_losses[point.tl_name] = {"loss_split": before, "loss_fitted": after, "steps": float(share_steps)}
    ridges: dict[str, float] = {}

    def fits_for(weight: float, bs: dict[str, Tensor] = bs) -> list[WriterFit]:
        out = []
        for name, (point, layer, kind) in writers.items():
            body, head = stats[name]
            s = body.plus(head, weight)
            # The penalty is validated once, at the first weight; the others reuse it (an eigendecomposition each
            # would cost seconds at d_in = 1536).
            u, ridge, rel = fit_ridge(s, (ridges[name],) if name in ridges else RIDGE_GRID)
            ridges.setdefault(name, ridge)
            b_norm = float(bs[name].norm())
            a, b = balance(u.float().cpu(), bs[name])
            target = "rms(Wx)" if arch.post_norm else "one"
            out.append(WriterFit(point, name, (layer, kind), a, b, target, ridge, sum(s.n), rel, b_norm))
        return out

    candidates = {w: fits_for(w) for w in first_weights}
    selection = (
        _held_in_kl(model, tokenizer, vector, candidates, skip_bos, select_tokens)
        if len(candidates) > 1 or fitted_bs
        else {}
    )
    chosen = choose_first_weight(selection) if len(candidates) > 1 else next(iter(candidates))
    fits = candidates[chosen]
    share_info: dict[str, Any] = {}
    if fitted_bs:
        # fit_shares' metric is a first-order, per-dimension stand-in for what the later layers do with the error,
        # and it ignores that the attention share also passes through the layer's MLP: on Gemma-3-270M it helps at
        # layers 1 and 9 and hurts at 5. So the fitted shares are used only where the model agrees.
        fitted = fits_for(chosen, {**bs, **fitted_bs})
        kl = {"split": selection[chosen], "fitted": _held_in_kl(model, tokenizer, vector, {chosen: fitted},
                                                                skip_bos, select_tokens)[chosen]}  # fmt: skip
        use = "fitted" if kl["fitted"] < kl["split"] else "split"
        fits = fitted if use == "fitted" else fits
        share_info = {"sites": share_losses, "held_in_kl": kl, "used": use}
    return Calibration(
        fits,
        seen,
        time.perf_counter() - start,
        skip_bos,
        corpus.corpus_info(),
        first_weight=chosen,
        selection_kl=selection,
        shares=share_info,
        reused_statistics=known is not None,
    )


def choose_first_weight(held_in_kl: dict[float, float]) -> float:
    """The first weight (the default), unless another at least halves its held-in KL (SELECT_MARGIN)."""
    default = next(iter(held_in_kl))
    best = min(held_in_kl, key=held_in_kl.__getitem__)
    return best if held_in_kl[best] <= SELECT_MARGIN * held_in_kl[default] else default


def _held_in_kl(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    candidates: dict[float, list[WriterFit]],
    skip_bos: bool,
    tokens: int,
) -> dict[float, float]:
    """Mean KL(hook ‖ adapter) of each candidate on the first `tokens` calibration tokens.

    The candidates differ only from the first adapted block on, so the blocks before it run once (as in verify);
    skip_bos needs the model-level input ids, so it runs full passes instead.
    """
    device = next(model.parameters()).device
    first = min(f.writer[0] for fits in candidates.values() for f in fits)
    replay = not skip_bos and first > 0
    total = dict.fromkeys(candidates, 0.0)
    n = 0
    with torch.no_grad():
        for batch in corpus.batches(tokenizer, "calibration", tokens, max_doc_tokens=64, by_length=True):
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            # Every real token, prompt positions too: scoring 64-token windows on answers alone left a chat a
            # handful of tokens, too few to choose by.
            keep = mask.bool()
            with steering(model, vector, skip_bos=skip_bos), recording_block_calls(model, first) as calls:
                hook = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[keep].float(), -1)
            hook_p = hook.exp()
            for weight, fits in candidates.items():
                params = {f.module: (f.A.to(device), f.B.to(device)) for f in fits}
                with lowrank_updates(model, params):
                    logits = (
                        forward_from(model, first, calls)
                        if replay
                        else model(input_ids=ids, attention_mask=mask).logits
                    )
                adapted = F.log_softmax(logits[keep].float(), -1)
                total[weight] += float(kl_per_token(hook, adapted, hook_p).sum())
            n += int(keep.sum())
    return {w: t / max(n, 1) for w, t in total.items()}
