"""Continuous batching for previews: rows of different requests share one running decode batch, each row with its
own steering (a hook vector, a served adapter or none), its own sampling settings and seed.

One scheduler thread owns the model's decode steps. A new request waits in arrival order until the batch has room
(`max_rows`), is prefilled alone with its own KV cache, and joins the batch at the next step: the caches are
left-padded to a common length, and an attention mask and per-row position ids make the padding invisible. A row
leaves when it stops (a stop token, its token budget, or its caller cancels); columns that are padding in every
remaining row are trimmed. The rows' steering is one `steer.batch_steering` context: one hook per steered module
holding every row's delta (a table of vectors, low-rank updates grouped by adapter), whatever the number of rows,
entered in the scheduler thread's context (steer_core.hooks) so nothing outside the batch sees it. Rows joining and
leaving reassign its rows in place; it is exited, and every hook removed, whenever no steered row is running.
Sampled rows draw from a torch.Generator of their own, seeded from the request, never from the global RNG, so a seed
gives the same text alone and batched; greedy rows take the argmax.

Why not transformers' own continuous batching (5.24: `generate_batch`, `init_continuous_batching`,
`ContinuousBatchingManager`): it packs every request's tokens into one sequence of shape [1, tokens] over a paged
cache, so a batch row is no longer a tensor row and the row-masked hooks cannot tell whose position is whose; it
runs the model in a thread of its own, outside the context that gates our hooks; and it samples every request with
`torch.multinomial` from the one global RNG (with `do_sample` fixed for the whole manager), so a seed cannot
reproduce one request's text. Its per-request `temperature` / `top_p` would have been usable. What we take from
transformers is the model's forward with an explicit mask, position ids and a `DynamicCache` whose layers we pad,
concatenate and index ourselves; its `TemperatureLogitsWarper` and `TopPLogitsWarper` for sampling.

Exactness: "alone" means the same request through a scheduler with nothing else in its batch. That is the app's
single-request path once previews go through the scheduler, and on the tiny test models it also gives the same
greedy tokens as `model.generate` (tests/test_schedule.py). A padded batch row and the row alone can differ in the
last bits of float32 (SDPA with a mask over padded keys sums over more, zero, terms), which the tests check does not
change any greedy token on the shapes they use.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections import deque
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from steer_core.adapter.served import ServedAdapter
from steer_core.generate import GenerationConfig, Side
from steer_core.model import LoadedModel
from steer_core.steer import BatchSteering, RowSteering, batch_steering

Event = tuple["Request", int | BaseException | None]  # a new token, the error that ended the row, or None: done


@dataclass(eq=False)
class Request:
    """One row: its prompt tokens, steering and sampling; events go to `out` as (this request, token | error |
    None). Several requests may share one `out` queue (a preview's sides)."""

    ids: list[int]
    side: Side = None
    config: GenerationConfig = field(default_factory=GenerationConfig)
    skip_bos: bool = False
    out: queue.Queue[Event] = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    steps: int = 0  # decode steps of the batch while this row was in it (prefill not counted)

    def cancel(self) -> None:
        """Stop this row at the next step (or drop it from the wait queue); its caller gets no more tokens."""
        self.cancelled.set()


class _Row:
    """A request in the running batch: its next input token and its real length in the batch's cache."""

    def __init__(self, request: Request, stops: set[int]) -> None:
        self.request = request
        self.stops = stops
        s = request.config
        self.generator: torch.Generator | None = None
        self.warpers: list[Any] = []
        if s.temperature > 0:
            self.generator = torch.Generator().manual_seed(s.seed)
            self.warpers = [TemperatureLogitsWarper(s.temperature)]
            if s.top_p < 1:
                self.warpers.append(TopPLogitsWarper(s.top_p))
        self.length = len(request.ids)
        self.next = 0
        self.steering: RowSteering | None = None  # set at admission (resolving it may fail: the request's error)

    def pick(self, logits: Tensor) -> int:
        """The next token from this row's last logits [vocab]."""
        scores = logits.float().unsqueeze(0)
        if self.generator is None:
            return int(scores.argmax(-1))
        for warp in self.warpers:
            scores = warp(None, scores)
        probs = scores.softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def done(self) -> bool:
        r = self.request
        return bool(r.tokens) and (r.tokens[-1] in self.stops or len(r.tokens) >= r.config.max_new_tokens)


class Scheduler:
    """Runs every submitted request as a row of one continuously batched generation on `lm`.

    At most `max_rows` rows decode together; up to `max_waiting` more wait in arrival order (past that, `submit`
    refuses). The thread starts on the first request and idles, holding no hooks, while nothing is running.
    """

    def __init__(self, lm: LoadedModel, *, max_rows: int = 16, max_waiting: int = 256) -> None:
        if max_rows < 1 or max_waiting < 0:
            raise ValueError(f"max_rows must be at least 1 and max_waiting at least 0, got {max_rows}, {max_waiting}")
        self.lm = lm
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self.steps = 0  # decode steps run so far (tests and benchmarks read it)
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        eos = getattr(lm.model.generation_config, "eos_token_id", None)
        stops = set(eos if isinstance(eos, list) else [eos]) | {lm.tokenizer.eos_token_id}
        self._stops = {i for i in stops if i is not None}
        # the running batch
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: Tensor | None = None  # [rows, cache length], 0 on left padding
        self._hooks = ExitStack()  # holds the batch's steering while a steered row runs
        self._steering: BatchSteering | None = None

    def submit(self, request: Request) -> Request:
        """Queue a request; its events arrive on request.out."""
        if not request.ids:
            raise ValueError("a request needs at least one prompt token")
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) >= self.max_waiting:
                raise RuntimeError(
                    f"the generation queue is full ({self.max_waiting} requests waiting); try again in a moment"
                )
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=contextvars.Context().run, args=(self._loop,), daemon=True)
                self._thread.start()
            self._wake.notify()
        return request

    def close(self) -> None:
        """Stop the thread once the current step ends; running and waiting requests end with an error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def running(self) -> int:
        return len(self._rows)

    # The scheduler thread

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._wake:
                    while not (self._closed or self._waiting or self._rows):
                        self._wake.wait()
                    if self._closed:
                        break
                    joining: list[Request] = []
                    while self._waiting and len(self._rows) + len(joining) < self.max_rows:
                        joining.append(self._waiting.popleft())
                try:
                    for request in joining:
                        self._admit(request)
                    self._drop([r for r in self._rows if r.request.cancelled.is_set()], None)
                    if self._rows:
                        self._step()
                except Exception as err:  # a bug of ours: end the batch's rows with it, keep serving
                    self._reset(err)
        closed = RuntimeError("the scheduler was closed")
        self._drop(list(self._rows), closed)
        with self._wake:
            for request in self._waiting:
                request.out.put((request, closed))
            self._waiting.clear()

    def _admit(self, request: Request) -> None:
        """Prefill the request alone, pick its first token, and merge it into the batch."""
        if request.cancelled.is_set():
            request.out.put((request, None))
            return
        row = _Row(request, self._stops)
        try:
            row.steering = self._row_steering(request)
            cache = DynamicCache()
            ids = torch.tensor([request.ids], device=self.lm.device)
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            # In a context of its own: the running rows' hooks are gated to the thread's context and stay off here.
            logits = contextvars.Context().run(self._steered, [row], ids, torch.ones_like(ids), positions, cache)
            row.next = row.pick(logits[0])
        except Exception as err:  # this request's own failure (its adapter, its hooks): the batch goes on
            request.out.put((request, err))
            return
        request.tokens.append(row.next)
        request.out.put((request, row.next))
        if row.done():
            request.out.put((request, None))
            return
        self._merge(row, cache)

    def _merge(self, row: _Row, cache: DynamicCache) -> None:
        mask = torch.ones(1, row.length, dtype=torch.long, device=self.lm.device)
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
        else:
            width = max(self._mask.shape[1], row.length)
            _pad_left(self._cache, width - self._mask.shape[1])
            _pad_left(cache, width - row.length)
            for ours, theirs in zip(_layers(self._cache), _layers(cache), strict=True):
                ours.keys = torch.cat([ours.keys, theirs.keys])
                ours.values = torch.cat([ours.values, theirs.values])
            pad = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731
            self._mask = torch.cat([pad(self._mask), pad(mask)])
        self._rows.append(row)
        self._rehook()

    def _step(self) -> None:
        """One decode step of every row."""
        assert self._cache is not None and self._mask is not None
        ids = torch.tensor([[r.next] for r in self._rows], device=self.lm.device)
        mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)
        positions = torch.tensor([[r.length] for r in self._rows], device=self.lm.device)
        width = self._mask.shape[1]
        try:
            logits = self._forward(self._rows, ids, mask, positions, self._cache)
        except Exception as err:
            _crop(self._cache, width)
            culprit = self._culprit(ids, mask, positions, width)
            if culprit is None:  # the model itself failed: every row ends with the error, the thread goes on
                self._drop(list(self._rows), err)
                return
            self._drop([culprit], err)
            return  # the others take this step again next time round, from the same cache
        self._mask = mask
        self.steps += 1
        finished: list[_Row] = []
        failed: list[tuple[_Row, BaseException]] = []
        for i, row in enumerate(self._rows):
            row.length += 1
            row.request.steps += 1
            try:
                row.next = row.pick(logits[i])
            except Exception as err:  # e.g. this row's logits went NaN under its steering
                failed.append((row, err))
                continue
            row.request.tokens.append(row.next)
            row.request.out.put((row.request, row.next))
            if row.done():
                finished.append(row)
        for row, failure in failed:
            self._drop([row], failure)
        self._drop(finished, None)

    def _culprit(self, ids: Tensor, mask: Tensor, positions: Tensor, width: int) -> _Row | None:
        """The steered row whose hooks make the step fail: the step retried without each one's hooks in turn (in a
        context of its own, where the batch's hooks are off)."""
        assert self._cache is not None
        for row in [r for r in self._rows if r.request.side is not None]:
            others = [r if r is not row else None for r in self._rows]
            try:
                contextvars.Context().run(self._steered, others, ids, mask, positions, self._cache)
            except Exception:
                continue
            finally:
                _crop(self._cache, width)
            return row
        return None

    def _steered(
        self, rows: Sequence[_Row | None], ids: Tensor, mask: Tensor, positions: Tensor, cache: DynamicCache
    ) -> Tensor:
        """A forward pass with these rows' steering on their indices (None: a row left unsteered)."""
        with batch_steering(self.lm.model, [None if row is None else row.steering for row in rows]):
            return self._forward(rows, ids, mask, positions, cache)

    def _forward(
        self, rows: Sequence[_Row | None], ids: Tensor, mask: Tensor, positions: Tensor, cache: DynamicCache
    ) -> Tensor:
        """The last position's logits [rows, vocab]; the cache grows by the new tokens. `rows` are the rows whose
        steering is on for this pass (None: one whose steering is off)."""
        out = self.lm.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions.to(ids.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _drop(self, rows: list[_Row], error: BaseException | None) -> None:
        """Take rows out of the batch, rehook the rest, then tell their callers (so a caller that sees its end sees
        no hook of its own left)."""
        if not rows:
            return
        keep = [i for i, r in enumerate(self._rows) if r not in rows]
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = self._mask = None
        else:
            assert self._cache is not None and self._mask is not None
            index = torch.tensor(keep, device=self._mask.device)
            self._cache.batch_select_indices(index)
            self._mask = self._mask[index]
            first = int(self._mask.any(0).long().argmax())  # columns before it are padding in every row
            if first:
                _trim_left(self._cache, first)
                self._mask = self._mask[:, first:]
        self._rehook()
        for row in rows:
            row.request.out.put((row.request, error))

    def _reset(self, error: BaseException) -> None:
        rows, self._rows, self._cache, self._mask = self._rows, [], None, None
        self._hooks.close()
        self._steering = None
        for row in rows:
            row.request.out.put((row.request, error))

    def _rehook(self) -> None:
        """The batch's steering assigned to the running rows' current indices; no hooks while no row is steered."""
        rows = [row.steering for row in self._rows]
        if all(r is None for r in rows):
            self._hooks.close()
            self._steering = None
            return
        if self._steering is None:
            self._hooks = ExitStack()
            self._steering = self._hooks.enter_context(batch_steering(self.lm.model))
        try:
            self._steering.assign(rows)
        except Exception:  # cannot happen after a successful prefill, but a row that cannot be steered must not run
            failed: list[tuple[_Row, BaseException]] = []
            for row in self._rows:
                try:
                    self._steering.check(row.steering)
                except Exception as err:
                    failed.append((row, err))
            if not failed:
                raise
            self._drop([r for r, _ in failed], failed[0][1])

    def _row_steering(self, request: Request) -> RowSteering | None:
        side = request.side
        if isinstance(side, ServedAdapter):
            return side.row(self.lm.model)
        if side is not None:
            return RowSteering(vector=side, skip_bos=request.skip_bos)
        return None


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers, each with `keys` and `values` [batch, heads, positions, dim] (the layer classes of
    transformers type them loosely: a linear-attention layer has none, and these models have no such layer)."""
    return list(cache.layers)


def _pad_left(cache: DynamicCache, n: int) -> None:
    if n:
        for layer in _layers(cache):
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, n, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, n, 0))


def _trim_left(cache: DynamicCache, n: int) -> None:
    for layer in _layers(cache):
        layer.keys = layer.keys[..., n:, :]
        layer.values = layer.values[..., n:, :]


def _crop(cache: DynamicCache, width: int) -> None:
    """Undo a failed step's partial cache growth: back to `width` positions in every layer."""
    for layer in _layers(cache):
        if getattr(layer, "keys", None) is not None and layer.keys.shape[-2] > width:
            layer.keys = layer.keys[..., :width, :]
            layer.values = layer.values[..., :width, :]
