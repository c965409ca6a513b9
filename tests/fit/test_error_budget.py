"""scripts.error_budget: its λ sweep must run from the hook (λ = 0) to the exported adapter (λ = 1), and its
least-squares floor must bound every A from below."""

from __future__ import annotations

import argparse

import pytest
import torch

from helpers import tiny_lm
from scripts.error_budget import budget, calibration_batches, least_squares_floor, writer_inputs
from steer_core.check.servability import HeldOut
from steer_core.fit.calibrate import calibrate
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector

ARGS = argparse.Namespace(calibration_tokens=1024, eval_tokens=256, seed=0)


@pytest.fixture(scope="module")
def setup():
    lm = tiny_lm("llama")
    v = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 2.0
    vector = SteeringVector({HookPoint(1, "resid_post"): v}, {"k": 1.0})
    return lm, vector


def test_lambda_runs_from_the_hook_to_the_adapter(setup) -> None:
    lm, vector = setup
    rows = {r["lambda"]: r for r in budget(lm, vector, [1.0, 0.5, 0.0], ARGS)}
    assert rows[0.0]["top1"] == 1.0 and rows[0.0]["kl_ratio"] < 1e-6
    assert rows[0.0]["noise_top1"] == 1.0 and rows[0.0]["noise_kl_ratio"] < 1e-6  # zero noise is the hook too
    # λ = 1 is the closed-form adapter, measured the way refine_curve measures it.
    cal = calibrate(lm.model, lm.tokenizer, vector, tokens=ARGS.calibration_tokens, writer="own")
    fit = cal.fits[0]
    adapter = HeldOut(lm, vector, ARGS.eval_tokens).measure({fit.module: (fit.A.float(), fit.B.float())})
    assert rows[1.0]["top1"] == pytest.approx(adapter["top1"])
    assert rows[1.0]["kl_ratio"] == pytest.approx(adapter["kl_ratio"], rel=1e-4)
    assert rows[1.0]["kl_ratio"] > rows[0.5]["kl_ratio"] > 0  # a smaller error is closer to the hook
    assert rows[0.5]["mean_abs_error"] == pytest.approx(rows[1.0]["mean_abs_error"] / 2)


def test_floor_bounds_every_a_and_is_zero_when_a_constant_is_readable(setup) -> None:
    lm, vector = setup
    cal = calibrate(lm.model, lm.tokenizer, vector, tokens=ARGS.calibration_tokens, writer="own")
    fit = cal.fits[0]
    x = writer_inputs(lm, fit.module, fit.writer[0], calibration_batches(lm, ARGS.calibration_tokens))
    assert x.shape[1] == fit.A.numel() and len(x) >= ARGS.calibration_tokens * 0.9
    floor = least_squares_floor(x)
    along = float(fit.B.double() @ vector.directions[HookPoint(1, "resid_post")].double()) / float(
        vector.directions[HookPoint(1, "resid_post")].double().norm() ** 2
    )
    calibrated = float(((x @ fit.A.double() * along - 1) ** 2).mean() ** 0.5)
    assert 0 < floor <= calibrated
    # A column that is constant on every token makes A·x = 1 exact.
    assert least_squares_floor(torch.cat([x, torch.full((len(x), 1), 0.3, dtype=x.dtype)], 1)) < 1e-8
