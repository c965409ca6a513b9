"""How much position 0 counts in the fit of A: one closed-form fit per candidate weight, and the rule that picks one.

Position 0 is an attention sink every later token reads from, so its error costs more than one token's; how much
more depends on the layer, in both directions (docs/fidelity.md, "What each idea bought"). Each candidate weight is
fitted, and a heavier one wins only if it at least halves KL(hook ‖ adapter) on held-in tokens (selection): a
smaller held-in gain did not survive on held-out text.
"""

from __future__ import annotations

import threading
import weakref
from typing import NamedTuple

from torch import Tensor

from steer_core.fit.ridge import RIDGE_GRID, Stats, fit_ridge

FIRST_WEIGHTS = (1.0, 10.0, 100.0)
SELECT_MARGIN = 0.5


class InputFit(NamedTuple):
    """One writer's closed-form A at one weight of position 0, before balance()."""

    u: Tensor  # Float64[Tensor, "d_in"]
    ridge: float  # the chosen penalty, relative to mean(diag(XᵀX))
    cv_rel_rmse: float
    tokens: int


def fit_at_weights(
    stats: dict[str, tuple[Stats, Stats]], weights: tuple[float, ...] = FIRST_WEIGHTS
) -> dict[float, dict[str, InputFit]]:
    """Weight -> writer -> A, from each writer's statistics of (every later position, position 0)."""
    per_writer = {name: _writer_fits(body, head, weights) for name, (body, head) in stats.items()}
    return {weight: {name: fits[weight] for name, fits in per_writer.items()} for weight in weights}


# A depends on the statistics alone, and statistics kept for a site (ridge.gather) are the same objects each time:
# the next vector there (a map's next strength, another feature) reuses its fits too, ~2 s a writer at d_in = 1536.
_FITS: weakref.WeakKeyDictionary[Stats, dict[tuple[int, tuple[float, ...]], dict[float, InputFit]]] = (
    weakref.WeakKeyDictionary()
)
_FITS_LOCK = threading.Lock()


def _writer_fits(body: Stats, head: Stats, weights: tuple[float, ...]) -> dict[float, InputFit]:
    key = (id(head), weights)  # head lives as long as body: both are one writer's kept statistics
    with _FITS_LOCK:
        known = _FITS.get(body, {}).get(key)
    if known is not None:
        return known
    out: dict[float, InputFit] = {}
    ridge: float | None = None
    for weight in weights:
        s = body.plus(head, weight)
        # The penalty is validated once, at the first weight; the others reuse it (an eigendecomposition each would
        # cost seconds at d_in = 1536).
        u, chosen, rel = fit_ridge(s, (ridge,) if ridge is not None else RIDGE_GRID)
        ridge = chosen if ridge is None else ridge
        out[weight] = InputFit(u, chosen, rel, sum(s.n))
    with _FITS_LOCK:
        _FITS.setdefault(body, {})[key] = out
    return out


def choose_first_weight(held_in_kl: dict[float, float]) -> float:
    """The first weight (the default), unless another at least halves its held-in KL (SELECT_MARGIN)."""
    default = next(iter(held_in_kl))
    best = min(held_in_kl, key=held_in_kl.__getitem__)
    return best if held_in_kl[best] <= SELECT_MARGIN * held_in_kl[default] else default
