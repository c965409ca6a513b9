"""Choosing among candidate adapters by held-in KL(hook ‖ adapter) (steer_core.fit.selection): position 0's weight,
then the post-norm writers' split or fitted shares."""

from __future__ import annotations

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core import corpus
from steer_core.divergence import kl_per_token
from steer_core.fit.calibrate import calibrate
from steer_core.fit.position0 import choose_first_weight
from steer_core.fit.selection import SELECT_TOKENS
from steer_core.sites import HookPoint
from steer_core.steer import lowrank_updates, steering
from steer_core.vectors.vector import SteeringVector


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_position_zero_weight_is_chosen_by_held_in_kl(family: str) -> None:
    lm = tiny_lm(family)
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    # share_steps=0: post-norm writers keep the split shares, so the candidates differ only in position 0's weight
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=2048, first_weights=(1.0, 100.0), share_steps=0)
    assert set(cal.selection_kl) == {1.0, 100.0}
    assert cal.first_weight == choose_first_weight(cal.selection_kl)
    # The selection replays only the blocks from the writer on; full passes must give the same KL.
    kl = _replayed_kl(lm, vec, {f.module: (f.A, f.B) for f in cal.fits})
    assert kl == pytest.approx(cal.selection_kl[cal.first_weight], rel=1e-4)
    single = calibrate(lm.model, lm.tokenizer, vec, tokens=2048, first_weights=(1.0,), share_steps=0)
    assert single.selection_kl == {} and single.first_weight == 1.0


def _replayed_kl(lm, vec: SteeringVector, params: dict) -> float:
    """Mean KL(hook ‖ adapter) over the selection tokens, from full forward passes."""
    kl = n = 0.0
    with torch.no_grad():
        for batch in corpus.batches(lm.tokenizer, "calibration", SELECT_TOKENS, max_doc_tokens=64, by_length=True):
            keep = batch.attention_mask.bool()
            with steering(lm.model, vec):
                hook = torch.log_softmax(lm.model(batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
            with lowrank_updates(lm.model, params):
                adapted = torch.log_softmax(lm.model(batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
            kl += float(kl_per_token(hook[keep], adapted[keep]).sum())
            n += int(keep.sum())
    return kl / n


def test_post_norm_calibration_fits_the_shares_and_keeps_the_better_by_held_in_kl() -> None:
    lm = tiny_lm("gemma3")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    split = calibrate(lm.model, lm.tokenizer, vec, tokens=1024, share_steps=0, first_weights=(1.0,))
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=1024, first_weights=(1.0,))
    assert split.shares == {}
    (losses,) = cal.shares["sites"].values()
    assert losses["loss_fitted"] < losses["loss_split"]
    kl = cal.shares["held_in_kl"]
    assert cal.shares["used"] == min(kl, key=kl.get)
    for a, b in zip(split.fits, cal.fits, strict=True):
        torch.testing.assert_close(a.A / a.A.norm(), b.A / b.A.norm())  # A fits rms(Wx) either way
        same_b = torch.allclose(a.B / a.B.norm(), b.B / b.B.norm())
        assert same_b == (cal.shares["used"] == "split")
    # the KL recorded for the split is that of the split adapter
    params = {f.module: (f.A, f.B) for f in split.fits}
    assert kl["split"] == pytest.approx(_replayed_kl(lm, vec, params), rel=1e-4)
