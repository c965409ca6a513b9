"""calibrate() as a whole (steer_core.fit.calibrate): the chain of fits, one per writer; its steps have their own
files (test_ridge, test_shares, test_position0, test_selection, test_composite, test_refine)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core.fit.calibrate import balance, calibrate
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector


def test_balance_keeps_the_product() -> None:
    a, b = torch.randn(5) * 100, torch.randn(7) * 0.01
    a2, b2 = balance(a, b)
    torch.testing.assert_close(torch.outer(b2, a2), torch.outer(b, a))
    assert math.isclose(float(a2.norm()), float(b2.norm()), rel_tol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_calibration_fits_its_target(family: str) -> None:
    lm = tiny_lm(family)
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL)})
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=2048, split_writers=False, writer="own")
    (fit,) = cal.fits
    assert fit.module.endswith(("mlp.down_proj", "mlp.c_proj"))
    assert fit.target == ("rms(Wx)" if family == "gemma3" else "one")
    assert cal.tokens == 2048 and fit.tokens == 2048
    assert fit.cv_rel_rmse < 0.25


def test_two_sites_on_one_writer_are_refused() -> None:
    lm = tiny_lm("llama")
    vec = SteeringVector(
        {HookPoint(1, "resid_post"): torch.randn(D_MODEL), HookPoint(2, "resid_pre"): torch.randn(D_MODEL)}
    )
    with pytest.raises(ValueError, match="both written by model.layers.1.mlp.down_proj"):
        calibrate(lm.model, lm.tokenizer, vec, tokens=512)


def test_split_writers_fits_both_post_norm_writers(tmp_path) -> None:
    from steer_core.export import export

    lm = tiny_lm("gemma3")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3}, {"source": "test"})
    result = export(lm, vec, tmp_path / "a", calibration_tokens=1024, verify_tokens=256, split_writers=True)
    fits = json.loads((result.folder / "steering.json").read_text())["fits"]
    assert sorted(f["writer_kind"] for f in fits) == ["attn", "mlp"]
    assert all(f["writer_layer"] == 1 for f in fits)
    assert set(result.report.fit_abs_error) == {f["module"] for f in fits}
