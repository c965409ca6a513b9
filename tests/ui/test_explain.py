from dataclasses import replace

import torch

from steer_core.adapter.record import SteeringRecord
from steer_core.check.verify import FidelityReport
from steer_core.sae.feature import SAESource
from steer_core.sae.labels import Context, FeatureLabel, FeatureLabels, TokenFeatures
from steer_core.sites import HookPoint
from steer_core.ui import explain
from steer_core.vectors.vector import SteeringVector

LABEL = FeatureLabel(7, 0.0123, 4.5, (Context("the big", " dog*", " barks", 4.5),), (" dog", "puppy", " #"))


def test_feature_card_bolds_the_firing_word_and_escapes_markdown() -> None:
    card = explain.feature_card(7, LABEL, d_sae=16, url="https://np/7")
    assert card.startswith("### Feature 7 · [Neuronpedia](https://np/7)")
    assert "…the big **dog\\***  barks…" not in card and "the big **dog\\*** barks" in card
    assert "1.23% of tokens" in card and "`dog`" in card
    assert "does not exist" in explain.feature_card(16, LABEL, d_sae=16)
    assert "never fired" in explain.feature_card(3, None, d_sae=16)
    # a word-anchored feature (train_sae.py --anchor-cos) is named by its word in the card and the summary
    named = replace(LABEL, word="dog*")
    assert explain.feature_card(7, named, d_sae=16).startswith('### Feature 7 · the word "dog\\*"')
    silent = explain.feature_card(7, replace(named, contexts=(), density=0.0), d_sae=16)
    assert 'never fired on the labelling text; its decoder row is kept on "dog\\*"' in silent
    assert named.summary().startswith('#7 (word "dog*"): promotes') and LABEL.summary().startswith("#7: promotes")


def test_tables_for_search_and_prompt() -> None:
    assert explain.search_rows([(LABEL, 2.5)]) == [[7, 2.5, "the big dog* barks", "dog puppy #"]]
    active = [TokenFeatures("a", ((7, 1.0), (2, 0.5))), TokenFeatures("b", ((7, 3.0),))]
    rows = explain.active_rows(active, FeatureLabels({}, {7: LABEL}))
    # relative to the feature's own maximum (LABEL's is 4.5); a feature without a label comes last
    assert rows[0] == [7, round(3.0 / LABEL.max_activation, 3), 3.0, "b", "dog puppy #"]
    assert rows[1][0] == 2 and rows[1][2:] == [0.5, "a", ""]


def test_sae_summary_warns_only_for_another_model() -> None:
    src = SAESource("blocks.3.hook_resid_post", HookPoint(3, "resid_post"), 32, 64, model_name="gpt2-small")
    assert "⚠️" not in explain.sae_summary(src, "gpt2")
    assert "trained on `gpt2-small`, not on `other/model`" in explain.sae_summary(src, "other/model")


def test_strength_line_and_mismatch_note() -> None:
    v = SteeringVector({HookPoint(2, "resid_post"): torch.ones(4) * 3}, {"source": "sae", "sae_model_matches": False,
                       "sae": {"model_name": "base"}, "sae_fvu_on_this_model": 0.25})  # fmt: skip
    assert explain.strength_line(v, {"blocks.2.hook_resid_post": 2.0}) == (
        "`blocks.2.hook_resid_post`: vector norm 6 = 3 × median residual norm"
    )
    assert "25.0% of the activations' variance unexplained" in explain.mismatch_note(v)


def test_fidelity_markdown_and_repo_name() -> None:
    rep = FidelityReport("portable", 2048, 0.95, 0.001, 0.5, 0.01, 0.1, 15.0, 0.5, 20, 8)
    text = explain.fidelity_markdown(rep, {"calibrate": 3.2, "verify": 10.0}, ["a note"])
    assert text.startswith("### ✅ Verified on 2048") and "**95.0%**" in text and "> a note" in text
    assert explain.fidelity_markdown(replace(rep, top1_agreement=0.5), {}, []).startswith("### ⚠️")
    # judged on the worst format, shown first: 95% overall does not hide 80% on plain text
    fmt = {"tokens": 512, "kl_hook_adapter": 0.001, "kl_hook_base": 0.5, "top1_hook_vs_base": 0.1}
    by_format = {"chat": {**fmt, "top1_agreement": 0.99, "kl_ratio": 0.002}, "plain": {**fmt, "top1_agreement": 0.8,
                 "kl_ratio": 0.05, "greedy_prefix_mean": 3.0}}  # fmt: skip
    text = explain.fidelity_markdown(replace(rep, by_format=by_format), {}, [])
    assert text.startswith("### ⚠️") and text.index("plain text (no chat template) | 80.00%") < text.index("99.00%")
    meta = {"base_model": "Org/Model-1B", "mode": "portable", "vector": {"provenance": {"source": "sae",
            "features": [{"index": 3}, {"index": 9}]}}}  # fmt: skip
    assert explain.repo_name(SteeringRecord.from_dict(meta)) == "steer-model-1b-f3-9-portable"


def test_a_report_measured_in_bfloat16_says_so_in_the_app_and_the_card() -> None:
    from steer_core.adapter.card import model_card

    rep = FidelityReport("portable", 2048, 0.95, 0.001, 0.5, 0.01, 0.1, 15.0, 0.5, 20, 8)
    assert "measured in" not in explain.fidelity_markdown(rep, {}, [])
    gpu = replace(rep, dtype="bfloat16")
    assert "| measured in | **bfloat16** (the GPU's dtype)" in explain.fidelity_markdown(gpu, {}, [])
    meta = {"base_model": "m", "mode": "portable", "fidelity": gpu.to_dict()}
    assert "| model dtype while measured | bfloat16 |" in model_card(SteeringRecord.from_dict(meta))
