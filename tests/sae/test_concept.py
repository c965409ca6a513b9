"""Whether search's top hit carries the concept, and the concept's own reading when it does not."""

import json
from pathlib import Path

import pytest
import torch

from helpers import build_sae, tiny_lm
from steer_core.sae import concept
from steer_core.sae.feature import load_sae_from_disk
from steer_core.sae.labels import Context, FeatureLabel
from steer_core.sites import HookPoint
from steer_core.vectors.contrastive import contrastive_vector

CTX = (Context("the ", "thing", " here", 1.0),)


def label(feature: int, word: str | None) -> FeatureLabel:
    return FeatureLabel(feature, 0.001, 1.0, CTX, ("x",), word)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    lm = tiny_lm("llama")
    return lm, load_sae_from_disk(build_sae(tmp_path_factory.mktemp("sae") / "sae", d_sae=8))


@pytest.mark.parametrize(
    ("query", "word", "carries"),
    [("dog", " dog", True), ("dogs", "dog", True), ("Dog", " dogs", True), ("volcano", " mountain", False),
     ("robot", "bat", False), ("backer", "back", False), ("hot dog", " dog", True)],
)  # fmt: skip
def test_an_anchored_top_hit_carries_the_concept_only_when_it_is_the_words_own(world, query, word, carries) -> None:
    lm, sae = world
    found = concept.match(sae, lm.model, lm.tokenizer, query, [(label(2, word), 9.0), (label(5, "lava"), 3.0)])
    assert (found.feature, found.hit_word, found.carries) == (2, word.strip(), carries)
    assert found.nearest == (word.strip(), "lava")
    if carries:
        assert found.message() == ""
    else:  # the user is told, with the neighbours named, and what to do instead
        assert f"No feature for {query!r}" in found.message() and word.strip() in found.message()
        assert "reading" in found.message()


def test_without_an_anchored_word_the_cosine_with_the_words_reading_decides(world, monkeypatch) -> None:
    lm, sae = world
    cosines = torch.zeros(8)
    cosines[1], cosines[4] = concept.CARRIES_COSINE + 0.01, concept.CARRIES_COSINE - 0.01
    monkeypatch.setattr(concept, "reads_as", lambda *_args: cosines)
    near = concept.match(sae, lm.model, lm.tokenizer, "volcano", [(label(1, None), 1.0)])
    far = concept.match(sae, lm.model, lm.tokenizer, "volcano", [(label(4, None), 1.0)])
    assert near.carries and not far.carries and far.nearest == ("#4",)
    none = concept.match(sae, lm.model, lm.tokenizer, "volcano", [])
    assert none.feature is None and not none.carries and "none" in none.message()


def test_the_cosine_is_the_real_reading_of_the_word(world) -> None:
    lm, sae = world
    found = concept.match(sae, lm.model, lm.tokenizer, "volcano", [(label(3, None), 1.0)])
    expected = float(concept.reads_as(sae, lm.model, lm.tokenizer, "volcano")[3])
    assert found.cosine == pytest.approx(expected, abs=1e-3) and -1 <= found.cosine <= 1


def test_the_concepts_reading_is_a_contrastive_vector_at_the_point(world) -> None:
    lm, _sae = world
    positive, negative = concept.concept_prompts("  big   volcano ")
    assert all(p.endswith(" big volcano") for p in positive) and len(positive) == len(concept.TEMPLATES)
    assert len(negative) == len(concept.TEMPLATES) * len(concept.NEUTRAL)
    assert {n.rsplit(" ", 1)[1] for n in negative} == set(concept.NEUTRAL)
    point = HookPoint(1, "resid_post")
    recipe = concept.concept_recipe("volcano", point, 0.5)
    assert (recipe.source, recipe.layer, recipe.site, recipe.strengths, recipe.strength_unit) == (
        "contrastive", 1, "resid_post", (0.5,), "resid"
    )  # fmt: skip
    built = recipe.build(lm).directions[point]
    raw = contrastive_vector(lm, recipe.positive, recipe.negative, point).directions[point]
    assert torch.nn.functional.cosine_similarity(built, raw, dim=0) > 0.9999
    for bad in ("", " 42 !"):
        with pytest.raises(ValueError, match="no words"):
            concept.concept_prompts(bad)


def test_the_measured_rates_per_band_are_shown_where_measured(tmp_path: Path, monkeypatch) -> None:
    rates = {"m": {"concepts": 120, "bands": ["frequent", "rare"], "search": {"frequent": "50%", "rare": "10%"},
                   "fallback": {"frequent": "90%", "rare": "70%"}, "offered": {}}}  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(rates))
    monkeypatch.setattr(concept, "RATES_FILE", tmp_path / "r.json")
    line = concept.expected_rates("m")
    assert "120 everyday nouns" in line and "frequent words: the top hit 50%, the word's reading 90%" in line
    assert "rare words: the top hit 10%, the word's reading 70%" in line
    assert concept.expected_rates("other") == ""
    monkeypatch.setattr(concept, "RATES_FILE", tmp_path / "missing.json")
    assert concept.expected_rates("m") == ""


def test_the_stratified_concepts_are_fixed_by_their_rule() -> None:
    from scripts import concept_bands

    fixed = json.loads(concept_bands.CONCEPTS_FILE.read_text())
    concepts = fixed["concepts"]
    assert [c["band"] for c in concepts] == [b for b, _lo, _hi in concept_bands.BANDS for _ in range(40)]
    for c in concepts:
        lo, hi = next((lo, hi) for b, lo, hi in concept_bands.BANDS if b == c["band"])
        assert lo <= c["zipf"] < hi and c["kind"] in concept_bands.RULE_LEXNAMES.values()
        assert c["concept"] not in concept_bands.MEASURED_BEFORE and c["concept"] in c["family"]
        assert c["concept"].isalpha() and c["concept"].islower()
    assert len({c["concept"] for c in concepts}) == len(concepts)
    assert fixed["rule"] in concept_bands.__doc__  # the file says how it was drawn, in the script's own words


def test_a_concept_is_mentioned_by_a_whole_word_of_its_family() -> None:
    from scripts.concept_bands import forms, mentions

    assert forms("fox", {}) == ["fox", "foxes"] and forms("firefly", {}) == ["firefly", "fireflies"]
    assert forms("mouse", {"mouse": ["mice"]}) == ["mouse", "mice"] and forms("lake", {}) == ["lake", "lakes"]
    family = ["lake", "lakes", "pond", "ponds"]
    assert mentions("We swam in the Lake.", family) and mentions("two ponds", family)
    assert not mentions("Lakeside and pondering", family)
