"""An export after a map at the same site (#32): the calibration grows the map's statistics to its own token count
with a pass over the documents the larger budget adds, instead of a pass over all of them."""

from __future__ import annotations

import torch

from helpers import D_MODEL, tiny_lm
from steer_core import corpus
from steer_core.fit.calibrate import calibrate
from steer_core.fit.ridge import forget_statistics
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector


def _tokens(batches: list[corpus.Batch]) -> list[tuple[int, tuple[int, ...]]]:
    return sorted(
        (int(b.doc_index[r]), tuple(b.input_ids[r][b.attention_mask[r].bool()].tolist()))
        for b in batches
        for r in range(len(b.doc_index))
    )


def test_the_larger_budgets_text_is_the_smaller_ones_plus_what_growth_adds() -> None:
    tok = tiny_lm("llama").tokenizer
    for have, want in ((1024, 3000), (2048, 2048 + 256), (1100, 1200)):
        plan = corpus.growth(tok, "calibration", have, want)
        assert plan is not None
        added, removed = plan
        small = _tokens(list(corpus.batches(tok, "calibration", have)))
        large = _tokens(list(corpus.batches(tok, "calibration", want)))
        for doc in _tokens(removed):
            small.remove(doc)  # the cut last document goes, to come back whole
        assert sorted(small + _tokens(added)) == large
    assert corpus.growth(tok, "calibration", 3000, 1000) is None  # shrinking is not growing
    # under 4 formats x 256 tokens a budget cuts every document shorter: not a prefix of a larger budget's text
    assert corpus.growth(tok, "calibration", 512, 1024) is None


def test_an_export_after_a_map_grows_its_statistics_to_what_a_fresh_calibration_finds() -> None:
    lm = tiny_lm("llama")
    vector = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    calibrate(lm.model, lm.tokenizer, vector, tokens=1024)  # the map's
    grown = calibrate(lm.model, lm.tokenizer, vector.scaled(2.0), tokens=2048)
    assert not grown.reused_statistics and 0 < grown.reused_tokens < grown.tokens
    forget_statistics(lm.model)
    fresh = calibrate(lm.model, lm.tokenizer, vector.scaled(2.0), tokens=2048)
    assert fresh.reused_tokens == 0 and fresh.tokens == grown.tokens
    assert [f.module for f in grown.fits] == [f.module for f in fresh.fits]
    for g, f in zip(grown.fits, fresh.fits, strict=True):  # sums in another order: equal to rounding
        assert torch.allclose(g.A, f.A, rtol=1e-6, atol=1e-9) and g.ridge == f.ridge and g.tokens == f.tokens
    again = calibrate(lm.model, lm.tokenizer, vector, tokens=2048)  # now kept whole
    assert again.reused_statistics and again.reused_tokens == again.tokens
