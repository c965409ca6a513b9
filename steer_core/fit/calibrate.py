"""Calibration: from a steering vector to one rank-1 update (A, B) per writer module, fitted on held-in text.

The export calls calibrate() once; the data passes each step once, in this order, each step in its own module:
1. shares.writers: which writer modules carry each site's vector, and what part of it each adds;
2. ridge.gather: one pass over the calibration text, with the steering on, for each writer's input statistics
   (kept for the next vector at the same site);
3. shares.writer_bs: each writer's B, split by the post-norms' gains and, where a site is shared, fitted;
4. position0.fit_at_weights: the closed-form A of each writer at each weight of position 0;
5. selection.select: position 0's weight, then the split or fitted shares, by held-in KL(hook ‖ adapter);
6. composite.next_writer: for a one-site vector on a pre-norm model, block L+1's attention writer as a second
   candidate (and the two splitting v), kept where its KL on calibration text no fit saw is lower.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from steer_core import corpus
from steer_core.constants import DEFAULT_CALIBRATION_TOKENS, DEFAULT_MAX_DOC_TOKENS, WRITERS
from steer_core.fit.composite import SPLIT, NextWriter, next_writer, next_writer_site
from steer_core.fit.position0 import FIRST_WEIGHTS, InputFit, fit_at_weights
from steer_core.fit.ridge import gather
from steer_core.fit.selection import SELECT_TOKENS, select, unseen_kl
from steer_core.fit.shares import SHARE_SAMPLE_TOKENS, SHARE_STEPS, Writer, writer_bs, writers
from steer_core.sites import HookPoint, Kind, architecture_for
from steer_core.vectors.vector import SteeringVector

Progress = Callable[[float, str], None]
Writers = Literal["auto", "own", "next", "split"]  # constants.WRITERS
# Another writer replaces the site's own only where its KL on unseen calibration text is lower by 5% (noise margin)
NEXT_MARGIN = 0.95


@dataclass(frozen=True)
class WriterFit:
    """One writer module's rank-1 update: the adapter adds (A·x) B to the writer's output."""

    point: HookPoint
    module: str
    writer: tuple[int, Kind]  # (layer, which of its writers) of `module`
    A: Tensor  # Float[Tensor, "d_in"]
    B: Tensor  # Float[Tensor, "d_out"]
    target: str  # "one" (pre-norm) or "rms(Wx)" (post-norm)
    ridge: float  # the chosen penalty, relative to mean(diag(XᵀX))
    tokens: int
    cv_rel_rmse: float  # two-fold validation RMSE of A·x against its target, over the target's RMS
    b_unscaled_norm: float  # |B| before balance(): u·x = (A·x) · |B| / b_unscaled_norm
    refined_steps: int = 0  # end-to-end steps on KL(hook ‖ adapter) after the closed form (refine.py)
    # False where the adapter replaces a hook upstream of the writer (composite), so it reads the unsteered residual
    reads_steered: bool = True


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
    reused_tokens: int = 0  # of `tokens`, those whose statistics were kept (all if reused_statistics)
    # The writer candidates' KL(hook ‖ adapter) on unseen calibration text, which was used, the attention response
    writer_choice: dict[str, Any] = field(default_factory=dict)


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
    writer: Writers = "auto",
    progress: Progress | None = None,
) -> Calibration:
    """Fit one rank-1 update per steering site on the held-in split, with all the steering applied by hooks.

    Running with the hooks on means each writer sees the inputs it will see once the earlier sites are steered.
    split_writers (post-norm models, resid sites): share each vector between the layer's attention and MLP writers
    by their norms' gains (split_shares) instead of giving it all to the MLP writer. No effect on pre-norm models.
    share_steps: then fit both writers' B to the vector where the later layers read it (fit_shares) and keep the
    fitted B if its held-in KL is lower; 0 keeps the split. What each bought: docs/fidelity.md.
    first_weights: how much position 0 counts in the fit; with several, the first is the default and another wins
    only if its adapter is clearly closer to the hook on `select_tokens` held-in tokens (position0).
    writer: for a one-site vector on a pre-norm model, "auto" also fits block L+1's attention writer and the two
    writers splitting v (composite) and keeps the one with the lowest KL on calibration text no fit saw, where it
    beats the site's own writer by NEXT_MARGIN; "own", "next" and "split" take that candidate without measuring.
    """
    if writer not in WRITERS:
        raise ValueError(f"writer {writer!r} is not one of {', '.join(WRITERS)}")
    start = time.perf_counter()
    target = "rms(Wx)" if architecture_for(model).post_norm else "one"
    plan = statistics_plan(model, vector, split_writers=split_writers, writer=writer, share_steps=share_steps)
    by_name, nxt_site = plan.writers, plan.next_site
    seen = gather(
        model,
        tokenizer,
        vector if nxt_site is None else vector.scaled(0.0),
        plan.gathered,
        sample=plan.sample,
        sample_tokens=SHARE_SAMPLE_TOKENS,
        tokens=tokens,
        max_doc_tokens=max_doc_tokens,
        skip_bos=skip_bos,
        progress=progress,
    )
    bs = writer_bs(model, vector, by_name, seen.sampled, share_steps)
    a = fit_at_weights(seen.stats, first_weights)
    # A does not depend on B: the fitted shares' candidate at each weight is the same A balanced against other Bs.
    split = {w: _fits(by_name, a[w], bs.split, target) for w in a}
    fitted = {w: _fits(by_name, a[w], {**bs.split, **bs.fitted}, target) for w in a} if bs.fitted else {}
    chosen = select(
        model,
        tokenizer,
        vector,
        {w: _params(fits) for w, fits in split.items()},
        {w: _params(fits) for w, fits in fitted.items()},
        first_layer=min(w.layer for w in by_name.values()),
        skip_bos=skip_bos,
        tokens=select_tokens,
    )
    shares = {"sites": bs.losses, "held_in_kl": chosen.shares_kl, "used": chosen.shares} if chosen.shares else {}
    fits = (fitted if chosen.shares == "fitted" else split)[chosen.first_weight]
    choice: dict[str, Any] = {}
    if nxt_site is not None:
        nxt = next_writer(model, tokenizer, vector, nxt_site, a[chosen.first_weight][nxt_site[1]], tokens=tokens,
                          max_doc_tokens=max_doc_tokens, skip_bos=skip_bos)  # fmt: skip
        fits, choice = _choose_writer(model, tokenizer, vector, fits, nxt, skip_bos, tokens, max_doc_tokens, writer)
    return Calibration(
        fits,
        seen.tokens,
        time.perf_counter() - start,
        skip_bos,
        corpus.corpus_info(),
        first_weight=chosen.first_weight,
        selection_kl=chosen.first_weight_kl,
        shares=shares,
        reused_statistics=seen.reused,
        reused_tokens=seen.reused_tokens,
        writer_choice=choice,
    )


@dataclass(frozen=True)
class StatisticsPlan:
    """Which writers' input statistics a calibration of a vector gathers, and why."""

    writers: dict[str, Writer]  # the writers that carry the vector (shares.writers)
    gathered: dict[str, tuple[int, Kind]]  # module -> (layer, kind): those, and the next block's attention writer
    sample: list[str]  # writers whose input rows the post-norm shares' fit samples
    next_site: tuple[HookPoint, str, int] | None  # composite's candidate, where there is one


def statistics_plan(
    model: nn.Module,
    vector: SteeringVector,
    *,
    split_writers: bool = True,
    writer: Writers = "auto",
    share_steps: int = SHARE_STEPS,
) -> StatisticsPlan:
    """What calibrate(vector, same settings) gathers in its pass over the calibration text."""
    by_name = writers(model, vector, split_writers)
    gathered = {name: (w.layer, w.kind) for name, w in by_name.items()}
    nxt_site = next_writer_site(model, vector) if writer != "own" else None
    if nxt_site is not None:
        # One pass for both: a single site's own writer reads nothing its steering changes, and the next block's
        # attention writer must be read without it, as the adapter that replaces the hook leaves it.
        gathered[nxt_site[1]] = (nxt_site[2], "attn")
    sample = [name for name, w in by_name.items() if w.shared] if share_steps > 0 else []
    return StatisticsPlan(by_name, gathered, sample, nxt_site)


def _choose_writer(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    fits: list[WriterFit],
    nxt: NextWriter,
    skip_bos: bool,
    tokens: int,
    max_doc_tokens: int,
    writer: Writers,
) -> tuple[list[WriterFit], dict[str, Any]]:
    """The site's own writer, block L+1's attention writer, or the two splitting the vector (composite), whichever
    comes closest to the hook on calibration text that no fit saw (selection.unseen_kl); the site's own unless another
    is lower by NEXT_MARGIN."""
    (own,) = fits
    fit = nxt.a

    def attention(b: Tensor) -> WriterFit:
        balanced_a, balanced_b = balance(fit.u.float().cpu(), b)
        return WriterFit(nxt.point, nxt.module, (nxt.layer, "attn"), balanced_a, balanced_b, "one", fit.ridge,
                         fit.tokens, fit.cv_rel_rmse, float(b.norm()), reads_steered=False)  # fmt: skip

    a, b = balance(own.A, own.B * SPLIT)
    split_own = dataclasses.replace(own, A=a, B=b, b_unscaled_norm=own.b_unscaled_norm * SPLIT)
    candidates = {
        own.module: fits,
        nxt.module: [attention(nxt.b)],
        f"{own.module} + {nxt.module}": [split_own, attention(nxt.b_split)],
    }
    if writer != "auto":
        used = list(candidates)[WRITERS.index(writer) - 1]
        return candidates[used], {"unseen_kl": {}, "used": used, "asked": writer, "split": SPLIT,
                                  "attention_response_ratio": nxt.response_ratio, "tokens": nxt.tokens}  # fmt: skip
    todo = {k: _params(c) for k, c in candidates.items()}
    kl = unseen_kl(model, tokenizer, vector, todo, own.writer[0], skip_bos, after=tokens, max_doc_tokens=max_doc_tokens)
    best = min(kl, key=kl.__getitem__)
    used = best if kl[best] < NEXT_MARGIN * kl[own.module] else own.module
    choice = {"unseen_kl": kl, "used": used, "split": SPLIT, "attention_response_ratio": nxt.response_ratio,
              "tokens": nxt.tokens}  # fmt: skip
    return candidates[used], choice


def _fits(by_name: dict[str, Writer], a: dict[str, InputFit], bs: dict[str, Tensor], target: str) -> list[WriterFit]:
    out = []
    for name, w in by_name.items():
        fit = a[name]
        balanced_a, balanced_b = balance(fit.u.float().cpu(), bs[name])
        out.append(
            WriterFit(
                w.point,
                name,
                (w.layer, w.kind),
                balanced_a,
                balanced_b,
                target,
                fit.ridge,
                fit.tokens,
                fit.cv_rel_rmse,
                float(bs[name].norm()),
            )
        )
    return out


def _params(fits: list[WriterFit]) -> dict[str, tuple[Tensor, Tensor]]:
    return {f.module: (f.A, f.B) for f in fits}
