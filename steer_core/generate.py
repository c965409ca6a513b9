"""Preview: unsteered, hook-steered and served-adapter generations as rows of one batch, streamed together."""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from steer_core.adapter.served import ServedAdapter
from steer_core.model import LoadedModel
from steer_core.steer import steering
from steer_core.template import render_chat
from steer_core.vectors.vector import SteeringVector

if TYPE_CHECKING:
    from steer_core.schedule import Scheduler

# HF sampling draws from torch's one global RNG, so two sampled generations at once would interleave their draws and
# neither would follow its seed. Sampled runs take turns; greedy runs use no RNG and never wait.
GLOBAL_RNG_TURN = threading.Lock()


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    seed: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError(f"max_new_tokens must be in 1..4096, got {self.max_new_tokens}")
        if not (self.temperature == self.temperature and 0 <= self.temperature <= 5):
            raise ValueError(f"temperature must be in 0..5, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def format_prompt(lm: LoadedModel, prompt: str) -> str:
    """Apply the chat template for instruct models; base models continue the text as given."""
    if not prompt.strip():
        raise ValueError("the prompt is empty; type something for the model to answer")
    if lm.is_chat:
        messages = [{"role": "user", "content": prompt}]
        return render_chat(lm.tokenizer, messages, generation=True)
    return prompt


def left_pad(
    rows: list[list[int]], pad: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token rows padded on the left, so a batched generation continues every row
    from its last real token. Padded by hand: the tokenizer is shared with concurrent requests, so its padding_side
    is not ours to flip."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
        return self.event.is_set()


Side = SteeringVector | ServedAdapter | None  # unsteered, hook-steered, or an adapter as an endpoint serves it


def check_length(lm: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation that would run past the model's context, naming the limit (past it a model degrades
    silently: transformers only warns)."""
    limit = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
    total = prompt_tokens + max_new_tokens
    if limit and total > limit:
        raise ValueError(
            f"the prompt is {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: {total} in all, "
            f"past this model's context of {limit} tokens; shorten the prompt or ask for at most "
            f"{max(limit - prompt_tokens, 0)} new tokens"
        )


class _RowsStreamer(BaseStreamer):
    """Hands each decode step's new tokens (one per batch row) to the consuming thread."""

    def __init__(self, timeout: float) -> None:
        self.steps: queue.Queue[list[int] | None] = queue.Queue()
        self.timeout = timeout
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.steps.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.steps.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (step := self.steps.get(timeout=self.timeout)) is not None:
            yield step


def _stop_ids(lm: LoadedModel) -> set[int]:
    eos = getattr(lm.model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos]) | {lm.tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


def stream_sides(
    lm: LoadedModel,
    prompt: str,
    sides: Sequence[Side],
    *,
    config: GenerationConfig = GenerationConfig(),
    skip_bos: bool = False,
    scheduler: Scheduler | None = None,
) -> Iterator[tuple[str, ...]]:
    """Yield every side's growing completion, all generated as rows of one batch, side by side.

    Each side's steering acts on its own row only (gated hooks with a row mask), so the rows are exactly what each
    would generate alone, at little more than one row's cost: decoding a small model is memory-bound. With
    sampling, every row draws from the seeded generator in turn, so a seed reproduces the whole preview (the rows
    do not share their draws). Closing the iterator early stops the generation and removes the hooks.

    With a `scheduler` (steer_core.schedule), the sides are rows of its running batch instead, beside other requests'
    rows; each sampled side then draws from its own generator seeded with config.seed.
    """
    if not sides:
        raise ValueError("nothing to generate: give at least one side (None for unsteered)")
    text = format_prompt(lm, prompt)
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=not lm.is_chat).input_ids.to(lm.device)
    check_length(lm, ids.shape[1], config.max_new_tokens)
    if scheduler is not None:
        if scheduler.lm is not lm:
            raise ValueError(f"the scheduler runs {scheduler.lm.name}, not {lm.name}")
        yield from _scheduled(scheduler, ids[0].tolist(), sides, config, skip_bos)
        return
    ids = ids.repeat(len(sides), 1)  # the same prompt in every row: no padding, so each row is as it runs alone
    streamer = _RowsStreamer(timeout=600)
    cancel = threading.Event()
    errors: list[BaseException] = []
    sampling = config.temperature > 0
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": config.max_new_tokens,
        "do_sample": sampling,
        "streamer": streamer,
        "stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)]),
        "pad_token_id": lm.tokenizer.pad_token_id,
    }
    if sampling:
        kwargs.update(temperature=config.temperature, top_p=config.top_p)

    def run() -> None:
        try:
            with GLOBAL_RNG_TURN if sampling else nullcontext(), torch.no_grad():
                # Greedy runs must not reseed: they hold no lock, and reseeding the global RNG would move a sampled
                # run that is going on meanwhile.
                if sampling:
                    torch.manual_seed(config.seed)
                lm.model.generate(**kwargs)  # type: ignore[operator]  # transformers types it outside PreTrainedModel
        except BaseException as err:  # surfaced to the consumer below
            errors.append(err)
            streamer.end()

    with ExitStack() as stack:
        for row, side in enumerate(sides):
            if isinstance(side, ServedAdapter):
                stack.enter_context(side.applied(lm.model, rows=[row]))
            elif side is not None:
                stack.enter_context(steering(lm.model, side, skip_bos=skip_bos, rows=[row]))
        # The worker thread runs in a copy of this context, so the gated hooks are active there and nowhere else.
        worker = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
        worker.start()
        stops = _stop_ids(lm)
        tokens: list[list[int]] = [[] for _ in sides]
        done = [False] * len(sides)
        try:
            for step in streamer:
                for row, token in enumerate(step):
                    if not done[row]:
                        done[row] = token in stops
                        tokens[row].append(token)
                yield tuple(str(lm.tokenizer.decode(t, skip_special_tokens=True)) for t in tokens)
        finally:
            cancel.set()
            worker.join()
    if errors:
        raise errors[0]


def _scheduled(
    scheduler: Scheduler, ids: list[int], sides: Sequence[Side], config: GenerationConfig, skip_bos: bool
) -> Iterator[tuple[str, ...]]:
    """stream_sides through the scheduler: one request per side, their events on one queue, a yield per step."""
    from steer_core.schedule import Event, Request

    events: queue.Queue[Event] = queue.Queue()
    requests = [Request(ids, side, config, skip_bos, out=events) for side in sides]
    index = {id(r): i for i, r in enumerate(requests)}
    tokens: list[list[int]] = [[] for _ in sides]
    running = len(requests)
    tokenizer = scheduler.lm.tokenizer
    try:
        for request in requests:
            scheduler.submit(request)
        while running:
            changed = False
            event: Event | None = events.get(timeout=600)
            while event is not None:  # every event already there: a step's tokens of all sides make one yield
                request, item = event
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    running -= 1
                else:
                    tokens[index[id(request)]].append(item)
                    changed = True
                event = events.get_nowait() if not events.empty() else None
            if changed:
                yield tuple(str(tokenizer.decode(t, skip_special_tokens=True)) for t in tokens)
    finally:
        for request in requests:
            request.cancel()


def stream(
    lm: LoadedModel,
    prompt: str,
    *,
    vector: SteeringVector | None = None,
    config: GenerationConfig = GenerationConfig(),
    skip_bos: bool = False,
) -> Iterator[str]:
    """Yield the growing completion of one side. Closing the iterator early stops the generation and removes the
    hooks."""
    for (text,) in stream_sides(lm, prompt, [vector], config=config, skip_bos=skip_bos):
        yield text


def complete(lm: LoadedModel, prompt: str, **kwargs: Any) -> str:
    text = ""
    for text in stream(lm, prompt, **kwargs):  # noqa: B007 - the last yield is the whole completion
        pass
    return text
