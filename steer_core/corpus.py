"""The calibration and verification text: shipped with the package, offline, deterministic, in every input format.

A served instruct model reads single-turn chats, chats with a system prompt, multi-turn chats and raw text
(`/v1/completions`); a base model reads raw text. So every document of the shipped corpus (scripts/build_corpus.py:
WordNet definitions, quotations, Jargon File entries, and the embedded model's own answers on ~1,300 everyday topics)
has one of four formats, and a chat model reads it in that format:

- `chat`: a user turn and an assistant turn (the template's default system prompt, if it has one);
- `system`: the same after a system prompt of our own;
- `multiturn`: two exchanges;
- `plain`: the text alone, with whatever the tokenizer adds (BOS on Gemma, nothing on SmolLM2).

A model without a chat template reads every document as plain text. The documents of a split alternate formats, so
any token budget holds every format in equal measure. Calibration, held-out and label documents never share a text or
a generated topic: held-out text is text no fit ever saw, in every format and from every source.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from steer_core.constants import DEFAULT_MAX_DOC_TOKENS
from steer_core.template import render_chat

Split = Literal["calibration", "heldout"]
FORMATS = ("chat", "system", "multiturn", "plain")
CORPUS_FILE = "data/corpus.json.gz"

# User turns for the sources that are not chats themselves; the document becomes the assistant's answer.
ASKS = {
    "wordnet": ["What does '{head}' mean?", "Define '{head}' and use it in a sentence.", "Explain the word {head}."],
    "jargon": ["What does '{head}' mean in hacker slang?", "Tell me about the term {head}."],
    "foldoc": ["What is {head}?", "Explain {head} in computing."],
    "gcide": ["Look up these words in the dictionary for me.", "What do these words mean?"],
    "fortunes": [
        "Tell me something worth remembering.",
        "Share a quote you like.",
        "Say something funny.",
        "Can you give me a bit of wisdom for today?",
        "I need some inspiration. Anything?",
        "Tell me a joke or a clever remark.",
        "What's your favourite piece of advice?",
    ],
}
# How much each source weighs in a token budget, against 1 for the others: the model's own answers on everyday
# topics are the text most like what users send.
SOURCE_WEIGHTS = {"generated": 2.0}
FOLLOW_UPS = ["And another one?", "Thanks! One more, please.", "Now something different.", "What else?"]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in a few sentences.",
    "You are a friendly tutor who explains words and ideas.",
    "You are a witty assistant who likes quotations.",
]


@dataclass(frozen=True)
class Document:
    """One shipped text and the format it is read in. `messages` is empty for plain documents."""

    source: str
    format: str
    text: str  # the document as plain text (the format `plain`, and every format for a model without a template)
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) for the chat formats
    topic: str = ""  # what a generated document was asked about

    def render(self, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
        """(format, model input): the chat formats through the tokenizer's template, plain text otherwise."""
        if not self.messages or not is_chat(tokenizer):
            return "plain", self.text
        return self.format, _template(tokenizer, self.messages, generation=False)

    def answers(self, rendered: str) -> list[tuple[int, int]]:
        """Character spans of `rendered` that a served model would generate: the assistant turns of a chat, all of a
        plain text. The rest of a chat (template, system prompt, user turns) is prompt: its next-token predictions are
        never sampled, and a fixed default system prompt would make them look easy."""
        if rendered == self.text:
            return [(0, len(rendered))]
        spans, cursor = [], 0
        for role, content in self.messages:
            start = rendered.find(content, cursor)
            if start < 0:  # a template that rewrites the content: score the rest, as plain text
                return [(cursor, len(rendered))]
            cursor = start + len(content)
            if role == "assistant":
                spans.append((start, cursor))
        return spans

    def prompt(self, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
        """(format, generation prompt): the conversation up to its last assistant turn, or a plain text's first half."""
        if not self.messages or not is_chat(tokenizer):
            words = self.text.split()
            return "plain", " ".join(words[: max(3, len(words) // 2)])
        return self.format, _template(tokenizer, self.messages[:-1], generation=True)


def is_chat(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def formats_for(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The formats a model with this tokenizer is served in, so the ones it is calibrated and verified on."""
    return FORMATS if is_chat(tokenizer) else ("plain",)


def _template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[tuple[str, str]], *, generation: bool) -> str:
    chat = [{"role": role, "content": content} for role, content in messages]
    return render_chat(tokenizer, chat, generation=generation)


@cache
def _corpus() -> dict:
    raw = files("steer_core").joinpath(CORPUS_FILE).read_bytes()
    return json.loads(gzip.decompress(raw))


def sources() -> dict[str, str]:
    """Each source's provenance and licence, as recorded by the corpus build."""
    return dict(_corpus()["sources"])


def corpus_info() -> dict[str, str]:
    doc = _corpus()
    return {
        "built_by": doc["built_by"],
        "splits": doc["splits"],
        "sha256_of_documents": doc["sha256_of_documents"],
        "sources": "; ".join(f"{k}: {v}" for k, v in doc["sources"].items()),
        "formats": ", ".join(FORMATS) + " (instruct models); plain (base models)",
    }


def _head(text: str) -> str:
    return text.split(":", 1)[0] if ":" in text[:60] else text.split(".", 1)[0][:40]


def document_from(item: dict, fmt: str, partner: dict, rng: random.Random) -> Document:
    """A corpus item read in `fmt` (a generated one keeps its own); a multi-turn chat answers with `partner` next."""
    if "messages" in item:  # generated: a conversation in its own format
        said = tuple((m["role"], m["content"]) for m in item["messages"])
        text = "\n\n".join(content for role, content in said if role != "system")
        return Document(item["source"], item["format"], text, said, item.get("topic", ""))
    text = item["text"]
    if item["source"] == "generated" or fmt == "plain":
        return Document(item["source"], "plain", text, topic=item.get("topic", ""))
    ask = rng.choice(ASKS.get(item["source"], ASKS["fortunes"])).format(head=_head(text))
    turns: tuple[tuple[str, str], ...] = (("user", ask), ("assistant", text))
    if fmt == "system":
        turns = (("system", rng.choice(SYSTEM_PROMPTS)), *turns)
    elif fmt == "multiturn":
        turns = (*turns, ("user", rng.choice(FOLLOW_UPS)), ("assistant", partner.get("text", text)))
    return Document(item["source"], fmt, text, turns)


@cache
def documents(split: Split) -> tuple[Document, ...]:
    """The split's documents: formats in turn, and within each format the sources in turn, each source shuffled.

    Generated documents keep the format they were generated in; the others take the formats in turn within their
    source, a multi-turn one answering its follow-up with the next document of that source.
    """
    rng = random.Random(0)
    by_source: dict[str, list[dict]] = {}
    for item in _corpus()["documents"]:
        if item["split"] == split:
            by_source.setdefault(item["source"], []).append(item)
    pools: dict[str, dict[str, list[Document]]] = {f: {} for f in FORMATS}
    for source, group in by_source.items():
        for i, item in enumerate(group):
            doc = document_from(item, item.get("format") or FORMATS[i % len(FORMATS)], group[(i + 1) % len(group)], rng)
            pools[doc.format].setdefault(source, []).append(doc)
    by_format = []
    for sources in pools.values():
        for docs in sources.values():
            rng.shuffle(docs)
        by_format.append(_interleave(list(sources.values())))
    return tuple(_interleave(by_format))


def _interleave(lists: list[list[Document]]) -> list[Document]:
    """a0 b0 c0 a1 b1 c1 ...: every prefix holds each list in equal measure while they last."""
    return [docs[i] for i in range(max(map(len, lists), default=0)) for docs in lists if i < len(docs)]


def split_texts(split: Split) -> list[str]:
    """The split's documents as plain text (for features' top contexts, which show text, not templates)."""
    return [d.text for d in documents(split)]


def prompts(tokenizer: PreTrainedTokenizerBase, n: int) -> list[tuple[str, str]]:
    """`n` held-out (format, generation prompt) pairs, the model's formats in turn."""
    wanted = formats_for(tokenizer)
    pools: dict[str, list[str]] = {f: [] for f in wanted}
    for doc in documents("heldout"):
        fmt, prompt = doc.prompt(tokenizer)
        pools[fmt].append(prompt)
    return [(wanted[i % len(wanted)], pools[wanted[i % len(wanted)]][i // len(wanted)]) for i in range(n)]


def encode(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int, *, plain: bool = True) -> Tensor:
    """Token ids of a rendered text. A chat template writes its own special tokens (Gemma's <bos> too), as a chat
    endpoint tokenizes it; plain text takes whatever the tokenizer adds, as a completions endpoint does."""
    return tokenizer(text, add_special_tokens=plain, return_tensors="pt").input_ids[0][:max_tokens]


def scored_positions(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> Tensor:
    """Bool[Tensor, "seq"]: of tokens with these character offsets, the positions whose next-token prediction is
    generated text (`Document.answers`): those followed by a token of an answer span or by the token that ends one
    (end of turn), and the last position when it is inside a span."""
    inside = [hi > lo and any(lo < end and start < hi for start, end in spans) for lo, hi in offsets]
    target = list(inside)
    for i in range(1, len(inside)):
        if inside[i - 1] and not inside[i]:
            target[i] = True  # the end-of-turn token: the model must stop
    scored = torch.zeros(len(offsets), dtype=torch.bool)
    if len(offsets):
        scored[:-1] = torch.tensor(target[1:], dtype=torch.bool)
        scored[-1] = inside[-1]
    return scored


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor  # Long[Tensor, "batch seq"], right-padded
    attention_mask: Tensor  # Long[Tensor, "batch seq"]
    doc_index: Tensor  # Long[Tensor, "batch"]: the document's index within its split
    formats: tuple[str, ...] = ()  # per row: the format it was read in
    sources: tuple[str, ...] = ()  # per row: the document's source
    scored: Tensor | None = None  # Bool[Tensor, "batch seq"]: positions whose prediction is generated text

    @property
    def measured(self) -> Tensor:
        """Bool[Tensor, "batch seq"]: where fidelity is measured, the answer positions (all real tokens if unknown)."""
        return self.attention_mask.bool() if self.scored is None else self.scored & self.attention_mask.bool()


def batches(
    tokenizer: PreTrainedTokenizerBase,
    split: Split,
    max_tokens: int,
    *,
    max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS,
    batch_size: int = 8,
    by_length: bool = False,
) -> Iterator[Batch]:
    """Tokenized documents of one split, each in its format, until `max_tokens` real tokens have been yielded.

    by_length batches texts of similar length together: the same texts and tokens with far less padding (it was
    42% of the calibration pass and 52% of verification's), for passes whose result does not depend on order.
    """
    if max_tokens <= 0:
        raise ValueError(f"token budget must be positive, got {max_tokens}")
    items = _texts_until(tokenizer, split, max_tokens, max_doc_tokens)
    if by_length:
        items = sorted(items, key=lambda item: len(item[1]))
    yield from _in_batches(tokenizer, items, batch_size)


def batches_after(
    tokenizer: PreTrainedTokenizerBase,
    split: Split,
    after: int,
    max_tokens: int,
    *,
    max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS,
    batch_size: int = 8,
) -> list[Batch]:
    """Documents of `split` that `batches(split, after, max_doc_tokens=...)` does not hold, about `max_tokens` real
    tokens of them, batched by length: text the fits made on those first `after` tokens never saw."""
    seen = {item[0] for item in _texts_until(tokenizer, split, after, max_doc_tokens)}
    items: list[Item] = []
    total = 0
    for item in _texts_until(tokenizer, split, after + 4 * max_tokens, max_doc_tokens):
        if item[0] in seen:
            continue
        items.append(item)
        total += len(item[1])
        if total >= max_tokens:
            break
    if not items:
        raise ValueError(f"the {split} text holds nothing past its first {after} tokens; calibrate on fewer tokens")
    items.sort(key=lambda item: len(item[1]))
    return list(_in_batches(tokenizer, items, batch_size))


Item = tuple[int, Tensor, str, str, Tensor]  # (index in split, token ids, format, source, scored positions)


def growth(
    tokenizer: PreTrainedTokenizerBase,
    split: Split,
    have: int,
    want: int,
    *,
    max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS,
    batch_size: int = 8,
) -> tuple[list[Batch], list[Batch]] | None:
    """What turns the text of `batches(split, have)` into that of `batches(split, want)`: (batches to add, batches to
    take away), each by length; None where the smaller is not a prefix of the larger (a budget small enough to cut
    documents shorter). The documents are picked in the same order at any budget, but the last one of `have` is cut
    to fit it: it is taken away and added whole."""
    small = _texts_until(tokenizer, split, have, max_doc_tokens)
    large = _texts_until(tokenizer, split, want, max_doc_tokens)
    if not small or len(large) < len(small):
        return None
    same = [a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(small[:-1], large, strict=False)]
    last, whole = small[-1], large[len(small) - 1]
    if not all(same) or last[0] != whole[0] or not torch.equal(last[1], whole[1][: len(last[1])]):
        return None
    cut = [] if len(last[1]) == len(whole[1]) else [last]
    added = sorted(large[len(small) - 1 if cut else len(small) :], key=lambda item: len(item[1]))
    return list(_in_batches(tokenizer, added, batch_size)), list(_in_batches(tokenizer, cut, batch_size))


def _in_batches(tokenizer: PreTrainedTokenizerBase, items: Sequence[Item], batch_size: int) -> Iterator[Batch]:
    """The items collated `batch_size` at a time, in the order given, padded with the tokenizer's pad id (else 0)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(items), batch_size):
        yield collate(items[start : start + batch_size], pad)


def _texts_until(tokenizer: PreTrainedTokenizerBase, split: Split, max_tokens: int, max_doc_tokens: int) -> list[Item]:
    """Documents until the budget is spent, the next one always from the format, then the source, that has had the
    fewest generated tokens so far (by SOURCE_WEIGHTS): formats and sources differ in length (a two-turn chat is three
    plain texts, a Jargon File entry five WordNet definitions), and each format should weigh the same."""
    queues: dict[str, dict[str, list[tuple[int, Document]]]] = {}
    for i, doc in enumerate(documents(split)):
        queues.setdefault(doc.render(tokenizer)[0], {}).setdefault(doc.source, []).append((i, doc))
    used = {f: dict.fromkeys(sources, 0) for f, sources in queues.items()}
    # A small budget still holds several formats, and a document still reaches its answer.
    per_doc = min(max_doc_tokens, max(128, max_tokens // len(queues)))
    items: list[Item] = []
    total = 0
    while total < max_tokens:
        open_formats = [f for f, sources in queues.items() if any(sources.values())]
        if not open_formats:
            break
        fmt = min(open_formats, key=lambda f: sum(used[f].values()))
        source = min((s for s, q in queues[fmt].items() if q), key=lambda s: used[fmt][s] / SOURCE_WEIGHTS.get(s, 1.0))
        i, doc = queues[fmt][source].pop(0)
        text = doc.render(tokenizer)[1]
        # as encode() tokenizes it, with character offsets to find the answers
        enc = tokenizer(text, add_special_tokens=fmt == "plain", return_offsets_mapping=True)
        n = min(per_doc, max_tokens - total, len(enc.input_ids))
        if n == 0:
            continue
        ids = torch.tensor(enc.input_ids[:n], dtype=torch.long)
        scored = scored_positions(enc.offset_mapping[:n], doc.answers(text))
        items.append((i, ids, fmt, source, scored))
        # Balanced on generated positions (a chat's answers), so each format weighs the same where it is measured.
        used[fmt][source] += int(scored.sum())
        total += len(ids)
    return items


def collate(items: Sequence[tuple[int, Tensor] | Item], pad: int) -> Batch:
    """Right-pad (index, token ids[, format, source, scored]) items into one batch with its attention mask."""
    width = max(len(item[1]) for item in items)
    input_ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    scored = torch.zeros((len(items), width), dtype=torch.bool)
    for row, item in enumerate(items):
        input_ids[row, : len(item[1])] = item[1]
        mask[row, : len(item[1])] = 1
        scored[row, : len(item[1])] = item[4] if len(item) > 4 else True
    tags = [item[2:4] for item in items]
    formats = tuple(str(t[0]) for t in tags if t)
    sources = tuple(str(t[1]) for t in tags if len(t) > 1)
    return Batch(input_ids, mask, torch.tensor([item[0] for item in items]), formats, sources, scored)
