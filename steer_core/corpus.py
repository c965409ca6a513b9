"""The calibration and verification text: shipped with the package, offline, deterministic.

Every 5th text is held out: calibration never sees it, verification uses only it. For chat models every text is
wrapped in the model's chat template (a user turn and an assistant turn), since that is what a served adapter sees.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

HELDOUT_EVERY = 5
Split = Literal["calibration", "heldout"]

# User turns for chat-formatting; the shipped texts (quotations, jokes, definitions) become the assistant turns.
USER_PROMPTS = [
    "Tell me something worth remembering.",
    "Share a quote you like.",
    "Can you give me a bit of wisdom for today?",
    "Say something funny.",
    "What is a good saying about life?",
    "I need some inspiration. Anything?",
    "Give me a short thought to think about.",
    "What would a wise person say about work?",
    "Tell me a joke or a clever remark.",
    "Write one memorable sentence.",
    "What's your favourite piece of advice?",
    "Cheer me up with something clever.",
    "Explain something about people in a few lines.",
    "Any words of wisdom about science or learning?",
    "What do you think about love?",
    "Give me a quotation from a famous person.",
    "Hi! What's on your mind?",
    "Tell me a short story in a few lines.",
    "Could you define a word in a witty way?",
    "What did someone once say about politics?",
]


@cache
def corpus_texts() -> tuple[str, ...]:
    raw = files("steer_core").joinpath("data/corpus.json").read_text(encoding="utf-8")
    return tuple(json.loads(raw)["texts"])


def corpus_info() -> dict[str, str]:
    raw = files("steer_core").joinpath("data/corpus.json").read_text(encoding="utf-8")
    doc = json.loads(raw)
    return {k: v for k, v in doc.items() if k != "texts"}


def split_texts(split: Split) -> list[str]:
    texts = corpus_texts()
    held = split == "heldout"
    return [t for i, t in enumerate(texts) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held]


def format_text(tokenizer: PreTrainedTokenizerBase, text: str, index: int) -> str:
    """Chat-format a text for chat models; leave it as is otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        return text
    messages = [
        {"role": "user", "content": USER_PROMPTS[index % len(USER_PROMPTS)]},
        {"role": "assistant", "content": text},
    ]
    return str(tokenizer.apply_chat_template(messages, tokenize=False))


def prompt_for(tokenizer: PreTrainedTokenizerBase, text: str, index: int) -> str:
    """A generation prompt from a held-out text: the user turn for chat models, the text's first half otherwise."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": USER_PROMPTS[index % len(USER_PROMPTS)] + " " + text[:80]}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    words = text.split()
    return " ".join(words[: max(3, len(words) // 2)])


def encode(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> Tensor:
    ids = tokenizer(text, add_special_tokens=True, return_tensors="pt").input_ids[0]
    return ids[:max_tokens]


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor  # Long[Tensor, "batch seq"], right-padded
    attention_mask: Tensor  # Long[Tensor, "batch seq"]
    doc_index: Tensor  # Long[Tensor, "batch"]: the text's index within its split


def batches(
    tokenizer: PreTrainedTokenizerBase,
    split: Split,
    max_tokens: int,
    *,
    max_doc_tokens: int = 128,
    batch_size: int = 8,
    by_length: bool = False,
) -> Iterator[Batch]:
    """Tokenized, chat-formatted texts of one split until `max_tokens` real tokens have been yielded.

    by_length batches texts of similar length together: the same texts and tokens with far less padding (it was
    42% of the calibration pass and 52% of verification's), for passes whose result does not depend on order.
    """
    if max_tokens <= 0:
        raise ValueError(f"token budget must be positive, got {max_tokens}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = _texts_until(tokenizer, split, max_tokens, max_doc_tokens)
    if by_length:
        items = sorted(items, key=lambda item: len(item[1]))
    for start in range(0, len(items), batch_size):
        yield collate(items[start : start + batch_size], pad)


def _texts_until(
    tokenizer: PreTrainedTokenizerBase, split: Split, max_tokens: int, max_doc_tokens: int
) -> list[tuple[int, Tensor]]:
    items: list[tuple[int, Tensor]] = []
    total = 0
    for i, text in enumerate(split_texts(split)):
        ids = encode(tokenizer, format_text(tokenizer, text, i), min(max_doc_tokens, max_tokens - total))
        if len(ids) == 0:
            continue
        items.append((i, ids))
        total += len(ids)
        if total >= max_tokens:
            break
    return items


def collate(items: list[tuple[int, Tensor]], pad: int) -> Batch:
    """Right-pad (index, token ids) items into one batch with its attention mask."""
    width = max(len(ids) for _, ids in items)
    input_ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (_, ids) in enumerate(items):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return Batch(input_ids, mask, torch.tensor([i for i, _ in items]))
