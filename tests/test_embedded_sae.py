"""The shipped SAE (scripts/train_sae.py) on the embedded SmolLM2: it loads in sae_lens, reconstructs held-out
activations as well as its quality.json says, and its labels find features that export to faithful adapters."""

import gzip
import json

import pytest
import torch

from steer_core.activations import text_activations
from steer_core.export import export
from steer_core.feature import EMBEDDED_SAES, embedded_sae_for, load_sae_from_disk
from steer_core.labels import labels_for, load_labels
from steer_core.recipe import VectorRecipe

SPEC = EMBEDDED_SAES["smollm2-135m-instruct-res-L15"]


def _quality() -> dict:
    return json.loads((SPEC.path / "quality.json").read_text())


def test_shipped_sae_loads_in_sae_lens_with_its_hook() -> None:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(SPEC.path))
    assert sae.cfg.d_in == 576
    assert sae.cfg.metadata.hook_name == "blocks.15.hook_resid_post"
    assert sae.cfg.metadata.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 1000 <= sae.cfg.d_sae <= 8192
    assert embedded_sae_for("smollm2-135m-instruct") == SPEC
    assert embedded_sae_for("HuggingFaceTB/SmolLM2-135M-Instruct") == SPEC
    assert embedded_sae_for("gemma-3-270m") is None


def test_quality_report_meets_the_goals_it_claims() -> None:
    q = _quality()
    assert q["hook_name"] == "blocks.15.hook_resid_post"
    assert q["fvu"] <= 0.2 and q["mean_l0"] <= 64
    # Dead in training (no firing in the trainer's last window) is under the 10% goal; never firing on only 52k
    # held-out tokens is not, and the report says so (16.3%).
    cfg = json.loads((SPEC.path / "cfg.json").read_text())
    assert cfg["metadata"]["num_dead_features"] == q["dead_features_training"] < 0.1 * q["d_sae"]
    assert q["dead_fraction"] == round(q["dead_features"] / q["d_sae"], 4)
    assert q["ce_loss_spliced"] >= q["ce_loss_clean"] > 0


def test_labels_cover_every_feature() -> None:
    labels = load_labels(SPEC.labels_path)
    sae = load_sae_from_disk(SPEC.path)
    assert set(labels.labels) == set(range(sae.source.d_sae))
    live = [label for label in labels.labels.values() if label.contexts]
    # labelled on the same held-out text as quality.json (batched differently: a feature at the threshold may flip)
    assert abs(len(live) - (sae.source.d_sae - _quality()["dead_features"])) <= 5
    assert all(len(label.promoted) == 10 for label in labels.labels.values())


@pytest.mark.e2e
def test_reconstruction_on_heldout_text_matches_the_report(smollm2) -> None:
    sae = load_sae_from_disk(SPEC.path)
    with gzip.open(SPEC.path / "heldout.json.gz", "rt", encoding="utf-8") as f:
        # every 5th, so all three sources are in: FVU is relative to the subset's own variance
        texts = [t["text"] for t in json.load(f)["texts"]][::5]
    x, _, _ = text_activations(
        smollm2.model, smollm2.tokenizer, sae.source.point, "resid", texts, max_tokens_per_text=256
    )
    with torch.no_grad():
        recon = sae.sae(x)
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    # A fifth of the held-out split: its FVU scatters around the full split's.
    assert fvu <= _quality()["fvu"] + 0.03, fvu
    assert labels_for(sae, smollm2.model, smollm2.tokenizer).source["sae"] == SPEC.name


@pytest.mark.e2e
def test_a_searched_feature_exports_to_a_faithful_adapter(smollm2, tmp_path) -> None:
    labels = load_labels(SPEC.labels_path)
    label, _ = labels.search("love")[0]
    assert sum(c.token.strip().lower() == "love" for c in label.contexts) >= 3, label.summary()
    assert label.feature == SPEC.default_feature
    vector = VectorRecipe("sae", (SPEC.default_strength,), "resid", features=(label.feature,)).build(smollm2)
    assert vector.provenance["sae_model_matches"]
    report = export(smollm2, vector, tmp_path / "love", verify_tokens=2048).report
    # measured 97.2% / 0.0047 (feature 639 at 0.5 × the residual norm)
    assert report.top1_agreement >= 0.95, report.summary()
    assert report.kl_ratio <= 0.01, report.summary()


@pytest.mark.e2e
def test_search_finds_the_concept_through_other_forms_of_the_word(smollm2) -> None:
    """Exact-token search needs the word itself among a feature's top contexts; search by meaning reads the model's
    own embedding neighbours and what the features fire on and write. (The shipped SAE has few everyday concepts
    to find: `scripts.concept_benchmark`.)"""
    from steer_core.search import search

    labels, sae = load_labels(SPEC.labels_path), load_sae_from_disk(SPEC.path)
    assert labels.search("loving", 1)[0][0].feature != SPEC.default_feature  # exact-token search misses it
    for query in ("love", "loving", "loved", "lovely"):
        top = search(labels, sae, smollm2.model, smollm2.tokenizer, query, k=3)
        assert top[0][0].feature == SPEC.default_feature, (query, [(label.feature, s) for label, s in top])
