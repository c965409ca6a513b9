"""Passes that compute less: the LM head at measured positions only, and what a map's cells compute alike.

A measurement reads the next-token distribution at some positions (a chat's answers, every real token), yet a full
pass applies the LM head, a fifth of a small model's compute, to every position, padding included. And the cells of
a strength map steer one layer with one direction at several strengths: the blocks before that layer, and the
unsteered model's output there, are the same for every cell. `shared_across_cells()` keeps them while a map runs.

`SAVINGS` names what is on; scripts/speed_benchmark.py turns each off to measure what it saves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from torch import Tensor, nn

from steer_core.activations import BlockCall, forward_from
from steer_core.hooks import gated_hooks
from steer_core.sites import pretrained

SAVINGS = {"head", "prefixes", "responses"}  # what scripts/speed_benchmark.py can turn off, to measure each
_KEPT: ContextVar[dict[tuple[Any, ...], Any] | None] = ContextVar("steer_core_kept", default=None)


@contextmanager
def head_at(model: nn.Module, positions: Tensor) -> Iterator[None]:
    """In this context the model's LM head reads only `positions` (a batch × sequence mask), so a full pass returns
    their logits, in order, as `forward_from(..., positions=)` does. The rows are the same hidden states through the
    same weights; only the matrix product's shape changes (tests hold the two within float noise)."""
    head = pretrained(model).get_output_embeddings()
    with gated_hooks() as hooks:
        hooks.pre(head, lambda _m, args, kwargs: ((args[0][positions], *args[1:]), kwargs))
        yield


def logits_at(model: nn.Module, positions: Tensor, **inputs: Tensor) -> Tensor:
    """The logits of a full pass of `model` at `positions` (a batch × sequence mask), in order."""
    if "head" not in SAVINGS:
        return model(**inputs).logits[positions]
    with head_at(model, positions):
        return model(**inputs).logits


def replayed_logits_at(model: nn.Module, first: int, calls: list[BlockCall], positions: Tensor) -> Tensor:
    """forward_from's logits at `positions` (a batch × sequence mask), in order."""
    if "head" not in SAVINGS:
        return forward_from(model, first, calls)[positions]
    return forward_from(model, first, calls, positions=positions)


@contextmanager
def shared_across_cells() -> Iterator[None]:
    """In this context, what `keep` stores `recall` returns: a map's cells share the blocks before their layer and
    the unsteered pass there. Outside it nothing is kept."""
    token = _KEPT.set({})
    try:
        yield
    finally:
        _KEPT.reset(token)


def recall(saving: str, key: tuple[Any, ...]) -> Any | None:
    """What `keep` stored for `key` earlier in this shared_across_cells() context, else None. `key` must name
    everything the value depends on (the model, the text, the layer); `saving`, the SAVINGS switch it belongs to."""
    store = _KEPT.get()
    return None if store is None or saving not in SAVINGS else store.get((saving, *key))


def keep(saving: str, key: tuple[Any, ...], value: Any) -> None:
    """Store `value` for recall within this shared_across_cells() context (outside one, nothing is kept)."""
    store = _KEPT.get()
    if store is not None and saving in SAVINGS:
        store[(saving, *key)] = value


def first_input_only(calls: list[BlockCall]) -> list[BlockCall]:
    """Recorded block calls as a replay reads them: the first block's hidden input, and the other blocks' remaining
    arguments (masks, position embeddings). The later blocks' hidden inputs held one cell's steering; kept, they
    would hold a map's memory for nothing."""
    return [calls[0], *(((None, *args[1:]) if args else args, kwargs) for args, kwargs in calls[1:])]


def text_key(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[Any, ...]:
    """A key for one batch of text through one model."""
    return (id(model), tuple(ids.shape), ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes())
