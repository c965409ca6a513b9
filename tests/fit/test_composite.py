"""The next block's attention writer as a second candidate for a one-site vector (steer_core.fit.composite)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core import corpus
from steer_core.adapter.record import SteeringRecord
from steer_core.fit.calibrate import NEXT_MARGIN, calibrate
from steer_core.sites import HookPoint
from steer_core.steer import steering
from steer_core.vectors.vector import SteeringVector


def test_the_next_blocks_attention_writer_is_a_candidate_chosen_by_held_in_kl() -> None:
    """A one-site vector on a pre-norm model: down_proj L, o_proj L+1 and the two splitting v are fitted and
    measured, the lowest held-in KL kept; none where there is no next block, on post-norm models or when asked."""
    lm = tiny_lm("llama")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=2048)
    choice = cal.writer_choice
    own, attn = "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj"
    kl = choice["unseen_kl"]
    assert set(kl) == {own, attn, f"{own} + {attn}"}
    best = min(kl, key=kl.__getitem__)
    assert choice["used"] == (best if kl[best] < NEXT_MARGIN * kl[own] else own)
    assert " + ".join(f.module for f in cal.fits) == choice["used"]
    v_norm = float(vec.directions[HookPoint(1, "resid_post")].norm())
    if choice["used"] == f"{own} + {attn}":  # the MLP writer keeps SPLIT of v, the attention writer the rest
        assert cal.fits[0].b_unscaled_norm == pytest.approx(0.75 * v_norm)
    assert calibrate(lm.model, lm.tokenizer, vec, tokens=2048, writer="own").writer_choice == {}
    last = SteeringVector({HookPoint(2, "resid_post"): torch.randn(D_MODEL)})
    assert calibrate(lm.model, lm.tokenizer, last, tokens=1024).writer_choice == {}
    gemma = tiny_lm("gemma3")
    assert calibrate(gemma.model, gemma.tokenizer, vec, tokens=1024).writer_choice == {}


def test_the_attention_response_is_what_the_writer_outputs_differently_under_the_hook() -> None:
    from steer_core.fit.composite import mean_responses

    lm = tiny_lm("llama")
    vec = SteeringVector({HookPoint(0, "resid_post"): torch.randn(D_MODEL) * 3})
    module = "model.layers.1.self_attn.o_proj"
    got = mean_responses(lm.model, lm.tokenizer, vec, module, 1, 512, skip_bos=False, already=(0.0, 1.0))
    assert torch.equal(got[1.0], torch.zeros(D_MODEL))  # the hook against itself
    got = got[0.0]
    outs = []
    batch = next(corpus.batches(lm.tokenizer, "calibration", 512, max_doc_tokens=64, by_length=True))
    keep = batch.attention_mask.bool()
    keep[:, 0] = False
    from steer_core.activations import recording

    for steer in (False, True):
        rows: list[torch.Tensor] = []
        with torch.no_grad(), recording(lm.model, [module], lambda _n, y, rows=rows: rows.append(y), what="output"):
            if steer:
                with steering(lm.model, vec):
                    lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            else:
                lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        outs.append(rows[0][keep])
    first_batch = (outs[1] - outs[0]).mean(0)
    assert got.norm() > 0 and torch.nn.functional.cosine_similarity(got, first_batch, dim=0) > 0.9


def test_an_export_on_the_attention_writer_loads_verifies_and_says_why(tmp_path) -> None:
    """Where the attention writer serves the vector (asked for here), the adapter is an o_proj LoRA on block L+1,
    its fit is measured on the unsteered input it reads, and steering.json and the card name the choice."""
    from steer_core.adapter.card import model_card
    from steer_core.export import export

    lm = tiny_lm("llama")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3}, {"source": "test"})
    result = export(lm, vec, tmp_path / "a", calibration_tokens=1024, verify_tokens=256, writer="next")
    meta = json.loads((result.folder / "steering.json").read_text())
    assert meta["target_modules"] == ["model.layers.2.self_attn.o_proj"]
    assert meta["calibration"]["writer_choice"]["used"] == "model.layers.2.self_attn.o_proj"
    assert meta["fits"][0]["reads_steered"] is False and meta["fits"][0]["writer_layer"] == 2
    # A·x read off the unsteered pass, as the adapter reads it: close to its target 1
    assert result.report.fit_abs_error["model.layers.2.self_attn.o_proj"] < 0.25
    card = (result.folder / "README.md").read_text()
    assert "- writer: `model.layers.2.self_attn.o_proj`, asked for (`--writer next`)" in card
    meta["calibration"]["writer_choice"] = {"used": "m.o", "unseen_kl": {"m.d": 0.2, "m.o": 0.1}}
    assert "- writer: `m.o`, chosen by KL(hook ‖ adapter) per token on calibration text no fit saw (`m.d` 0.2, " in (
        model_card(SteeringRecord.from_dict(meta))
    )
