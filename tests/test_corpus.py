"""The calibration and held-out text the fits and checks read (steer_core.corpus)."""

from __future__ import annotations

import torch

from helpers import tiny_lm
from steer_core import corpus


def test_corpus_splits_are_disjoint_and_deterministic() -> None:
    cal, held = corpus.documents("calibration"), corpus.documents("heldout")
    assert len(held) > 500 and len(cal) > 4 * len(held)
    assert not {d.text for d in cal} & {d.text for d in held}
    # Generated documents are split by topic: no held-out topic was ever calibrated on, in any format.
    topics = [{d.topic for d in docs if d.source == "generated"} for docs in (cal, held)]
    assert len(topics[1]) > 150 and not topics[0] & topics[1]
    for docs in (cal, held):
        assert {d.source for d in docs} == {"generated", "wordnet", "fortunes", "jargon"}
        assert {d.format for d in docs} == set(corpus.FORMATS)
    lm = tiny_lm("llama")
    first = [b.input_ids for b in corpus.batches(lm.tokenizer, "heldout", 600)]
    again = [b.input_ids for b in corpus.batches(lm.tokenizer, "heldout", 600)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sum(int(b.attention_mask.sum()) for b in corpus.batches(lm.tokenizer, "heldout", 600)) == 600


def test_batching_by_length_keeps_the_tokens_and_cuts_padding() -> None:
    lm = tiny_lm("llama")

    def docs(batches: list[corpus.Batch]) -> dict[int, list[int]]:
        return {
            int(i): row[mask.bool()].tolist()
            for b in batches
            for i, row, mask in zip(b.doc_index, b.input_ids, b.attention_mask, strict=True)
        }

    plain = list(corpus.batches(lm.tokenizer, "calibration", 20000, max_doc_tokens=4096))
    grouped = list(corpus.batches(lm.tokenizer, "calibration", 20000, max_doc_tokens=4096, by_length=True))
    assert docs(grouped) == docs(plain)
    padded = sum(b.attention_mask.numel() for b in grouped)
    assert padded < 0.8 * sum(b.attention_mask.numel() for b in plain)


def test_chat_models_read_every_format_in_equal_measure_and_base_models_plain_text() -> None:
    chat, plain = tiny_lm("llama", chat=True), tiny_lm("llama", chat=False)
    rows = [
        (f, ids)
        for b in corpus.batches(chat.tokenizer, "heldout", 4000)
        for f, ids in zip(b.formats, b.input_ids, strict=True)
    ]
    batches = list(corpus.batches(chat.tokenizer, "heldout", 4000))
    measured = {f: 0 for f in corpus.FORMATS}
    for b in batches:
        for f, row in zip(b.formats, b.measured, strict=True):
            measured[f] += int(row.sum())
    # any budget holds each format about equally where it is measured (documents come whole, so not exactly)
    assert max(measured.values()) < 1.6 * min(measured.values()), measured
    bos = chat.tokenizer.bos_token_id
    for fmt, ids in rows:
        if fmt == "plain":  # plain text: what the tokenizer adds, here nothing (the tiny tokenizer adds no BOS)
            assert ids[0] != bos or chat.tokenizer("x").input_ids[0] == bos
        else:  # the template's own special tokens, once: not a second BOS from the tokenizer
            assert ids[0] == bos and ids[1] != bos
    system = next(d for d in corpus.documents("heldout") if d.format == "system")
    assert system.render(chat.tokenizer)[1].startswith("<bos>system: ")
    multi = next(d for d in corpus.documents("heldout") if d.format == "multiturn")
    assert multi.render(chat.tokenizer)[1].count("<bos>user: ") == 2
    assert {f for b in corpus.batches(plain.tokenizer, "heldout", 4000) for f in b.formats} == {"plain"}
    assert system.render(plain.tokenizer) == ("plain", system.text)
    fmts = [f for f, _ in corpus.prompts(chat.tokenizer, 8)]
    assert fmts == list(corpus.FORMATS) * 2
    assert all(p.endswith("<bos>assistant: ") for f, p in corpus.prompts(chat.tokenizer, 8) if f != "plain")


def test_the_writer_choice_reads_calibration_text_no_fit_saw() -> None:
    lm = tiny_lm("llama")
    seen = {int(i) for b in corpus.batches(lm.tokenizer, "calibration", 2048, max_doc_tokens=256) for i in b.doc_index}
    after = corpus.batches_after(lm.tokenizer, "calibration", 2048, 1024, max_doc_tokens=256)
    unseen = [int(i) for b in after for i in b.doc_index]
    assert unseen and not seen & set(unseen)
    assert sum(int(b.attention_mask.sum()) for b in after) >= 1024 and any(b.measured.any() for b in after)
