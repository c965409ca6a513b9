"""Passes that compute less (steer_core.fit.passes): the LM head at measured positions, and what a map's cells at one
layer share. Each must give what the full computation gives."""

from __future__ import annotations

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core.fit import passes
from steer_core.fit.composite import mean_responses
from steer_core.fit.selection import held_in_kl, unseen_kl
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_the_head_at_measured_positions_gives_their_rows_of_the_full_logits(family: str) -> None:
    """The same hidden rows through the same weights, in a product of another shape: equal up to the order of the
    float sums (measured ≤ 1e-6 here; softcapping on gemma3)."""
    lm = tiny_lm(family)
    ids = torch.randint(3, 90, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    keep = (torch.rand(3, 11, generator=torch.Generator().manual_seed(0)) > 0.5) & mask.bool()
    with torch.no_grad():
        full = lm.model(input_ids=ids, attention_mask=mask).logits
        got = passes.logits_at(lm.model, keep, input_ids=ids, attention_mask=mask)
        again = lm.model(input_ids=ids, attention_mask=mask).logits  # the hook is gone after its context
    assert got.shape == (int(keep.sum()), full.shape[-1])
    torch.testing.assert_close(got, full[keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(again, full)


def _vectors() -> tuple[SteeringVector, SteeringVector]:
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL, generator=torch.Generator().manual_seed(3))})
    return vec, vec.scaled(4.0)


def test_cells_at_one_layer_share_the_held_in_and_unseen_prefixes() -> None:
    lm = tiny_lm("llama", layers=4)
    weak, strong = _vectors()
    writer = lm.model.get_submodule("model.layers.1.mlp.down_proj")
    params = {"model.layers.1.mlp.down_proj": (torch.randn(writer.in_features) * 0.01, torch.randn(D_MODEL))}
    cands = {"a": params}

    def both(vec: SteeringVector) -> tuple[dict[str, float], dict[str, float]]:
        held = held_in_kl(lm.model, lm.tokenizer, vec, cands, 1, False, tokens=256)
        unseen = unseen_kl(lm.model, lm.tokenizer, vec, cands, 1, False, after=512, max_doc_tokens=64, tokens=256)
        return held, unseen

    alone = both(strong)
    with passes.shared_across_cells():
        both(weak)  # the first cell records the blocks before layer 1 ...
        store = passes._KEPT.get()
        assert store and all(k[0] == "prefixes" for k in store)
        shared = both(strong)  # ... the second replays from them
    for got, want in zip(shared, alone, strict=True):
        assert got["a"] == pytest.approx(want["a"], rel=1e-5)


def test_cells_at_one_layer_share_the_unsteered_response_pass() -> None:
    lm = tiny_lm("llama", layers=4)
    weak, strong = _vectors()
    module = "model.layers.2.self_attn.o_proj"
    alone = mean_responses(lm.model, lm.tokenizer, strong, module, 2, 256, False, 64)
    with passes.shared_across_cells():
        mean_responses(lm.model, lm.tokenizer, weak, module, 2, 256, False, 64)
        shared = mean_responses(lm.model, lm.tokenizer, strong, module, 2, 256, False, 64)
        assert any(k[0] == "responses" for k in passes._KEPT.get() or {})
    assert passes._KEPT.get() is None  # nothing is kept after the map
    for s, v in alone.items():
        assert torch.equal(shared[s], v)
