"""Search by meaning on a tiny word-level model whose embedding puts "puppy" next to "dog"."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers import D_MODEL, build_sae, tiny_model
from steer_core.activations import text_activations
from steer_core.sae import search
from steer_core.sae.feature import load_sae_from_disk
from steer_core.sae.labels import Context, FeatureLabel, FeatureLabels

WORDS = ["I", "love", "my", "Tell", "me", "about", ".", "We", "talked", "for", "hours", "There", "was", "in", "the"]
WORDS += ["story", "dog", "puppy", "cat", "car", "rain", "music", "happy", "blue", "table"]
DOG_FEATURE = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=g))
        emb[vocab["puppy"]] = emb[vocab["dog"]] + 0.3 * torch.randn(D_MODEL, generator=g)  # near-synonyms
        sae_path = build_sae(tmp_path_factory.mktemp("sae") / "sae", d_sae=8)
        sae = load_sae_from_disk(sae_path)
        head = model.get_output_embeddings().weight
        head[vocab["dog"]] = 4.0 * sae.decoder[DOG_FEATURE] / sae.decoder[DOG_FEATURE].norm() * D_MODEL**0.5
    # A random SAE fires on everything alike, so its probe activations only add noise: count them against a maximum
    # far above them, and let the test decide by what the features write.
    ctx = (Context("the ", "table", " here", 1e4),)
    labels = FeatureLabels({"sae": "synthetic"}, {f: FeatureLabel(f, 0.001, 1e4, ctx, ("x",)) for f in range(8)})
    return model, tokenizer, sae, labels


def test_neighbours_come_from_the_models_own_embedding(world) -> None:
    model, tokenizer, _sae, _labels = world
    near = search.neighbours(model, tokenizer, "puppy")
    assert next(iter(near.items())) == ("puppy", 1.0)
    assert "dog" in near and near["dog"] > 0.9
    assert "car" not in near or near["car"] < near["dog"]
    assert search.neighbours(model, tokenizer, "zebra") == {"zebra": 1.0}  # unknown to the model: the word alone


def test_a_synonym_finds_the_feature_that_writes_the_word(world, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer, sae, labels = world
    # the unembedding route alone: a random model reads every word alike, so its readings match rows by chance
    monkeypatch.setattr(search, "READS_WEIGHT", 0.0)
    for query in ("dog", "puppy", "Puppy!"):
        hits = search.search(labels, sae, model, tokenizer, query, k=3)
        assert hits[0][0].feature == DOG_FEATURE, (query, hits)
    lens = search.lens_for(model, sae)
    assert search.lens_for(model, sae) is lens  # computed once per SAE and model
    # the z-scores from the unembedding's covariance equal those from the full logits
    logits = lens.normed @ model.get_output_embeddings().weight.detach().T
    torch.testing.assert_close(lens.mean, logits.mean(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lens.std, logits.std(-1, correction=0), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no words"):
        search.search(labels, sae, model, tokenizer, " 42 !")


def test_dense_features_rank_below_specific_ones(world) -> None:
    model, tokenizer, sae, labels = world
    dense = FeatureLabels(labels.source, dict(labels.labels))
    dense.labels[DOG_FEATURE] = FeatureLabel(DOG_FEATURE, 0.9, 1e4, labels.labels[0].contexts, ("x",))
    plain = search.search(labels, sae, model, tokenizer, "dog", k=8)
    ranked = search.search(dense, sae, model, tokenizer, "dog", k=8)
    score = {label.feature: s for label, s in plain}
    assert {label.feature: s for label, s in ranked}.get(DOG_FEATURE, 0) < score[DOG_FEATURE] / 9


def test_probe_sentences_read_the_words_last_token(world, tmp_path: Path) -> None:
    model, tokenizer, sae, labels = world
    fired = search.fires_on(sae, labels, model, tokenizer, {"dog": 1.0})
    assert fired.shape == (8,) and (fired >= 0).all()


def test_a_feature_that_writes_the_words_reading_scores_cosine_one(world) -> None:
    """What the model reads "puppy" as at the SAE's layer: its activation in the probe sentences less the other
    tokens'. A decoder row set to exactly that is found at cosine 1."""
    model, tokenizer, sae, labels = world
    texts = [probe.format(w="puppy") for probe in search.PROBES]
    acts, ids, where = text_activations(model, tokenizer, sae.source.point, "resid", texts, drop_sinks=True)
    on = torch.tensor([ids[t][pos] == tokenizer.convert_tokens_to_ids("puppy") for t, pos in where])
    reading = acts[on].mean(0) - acts[~on].mean(0)
    before = search.reads_as(sae, model, tokenizer, "puppy")
    assert before.shape == (8,) and before.abs().max() <= 1 + 1e-5
    row = sae.sae.W_dec.data[5].clone()
    try:
        sae.sae.W_dec.data[5] = reading * 3.0
        after = search.reads_as(sae, model, tokenizer, "puppy")
        hits = dict((label.feature, s) for label, s in search.search(labels, sae, model, tokenizer, "puppy", k=8))
    finally:
        sae.sae.W_dec.data[5] = row
    assert after[5] > 0.999
    torch.testing.assert_close(after[:5], before[:5])
    assert hits[5] >= search.READS_WEIGHT * (1 - search.COS_FLOOR) / (1 + 10 * 0.001) - 1e-3
