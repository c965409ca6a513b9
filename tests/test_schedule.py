"""The scheduler's rows are isolated: each equals its request run alone, whatever else shares the batch."""

from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
from typing import Any

import pytest
import torch

from helpers import D_MODEL, hook_count, tiny_lm
from steer_core.adapter.served import ServedAdapter
from steer_core.generate import GenerationConfig, Side, stream_sides
from steer_core.model import LoadedModel
from steer_core.schedule import Event, Request, Scheduler
from steer_core.sites import HookPoint
from steer_core.steer import steering
from steer_core.vectors.vector import SteeringVector


def _vec(seed: int = 0, scale: float = 4.0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL, generator=g) * scale})


def _adapter(seed: int = 0, name: str = "model.layers.1.self_attn.o_proj") -> ServedAdapter:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(1, D_MODEL, generator=g), torch.randn(D_MODEL, 1, generator=g) * 2
    return ServedAdapter(f"adapter-{seed}", {name: (a, b)}, {name: 1.0})


def _prompt(n: int, seed: int) -> list[int]:
    return [1, *torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(seed)).tolist()]


def _finish(request: Request) -> list[int]:
    """The request's tokens once it ends (it must own its queue); its error, raised."""
    while (item := request.out.get(timeout=60)[1]) is not None:
        if isinstance(item, BaseException):
            raise item
    return list(request.tokens)


def _alone(lm: LoadedModel, ids: list[int], side: Side, config: GenerationConfig) -> list[int]:
    scheduler = Scheduler(lm)
    try:
        return _finish(scheduler.submit(Request(ids, side, config)))
    finally:
        scheduler.close()


def _hf_greedy(lm: LoadedModel, ids: list[int], side: Side, n: int) -> list[int]:
    """model.generate on this row alone, with its steering on every row: today's single-row path."""
    x = torch.tensor([ids])
    if isinstance(side, ServedAdapter):
        context: Any = side.applied(lm.model)
    else:
        context = steering(lm.model, side) if side is not None else nullcontext()
    with context, torch.no_grad():
        out = lm.model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0
        )
    tokens = out[0, len(ids) :].tolist()
    return tokens[: tokens.index(2) + 1] if 2 in tokens else tokens


# (prompt length, side, max_new_tokens, temperature, seed)
MIX: list[tuple[int, Side, int, float, int]] = [
    (5, None, 30, 0.0, 0),
    (23, _vec(1), 14, 0.0, 0),
    (40, _adapter(2), 36, 0.0, 0),
    (11, _vec(3), 20, 1.2, 7),
    (30, None, 9, 0.8, 3),
    (3, _adapter(4), 26, 1.0, 11),
    (17, _vec(5), 33, 0.0, 0),
]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rows_joining_and_leaving_equal_their_solo_runs(family: str) -> None:
    lm = tiny_lm(family)  # gemma3: sliding window 16, shorter than most prompts here
    requests = [
        Request(_prompt(n, seed=i), side, GenerationConfig(max_new_tokens=m, temperature=t, seed=s))
        for i, (n, side, m, t, s) in enumerate(MIX)
    ]
    solo = [_alone(lm, r.ids, r.side, r.config) for r in requests]
    assert len({tuple(t) for t in solo}) == len(solo)
    for r, tokens in zip(requests, solo, strict=True):
        if r.config.temperature == 0:  # the scheduler alone is today's generate, token for token
            assert tokens == _hf_greedy(lm, r.ids, r.side, r.config.max_new_tokens)
    scheduler = Scheduler(lm, max_rows=4)
    try:
        # three start together; the others join once the first has streamed 5 tokens, and queue past the row cap
        for r in requests[:3]:
            scheduler.submit(r)
        while len(requests[0].tokens) < 5:
            assert requests[0].out.get(timeout=60)[1] is not None
        for r in requests[3:]:
            scheduler.submit(r)
        got = [_finish(r) for r in requests]
    finally:
        scheduler.close()
    assert got == solo
    assert hook_count(lm.model) == 0


def test_a_seeded_sample_is_the_same_beside_other_samples() -> None:
    lm = tiny_lm("llama")
    config = GenerationConfig(max_new_tokens=24, temperature=1.5, seed=5)
    alone = _alone(lm, _prompt(8, 0), None, config)
    scheduler = Scheduler(lm)
    try:
        others = [
            Request(_prompt(8, 0), None, GenerationConfig(max_new_tokens=24, temperature=1.5, seed=s)) for s in (1, 2)
        ]
        for r in others:
            scheduler.submit(r)
        mine = scheduler.submit(Request(_prompt(8, 0), None, config))
        assert _finish(mine) == alone
        assert len({tuple(_finish(r)) for r in others} | {tuple(alone)}) == 3, "different seeds sample differently"
    finally:
        scheduler.close()


def test_a_long_generation_does_not_stall_a_short_one() -> None:
    lm = tiny_lm("llama")
    scheduler = Scheduler(lm)
    try:
        long = scheduler.submit(Request(_prompt(10, 0), None, GenerationConfig(max_new_tokens=200)))
        while len(long.tokens) < 3:
            long.out.get(timeout=60)
        start = scheduler.steps
        short = scheduler.submit(Request(_prompt(4, 1), _vec(), GenerationConfig(max_new_tokens=5)))
        _finish(short)
        assert short.steps <= 4 < 200 - len(long.tokens)
        assert scheduler.steps - start <= 6, "the short request ran beside the long one, not after it"
        assert len(long.tokens) < 200
        long.cancel()
        _finish(long)
    finally:
        scheduler.close()


def test_the_wait_queue_is_fifo_past_the_row_cap() -> None:
    lm = tiny_lm("llama")
    scheduler = Scheduler(lm, max_rows=2)
    events: queue.Queue[Event] = queue.Queue()
    lengths = [12, 3, 8, 2, 6]
    requests = [
        Request(_prompt(5, i), None, GenerationConfig(max_new_tokens=m), out=events) for i, m in enumerate(lengths)
    ]
    try:
        for r in requests:
            scheduler.submit(r)
        order: list[tuple[int, bool]] = []  # (request, True: its first token / False: its end)
        ended = 0
        while ended < len(requests):
            request, item = events.get(timeout=60)
            i = requests.index(request)
            if item is None:
                ended += 1
                order.append((i, False))
            elif len(request.tokens) == 1:
                order.append((i, True))
    finally:
        scheduler.close()
    starts = [i for i, first in order if first]
    assert starts == [0, 1, 2, 3, 4]
    running = 0
    for _, first in order:
        running += 1 if first else -1
        assert running <= 2
    assert all(len(r.tokens) == m or r.tokens[-1] == 2 for r, m in zip(requests, lengths, strict=True))


def test_a_full_wait_queue_refuses() -> None:
    lm = tiny_lm("llama")
    scheduler = Scheduler(lm, max_rows=1, max_waiting=1)
    try:
        first = scheduler.submit(Request(_prompt(5, 0), None, GenerationConfig(max_new_tokens=400)))
        first.out.get(timeout=60)  # running now
        second = scheduler.submit(Request(_prompt(5, 1), None, GenerationConfig(max_new_tokens=4)))
        with pytest.raises(RuntimeError, match="queue is full"):
            scheduler.submit(Request(_prompt(5, 2), None, GenerationConfig(max_new_tokens=4)))
        first.cancel()
        _finish(first)
        assert _finish(second) == _alone(lm, second.ids, None, second.config)
    finally:
        scheduler.close()


def test_hooks_exist_only_while_steered_rows_run() -> None:
    lm = tiny_lm("llama")
    scheduler = Scheduler(lm)
    try:
        request = scheduler.submit(Request(_prompt(5, 0), _adapter(), GenerationConfig(max_new_tokens=40)))
        plain = scheduler.submit(Request(_prompt(5, 1), _vec(), GenerationConfig(max_new_tokens=40)))
        request.out.get(timeout=60)
        plain.out.get(timeout=60)
        assert hook_count(lm.model) > 0
        _finish(request)
        _finish(plain)
        assert hook_count(lm.model) == 0
    finally:
        scheduler.close()
    assert hook_count(lm.model) == 0


def test_a_failing_request_does_not_stop_the_others() -> None:
    lm = tiny_lm("llama")
    good = [
        Request(_prompt(6 + i, i), side, GenerationConfig(max_new_tokens=20)) for i, side in enumerate([None, _vec()])
    ]
    solo = [_alone(lm, r.ids, r.side, r.config) for r in good]
    scheduler = Scheduler(lm)
    try:
        for r in good:
            scheduler.submit(r)
        bad = scheduler.submit(Request(_prompt(4, 9), _adapter(name="model.layers.7.mlp.down_proj")))
        wrong = scheduler.submit(Request(_prompt(4, 9), SteeringVector({HookPoint(1, "resid_post"): torch.ones(5)})))
        with pytest.raises(ValueError, match="does not have"):
            _finish(bad)
        with pytest.raises(RuntimeError):
            _finish(wrong)
        assert [_finish(r) for r in good] == solo
    finally:
        scheduler.close()
    assert hook_count(lm.model) == 0


class _FailsInDecode(Scheduler):
    """A scheduler whose requests with skip_bos set fail a decode step while their steering is on (as a row whose
    steering breaks the model would); the other rows' steering never fails."""

    def _forward(self, rows: Any, ids: Any, *args: Any) -> Any:
        if ids.shape[1] == 1 and any(r is not None and r.request.skip_bos for r in rows):
            raise RuntimeError("hook failed")
        return super()._forward(rows, ids, *args)


def test_a_request_failing_mid_batch_leaves_the_others_exact() -> None:
    lm = tiny_lm("llama")
    good = [
        Request(_prompt(6 + i, i), side, GenerationConfig(max_new_tokens=20))
        for i, side in enumerate([_adapter(), _vec()])
    ]
    solo = [_alone(lm, r.ids, r.side, r.config) for r in good]
    scheduler = _FailsInDecode(lm)
    try:
        for r in good:
            scheduler.submit(r)
        bad = scheduler.submit(Request(_prompt(4, 9), _vec(2), skip_bos=True))
        with pytest.raises(RuntimeError, match="hook failed"):
            _finish(bad)
        assert [_finish(r) for r in good] == solo
        assert bad.tokens and len(bad.tokens) <= 2  # its first token came from its prefill
    finally:
        scheduler.close()
    assert hook_count(lm.model) == 0


def test_concurrent_previews_through_the_scheduler_equal_their_solo_runs() -> None:
    lm = tiny_lm("llama")
    previews: list[tuple[str, list[Side], GenerationConfig]] = [
        ("hello there", [None, _vec(1), _adapter(1)], GenerationConfig(max_new_tokens=12)),
        ("a longer prompt, with more to say", [None, _vec(2)], GenerationConfig(max_new_tokens=20)),
        ("abc", [_adapter(3), None], GenerationConfig(max_new_tokens=16, temperature=1.0, seed=4)),
        ("why", [_vec(4)], GenerationConfig(max_new_tokens=8)),
    ]

    def final(prompt: str, sides: list[Side], config: GenerationConfig, scheduler: Scheduler | None) -> tuple[str, ...]:
        return list(stream_sides(lm, prompt, sides, config=config, scheduler=scheduler))[-1]

    solo = []
    for p in previews:
        alone = Scheduler(lm)
        solo.append(final(*p, alone))
        alone.close()
        if p[2].temperature == 0:  # greedy: today's generate path gives the same texts
            assert solo[-1] == final(*p, None)
    scheduler = Scheduler(lm, max_rows=5)
    results: dict[int, tuple[str, ...]] = {}
    barrier = threading.Barrier(len(previews))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = final(*previews[i], scheduler)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(previews))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert [results[i] for i in range(len(previews))] == solo
        # a preview closed early cancels its rows; the others go on as alone
        early = stream_sides(lm, *previews[1][:2], config=previews[1][2], scheduler=scheduler)
        other = stream_sides(lm, *previews[0][:2], config=previews[0][2], scheduler=scheduler)
        next(early)
        first = next(other)
        early.close()
        assert [first, *other][-1] == solo[0]
        assert hook_count(lm.model) == 0
    finally:
        scheduler.close()
