import dataclasses
from pathlib import Path

import pytest
import torch

from helpers import build_sae, tiny_lm
from steer_core.activations import SINK_NORM, not_sinks, site_module_name, text_activations
from steer_core.hooks import retuple, untuple
from steer_core.sae.feature import load_sae_from_disk
from steer_core.sae.labels import (
    Context,
    FeatureLabel,
    FeatureLabels,
    TokenFeatures,
    active_features,
    compute_labels,
    known_labels,
    load_labels,
    promoted_tokens,
    same_word,
    save_labels,
    strongest_on,
    term_score,
)
from steer_core.sites import HookPoint

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Cats sleep most of the day and hunt at night.",
    "A cup of coffee in the morning helps me think.",
    "Rivers flow to the sea, and the sea never fills.",
]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", layers=3)


@pytest.fixture(scope="module")
def sae(tmp_path_factory: pytest.TempPathFactory):
    return load_sae_from_disk(build_sae(tmp_path_factory.mktemp("sae") / "sae", d_sae=24))


def test_text_activations_skip_position_zero_and_index_rows(lm) -> None:
    acts, ids, where = text_activations(lm.model, lm.tokenizer, HookPoint(1, "resid_post"), "resid", TEXTS[:2])
    assert len(acts) == len(where) == sum(len(s) - 1 for s in ids)
    assert all(pos >= 1 for _, pos in where)
    # the same activations as one text run alone (padding must not leak in)
    alone, _, _ = text_activations(lm.model, lm.tokenizer, HookPoint(1, "resid_post"), "resid", TEXTS[1:2])
    rows = [i for i, (t, _) in enumerate(where) if t == 1]
    torch.testing.assert_close(acts[rows], alone, atol=1e-5, rtol=1e-4)


def test_not_sinks_flags_rows_far_above_the_median_norm() -> None:
    acts = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    acts[[3, 70]] *= 50
    keep = not_sinks(acts, SINK_NORM * float(acts.norm(dim=-1).median()))
    assert not keep[3] and not keep[70] and int(keep.sum()) == 198
    assert bool(not_sinks(acts, limit=1e9).all())


def test_labels_leave_out_attention_sinks(lm, sae) -> None:
    """Plain text on SmolLM2 makes position 1 a sink (up to 130x the median norm); counted, it was the top context of
    4,443 of 7,370 labelled features. Here position 1 is made one by scaling the residual there."""
    module = lm.model.get_submodule(site_module_name(lm.model, sae.source.point, "resid"))

    def scale(_module, _args, output):
        hidden = untuple(output).clone()
        hidden[:, 1] *= 100.0
        return retuple(output, hidden)

    handle = module.register_forward_hook(scale)
    try:
        acts, _, where = text_activations(lm.model, lm.tokenizer, sae.source.point, "resid", TEXTS)
        kept, _, kept_where = text_activations(
            lm.model, lm.tokenizer, sae.source.point, "resid", TEXTS, drop_sinks=True
        )  # fmt: skip
        labels = compute_labels(sae, lm.model, lm.tokenizer, TEXTS, contexts=3)
    finally:
        handle.remove()
    assert {pos for _, pos in where} - {pos for _, pos in kept_where} == {1}
    torch.testing.assert_close(kept, acts[[i for i, w in enumerate(where) if w in set(kept_where)]])
    contexts = [c for label in labels.labels.values() for c in label.contexts]
    assert contexts and all(c.left for c in contexts)  # a position-1 context has nothing on its left
    assert labels.source["tokens"] == len(kept)


def test_labels_hold_each_features_true_top_contexts(lm, sae) -> None:
    labels = compute_labels(sae, lm.model, lm.tokenizer, TEXTS, contexts=3)
    acts, ids, where = text_activations(lm.model, lm.tokenizer, sae.source.point, "resid", TEXTS)
    with torch.no_grad():
        feats = sae.sae.encode(acts)
    assert set(labels.labels) == set(range(24))
    for f in range(24):
        label = labels[f]
        fired = feats[:, f] > 0
        assert label.density == pytest.approx(float(fired.float().mean()), abs=1e-6)
        if not fired.any():
            assert label.contexts == ()
            continue
        best = int(feats[:, f].argmax())
        assert label.max_activation == pytest.approx(float(feats[best, f]), abs=1e-3)
        text_i, pos = where[best]
        assert label.contexts[0].token == lm.tokenizer.decode(ids[text_i][pos : pos + 1])
        values = [c.activation for c in label.contexts]
        assert values == sorted(values, reverse=True)


def test_a_sentence_in_two_texts_is_one_context(lm, sae) -> None:
    """The labels split can hold one dictionary paragraph in two documents: a feature card lists it once."""
    once = compute_labels(sae, lm.model, lm.tokenizer, TEXTS, contexts=3)
    twice = compute_labels(sae, lm.model, lm.tokenizer, TEXTS + TEXTS, contexts=3)
    for f, label in twice.labels.items():
        rendered = [c.render() for c in label.contexts]
        assert len(rendered) == len(set(rendered)), rendered
        # the same contexts as the text seen once: duplicates are skipped, not the next-best distinct ones
        assert [c.render() for c in once[f].contexts] == rendered


def test_promoted_tokens_read_the_unembedding(lm) -> None:
    head = lm.model.get_output_embeddings().weight.detach()
    token = 40
    top = promoted_tokens(lm.model, lm.tokenizer, head[token : token + 1] * 10, k=3)
    assert top[0][0] == lm.tokenizer.decode([token])


def _label(
    feature: int, promoted: tuple[str, ...], token: str = "x", density: float = 0.001, left: str = "the "
) -> FeatureLabel:
    ctx = (Context(left, token, " ran", 2.0),)
    return FeatureLabel(feature, density, 2.0, ctx, promoted)


def test_search_ranks_fired_on_then_promoted_then_context_words_and_penalizes_dense_features() -> None:
    labels = FeatureLabels(
        {"sae": "synthetic"},
        {
            0: _label(0, ("cat", "kitten")),
            1: _label(1, (" dog", "puppy")),
            2: _label(2, ("run",), token=" dog"),
            3: _label(3, (" dog", "puppy"), density=0.5),
            4: _label(4, ("run",), left="the dog "),
        },
    )
    ranked = [label.feature for label, _ in labels.search("Dog")]
    assert ranked[:3] == [2, 1, 4]
    assert ranked[-1] == 3
    assert 0 not in ranked
    # a feature named by its word (an anchored SAE's) leads, whatever its contexts; "dogs" is another form of it
    labels.labels[5] = dataclasses.replace(_label(5, ("run",)), word="dog")
    assert labels.search("Dog")[0][0].feature == labels.search("dogs")[0][0].feature == 5
    # a word fragment is not a form of the word it starts ("for" and "forest", "fin" and "finance"): with plain
    # prefix matching feature 6 came first for "forest", as "fore" did on the real SAE
    labels.labels[6] = dataclasses.replace(_label(6, ("forest",), token=" forest"), word="for")
    labels.labels[7] = dataclasses.replace(_label(7, ("run",)), word="forest")
    assert [label.feature for label, _ in labels.search("forest")][:2] == [7, 6]
    assert term_score(dataclasses.replace(_label(6, ("run",)), word="for"), "forest") == 0
    with pytest.raises(ValueError, match="no words"):
        labels.search("  !! ")
    with pytest.raises(KeyError, match="feature 9"):
        labels[9]


def test_labels_round_trip_through_gzip(tmp_path: Path, lm, sae) -> None:
    labels = compute_labels(sae, lm.model, lm.tokenizer, TEXTS[:2], contexts=2)
    labels.labels[0] = dataclasses.replace(labels.labels[0], word="fox")
    path = save_labels(labels, tmp_path / "labels.json.gz")
    assert load_labels(path) == labels and load_labels(path)[0].word == "fox"
    assert not list(tmp_path.glob("*.tmp"))


def test_active_features_per_token_of_the_prompt_only(lm, sae) -> None:
    active = active_features(sae, lm.model, lm.tokenizer, "hello", k=3)
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    ids = lm.tokenizer(text).input_ids
    # the template's role markers are not the prompt: only its own five characters are reported
    assert [t.token for t in active] == list("hello")
    acts, _, where = text_activations(lm.model, lm.tokenizer, sae.source.point, "resid", [text])
    start = text.rindex("hello")
    spans = lm.tokenizer(text, return_offsets_mapping=True).offset_mapping
    mine = [i for i, (_t, pos) in enumerate(where) if start <= spans[pos][0] < start + 5]
    with torch.no_grad():
        feats = sae.sae.encode(acts)[mine]
    assert len(ids) - 1 == len(where) and len(mine) == 5
    for row, tok in zip(feats, active, strict=True):
        if tok.features:
            assert tok.features[0][0] == int(row.argmax())
    strongest = strongest_on(active, k=2)
    assert strongest[0].activation == pytest.approx(float(feats.max()), abs=1e-3)
    assert strongest[0].token == active[int(feats.max(-1).values.argmax())].token
    with pytest.raises(ValueError, match="empty"):
        active_features(sae, lm.model, lm.tokenizer, "   ")


def test_strongest_on_ranks_by_own_maximum_and_leaves_out_dense_features() -> None:
    active = [
        TokenFeatures("the", ((0, 9.0), (1, 2.0))),
        TokenFeatures(" dog", ((2, 3.0), (1, 1.0))),
    ]
    labels = FeatureLabels(
        {"sae": "synthetic"}, {0: _label(0, ("a",), density=0.6), 1: _label(1, ("b",)), 2: _label(2, ("c",))}
    )
    labels.labels[1] = FeatureLabel(1, 0.01, 20.0, labels.labels[1].contexts, ("b",))
    labels.labels[2] = FeatureLabel(2, 0.01, 3.0, labels.labels[2].contexts, ("c",))
    hits = strongest_on(active, 5, labels)
    assert [(h.feature, h.token, h.relative) for h in hits] == [(2, " dog", 1.0), (1, "the", 0.1)]
    assert [h.feature for h in strongest_on(active, 5)] == [0, 2, 1]  # no labels: raw activation


def test_a_context_renders_on_one_line() -> None:
    from steer_core.sae.labels import Context, FeatureLabel

    context = Context("China\nMont Blanc: the highest", " mountain", " peak\nin the Alps", 9.0)
    assert context.render() == "China ⏎ Mont Blanc: the highest** mountain** peak ⏎ in the Alps"
    label = FeatureLabel(7, 0.01, 9.0, (context,), ("a",))
    assert "\n" not in label.summary()


def test_same_word_takes_inflections_not_fragments() -> None:
    assert same_word("dog", "dogs") and same_word("raining", "rain") and same_word("baked", "bake")
    assert not same_word("dog", "dog")  # the same word is an exact match, scored as one
    assert not same_word("for", "forest") and not same_word("fin", "finances") and not same_word("mus", "music")
    assert not same_word("be", "bed")  # under 3 letters nothing is a form
    assert same_word("bake", "baked") and not same_word("ten", "tend") and not same_word("corn", "corner")


def test_an_sae_vector_names_its_features_where_labels_are_at_hand(tmp_path: Path, lm) -> None:
    """Shipped labels reach the vector's provenance and so the adapter's card; an SAE without them gets no label,
    and building the vector computes none (a minute on a registry SAE)."""
    from steer_core.adapter.card import model_card
    from steer_core.adapter.record import SteeringRecord, VectorRecord
    from steer_core.constants import LABELS_FILENAME
    from steer_core.vectors.recipe import VectorRecipe

    folder = build_sae(tmp_path / "sae", d_sae=24)
    recipe = VectorRecipe("sae", (2.0,), "abs", features=(3, 5), path=str(folder))
    assert all("label" not in f for f in recipe.build(lm).provenance["features"])
    assert known_labels(load_sae_from_disk(folder), lm.model) is None
    ctx = (Context("a ", "fox", " ran", 1.0),)
    labels = FeatureLabels({}, {3: FeatureLabel(3, 0.01, 1.0, ctx, (" fox", " Fox", "fox", " hound"), word=None),
                                5: FeatureLabel(5, 0.01, 1.0, ctx, (" x",), word="volcano")})  # fmt: skip
    save_labels(labels, folder / LABELS_FILENAME)
    vector = recipe.build(lm)
    assert [f.get("label") for f in vector.provenance["features"]] == ["fox Fox hound", "volcano"]
    record = SteeringRecord("exact", "tiny", VectorRecord(("blocks.1.hook_resid_post",), {}, vector.provenance))
    assert "labelled `volcano`" in model_card(record)
