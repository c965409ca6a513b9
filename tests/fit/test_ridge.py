"""The closed-form fit of A (steer_core.fit.ridge): the ridge penalty, weighted rows, and the writers' input
statistics kept for the next vector at a site."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core.fit.calibrate import calibrate
from steer_core.fit.ridge import Stats, fit_ridge
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector


def test_ridge_recovers_an_exact_linear_target() -> None:
    x = torch.randn(4000, 12, dtype=torch.float64)
    u_true = torch.randn(12, dtype=torch.float64)
    stats = Stats(12, torch.device("cpu"))
    for i in range(0, 4000, 500):  # batch by batch: sufficient statistics add up
        stats.add((i // 500) % 2, x[i : i + 500], x[i : i + 500] @ u_true)
    u, ridge, rel = fit_ridge(stats)
    torch.testing.assert_close(u, u_true, atol=1e-4, rtol=1e-4)
    assert ridge == 1e-7 and rel < 1e-4


def test_ridge_picks_a_larger_penalty_for_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 40, generator=g, dtype=torch.float64)
    y = torch.randn(60, generator=g, dtype=torch.float64)  # pure noise: the best fit is heavily shrunk
    stats = Stats(40, torch.device("cpu"))
    stats.add(0, x[:30], y[:30])
    stats.add(1, x[30:], y[30:])
    _u, ridge, _rel = fit_ridge(stats)
    assert ridge >= 1e-2


def test_weighting_rows_equals_repeating_them() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 6, generator=g, dtype=torch.float64), torch.randn(400, generator=g, dtype=torch.float64)
    cpu = torch.device("cpu")
    body, head, repeated = Stats(6, cpu), Stats(6, cpu), Stats(6, cpu)
    for fold in (0, 1):
        rows = slice(10 + fold, 400, 2)
        body.add(fold, x[rows], y[rows])
        repeated.add(fold, x[rows], y[rows])
        head.add(fold, x[fold:10:2], y[fold:10:2])
        for _ in range(5):
            repeated.add(fold, x[fold:10:2], y[fold:10:2])
    combined = body.plus(head, 5.0)
    for name in ("xtx", "xty", "yty"):
        torch.testing.assert_close(getattr(combined, name), getattr(repeated, name))
    assert combined.n == [200, 200] and combined.sq == body.sq + head.sq  # weights do not move the penalty scale


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_second_vector_at_a_site_reuses_its_writers_statistics_and_fits_as_if_fresh(family: str) -> None:
    lm = tiny_lm(family)
    site = HookPoint(1, "resid_post")
    first = calibrate(lm.model, lm.tokenizer, SteeringVector({site: torch.randn(D_MODEL) * 3}), tokens=512)
    other = SteeringVector({site: torch.randn(D_MODEL) * 5})  # another feature, another strength
    again = calibrate(lm.model, lm.tokenizer, other, tokens=512)
    assert not first.reused_statistics and again.reused_statistics
    twin = tiny_lm(family)  # the same weights, another model: nothing is shared between models
    fresh = calibrate(twin.model, twin.tokenizer, other, tokens=512)
    assert not fresh.reused_statistics
    assert [f.module for f in again.fits] == [f.module for f in fresh.fits]
    for kept, new in zip(again.fits, fresh.fits, strict=True):
        assert torch.equal(kept.A, new.A) and torch.equal(kept.B, new.B) and kept.ridge == new.ridge
    assert again.tokens == fresh.tokens and again.first_weight == fresh.first_weight


def test_statistics_are_reused_only_for_one_site_with_the_same_settings() -> None:
    from steer_core.fit.ridge import STATISTICS_KEPT, forget_statistics

    lm = tiny_lm("llama")
    one, two = HookPoint(1, "resid_post"), HookPoint(2, "resid_post")

    def reused(points: tuple[HookPoint, ...], **kwargs: Any) -> bool:
        vec = SteeringVector({p: torch.randn(D_MODEL) * 3 for p in points})
        # one writer a calibration: the next block's attention writer would keep a second entry
        settings = {"tokens": 512, "writer": "own", **kwargs}
        return calibrate(lm.model, lm.tokenizer, vec, **settings).reused_statistics

    assert not reused((one,)) and reused((one,))
    assert not reused((one,), tokens=768) and not reused((one,), skip_bos=True) and not reused((two,))
    # Two sites: layer 2's MLP reads what layer 1's steering changed.
    assert not reused((one, two)) and not reused((one, two))
    # A model converted in place to another dtype is the same object with other activations.
    lm.model.to(torch.bfloat16)
    assert not reused((one,)) and reused((one,))
    lm.model.to(torch.float32)
    # forget_statistics: the next calibration makes a full pass again.
    assert reused((two,))
    forget_statistics(lm.model)
    assert not reused((two,)) and reused((two,))
    # At most STATISTICS_KEPT per model, the least recently used going first.
    lm = tiny_lm("llama")
    sizes = [512 + 256 * i for i in range(STATISTICS_KEPT + 1)]
    assert not any(reused((one,), tokens=t) for t in sizes[:-1])
    assert reused((one,), tokens=sizes[0])  # now the most recently used
    assert not reused((one,), tokens=sizes[-1])  # one too many: sizes[1] goes
    assert reused((one,), tokens=sizes[0]) and not reused((one,), tokens=sizes[1])


def test_statistics_over_the_byte_budget_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from steer_core.fit import ridge

    lm = tiny_lm("llama")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    monkeypatch.setattr(ridge, "STATISTICS_MAX_BYTES", 1000)  # less than one site's XᵀX
    assert not calibrate(lm.model, lm.tokenizer, vec, tokens=512).reused_statistics
    assert not calibrate(lm.model, lm.tokenizer, vec, tokens=512).reused_statistics
    monkeypatch.undo()
    calibrate(lm.model, lm.tokenizer, vec, tokens=512)
    assert calibrate(lm.model, lm.tokenizer, vec, tokens=512).reused_statistics
