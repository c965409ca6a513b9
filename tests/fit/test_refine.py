"""End-to-end refinement of A and B on KL(hook ‖ adapter) (steer_core.fit.refine)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core import corpus
from steer_core.fit.calibrate import calibrate
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector


def test_refine_lowers_kl_on_post_norm() -> None:
    """End-to-end refinement starts from the closed form and must not end worse on its own objective."""
    from steer_core.fit.refine import refine

    lm = tiny_lm("gemma3")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=1024)
    refined = refine(lm.model, lm.tokenizer, vec, cal, steps=40, lr=1e-2)
    assert refined.refine is not None and refined.refine["steps"] == 40
    assert refined.refine["kl_last"] < refined.refine["kl_first"]
    assert refined.fits[0].refined_steps == 40
    assert not torch.equal(refined.fits[0].A, cal.fits[0].A)


def test_train_passes_over_the_held_in_text_again() -> None:
    """More steps than the held-in text holds still train every step (a second pass), on a rank-2 update."""
    from steer_core.fit.refine import train

    lm = tiny_lm("llama")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    held_in = sum(len(item[1]) for item in corpus._texts_until(lm.tokenizer, "calibration", 10**9, 32))
    name = "model.layers.1.mlp.down_proj"
    module = lm.model.get_submodule(name)
    a = torch.zeros(2, module.in_features, requires_grad=True)
    b = (torch.randn(module.out_features, 2) * 0.01).requires_grad_(True)
    steps = held_in // (256 * 32) + 3
    seen: list[int] = []
    losses = train(
        lm.model, lm.tokenizer, vec, {name: (a, b)}, torch.optim.Adam([a, b], lr=1e-2),
        steps=steps, batch_size=256, max_doc_tokens=32, on_step=lambda s, _kl: seen.append(s),
    )  # fmt: skip
    assert len(losses) == steps and seen == list(range(1, steps + 1))
    assert float(a.detach().abs().sum()) > 0  # A moved from zero, so the gradient reached it
    assert min(losses[-3:]) < losses[0]


def test_cosine_decay_runs_the_learning_rate_down_to_zero() -> None:
    from steer_core.fit.refine import cosine_decay

    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.5)
    schedule = cosine_decay(opt, 10)
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(12):
        opt.step()
        schedule.step()
        rates.append(opt.param_groups[0]["lr"])
    assert rates[0] == 0.5 and math.isclose(rates[5], 0.25) and rates[10] == 0.0 and rates[12] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(rates))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_refine_takes_the_learning_rate_measured_for_its_norm_placement(family: str) -> None:
    from steer_core.fit.refine import LR_POST_NORM, LR_PRE_NORM, refine

    lm = tiny_lm(family)
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=512)
    refined = refine(lm.model, lm.tokenizer, vec, cal, steps=2)
    assert refined.refine is not None
    assert refined.refine["lr"] == (LR_POST_NORM if family == "gemma3" else LR_PRE_NORM)
    assert refined.refine["batch_size"] == 2  # the CPU's default


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_default_refinement_follows_the_device_and_the_norm_placement(family: str) -> None:
    from steer_core.fit.refine import (
        DEFAULT_BATCH_CPU,
        DEFAULT_BATCH_GPU,
        DEFAULT_STEPS_GPU,
        DEFAULT_STEPS_POST_NORM,
        RefineDefaults,
        defaults,
        defaults_for,
    )

    post_norm = family == "gemma3"
    cpu = RefineDefaults(DEFAULT_STEPS_POST_NORM if post_norm else 0, DEFAULT_BATCH_CPU)
    assert defaults(tiny_lm(family).model) == cpu
    assert defaults_for("cuda", post_norm) == RefineDefaults(DEFAULT_STEPS_GPU, DEFAULT_BATCH_GPU)
    assert defaults_for("mps", post_norm) == cpu  # measured on CUDA only
