import contextlib
import itertools
import threading

import pytest
import torch

from helpers import D_MODEL, hook_count, tiny_lm, tiny_model
from steer_core.generate import GenerationConfig, complete, stream
from steer_core.sites import HookPoint
from steer_core.steer import LowRank, RowSteering, ablation, batch_steering, lowrank_updates, steering
from steer_core.vectors.vector import SteeringVector


def _vec(scale: float = 3.0, layer: int = 1, seed: int = 0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({HookPoint(layer, "resid_post"): torch.randn(D_MODEL, generator=g) * scale})


def test_hooks_removed_on_exit_and_on_exception() -> None:
    model = tiny_model("llama")
    before = hook_count(model)
    with steering(model, _vec(), skip_bos=True):
        assert hook_count(model) > before
    assert hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"), steering(model, _vec()):
        raise RuntimeError("boom")
    assert hook_count(model) == before
    with pytest.raises(KeyError), ablation(model, torch.randn(D_MODEL)):
        raise KeyError("x")
    assert hook_count(model) == before


def test_every_kv_cached_decode_step_is_steered() -> None:
    """Greedy steered generation with the KV cache equals the full recomputation without it."""
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (1, 6))
    vec = _vec(scale=5.0)
    kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with steering(model, vec):
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    plain = model.generate(ids, **kwargs)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain), "the vector is strong enough to change greedy output"


def test_skip_bos_leaves_only_the_leading_bos_alone() -> None:
    model = tiny_model("llama")
    ids = torch.tensor([[1, 10, 11, 1, 12]])  # BOS at 0 and again at 3: only the leading one is skipped
    v = _vec()
    base = model(ids, output_hidden_states=True).hidden_states[2]
    with steering(model, v, skip_bos=True):
        steered = model(ids, output_hidden_states=True).hidden_states[2]
    diff = steered - base
    torch.testing.assert_close(diff[0, 0], torch.zeros(D_MODEL))
    torch.testing.assert_close(diff[0, 1:], v.directions[HookPoint(1, "resid_post")].expand(4, D_MODEL))


def test_skip_bos_with_left_padding() -> None:
    model = tiny_model("llama")
    ids = torch.tensor([[0, 0, 1, 10, 11], [1, 9, 8, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    v = _vec()
    base = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    with steering(model, v, skip_bos=True):
        steered = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    unchanged = ((steered - base).abs().amax(-1) < 1e-5).tolist()
    assert unchanged == [[False, False, True, False, False], [True, False, False, False, False]]


def test_concurrent_requests_do_not_leak() -> None:
    """Many threads steering one model with different vectors each get exactly their solo result."""
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 10))
    vectors = [None] + [_vec(scale=4.0, seed=s, layer=s % 3) for s in range(1, 8)]

    def run(vec: SteeringVector | None) -> torch.Tensor:
        if vec is None:
            return model(ids).logits
        with steering(model, vec):
            return model(ids).logits

    solo = [run(v) for v in vectors]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(vectors))}
    barrier = threading.Barrier(len(vectors))

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(5):
            results[i].append(run(vectors[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(vectors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        for out in outs:
            torch.testing.assert_close(out, solo[i], atol=1e-5, rtol=1e-5)
    assert hook_count(model) == 0


def test_stream_matches_complete_and_leaves_no_hooks() -> None:
    lm = tiny_lm("llama")
    vec = _vec(scale=5.0)
    config = GenerationConfig(max_new_tokens=10)
    pieces = list(stream(lm, "hello there", vector=vec, config=config))
    assert pieces and pieces[-1] == complete(lm, "hello there", vector=vec, config=config)
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(pieces))
    assert hook_count(lm.model) == 0


def test_cancelled_stream_removes_hooks() -> None:
    lm = tiny_lm("llama")
    gen = stream(lm, "hello there", vector=_vec(), config=GenerationConfig(max_new_tokens=200))
    next(gen)
    assert hook_count(lm.model) > 0
    gen.close()
    assert hook_count(lm.model) == 0


def test_same_seed_same_sample() -> None:
    lm = tiny_lm("llama")
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7)
    assert complete(lm, "abc", config=config) == complete(lm, "abc", config=config)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
    ],
)
def test_generation_config_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs)


def test_empty_prompt_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        complete(tiny_lm("llama"), "   ")


def test_concurrent_sampled_previews_follow_their_seeds() -> None:
    lm = tiny_lm("llama")
    configs = [GenerationConfig(max_new_tokens=16, temperature=1.5, seed=s) for s in range(4)]
    solo = [complete(lm, "abc", config=c) for c in configs]
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(configs))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = complete(lm, "abc", config=configs[i], vector=_vec(seed=i) if i % 2 else None)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(0, len(configs), 2):  # the unsteered ones must equal their solo runs exactly
        assert results[i] == solo[i]
    assert len(set(solo)) > 1, "different seeds sample differently"


def test_lowrank_updates_add_b_of_a_x() -> None:
    """Rank r: (d_in,) / (d_out,) vectors are rank 1, (r, d_in) / (d_out, r) matrices are PEFT's lora_A / lora_B."""
    lm = tiny_lm("llama")
    name = "model.layers.1.mlp.down_proj"
    module = lm.model.get_submodule(name)
    x = torch.randn(2, 5, module.in_features)
    a, b = torch.randn(3, module.in_features), torch.randn(module.out_features, 3)
    with lowrank_updates(lm.model, {name: (a, b)}):
        out = module(x)
    torch.testing.assert_close(out, module(x) + x @ a.T @ b.T)
    with lowrank_updates(lm.model, {name: (a[0], b[:, 0])}):
        out = module(x)
    torch.testing.assert_close(out, module(x) + (x @ a[0]).unsqueeze(-1) * b[:, 0])


# batch_steering: every row its own steering, one hook per module


def _adapter_params(model: torch.nn.Module, name: str, seed: int, rank: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    module = model.get_submodule(name)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, module.in_features, generator=g), torch.randn(module.out_features, rank, generator=g)


def _rows_of_every_kind(model: torch.nn.Module) -> list[RowSteering | None]:
    """Vectors at one site, at other layers, at resid_pre 0, two points on one module (resid_post 1 is resid_pre 2),
    with and without skip_bos; adapters of rank 1 and 3, with scaling and bias, one of them on two rows."""
    g = torch.Generator().manual_seed(5)
    two = SteeringVector(
        {HookPoint(1, "resid_post"): torch.randn(D_MODEL, generator=g), HookPoint(2, "resid_pre"): torch.randn(D_MODEL)}
    )
    down, o_proj = "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"
    shared = LowRank({down: _adapter_params(model, down, 1)}, {down: 0.5})
    return [
        None,
        RowSteering(vector=_vec(seed=1)),
        RowSteering(vector=_vec(seed=2), skip_bos=True),
        RowSteering(lowrank=shared),
        RowSteering(vector=SteeringVector({HookPoint(0, "resid_pre"): torch.randn(D_MODEL, generator=g)})),
        RowSteering(vector=two, skip_bos=True),
        RowSteering(lowrank=LowRank({o_proj: _adapter_params(model, o_proj, 2, rank=3)}, {}, {o_proj: torch.ones(32)})),
        RowSteering(lowrank=shared),
        RowSteering(vector=_vec(seed=3, layer=0)),
        None,
    ]


def _one_context_per_row(model: torch.nn.Module, rows: list[RowSteering | None]) -> contextlib.ExitStack:
    """Today's path: steering / lowrank_updates with rows=[i], one hook set per row."""
    stack = contextlib.ExitStack()
    for i, row in enumerate(rows):
        if row is not None and row.vector is not None:
            stack.enter_context(steering(model, row.vector, skip_bos=row.skip_bos, rows=[i]))
        if row is not None and row.lowrank is not None:
            lr = row.lowrank
            stack.enter_context(lowrank_updates(model, lr.params, scaling=lr.scaling, biases=lr.biases, rows=[i]))
    return stack


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 90, (n, 7), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1  # a leading BOS in every row; left padding before it in every third
    mask = torch.ones_like(ids)
    ids[::3, :2], mask[::3, :2] = 0, 0
    ids[::3, 2] = 1
    return ids, mask


def test_batch_steering_gives_every_row_the_bits_of_its_own_hooks() -> None:
    model = tiny_model("llama")
    rows = _rows_of_every_kind(model)
    ids, mask = _batch(len(rows))
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, output_hidden_states=True).logits
        before = hook_count(model)  # transformers' own output_hidden_states recorders stay
        with _one_context_per_row(model, rows):
            today = model(ids, attention_mask=mask, output_hidden_states=True)
        with batch_steering(model, rows):
            batched = model(ids, attention_mask=mask, output_hidden_states=True)
    for a, b in zip(today.hidden_states, batched.hidden_states, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(today.logits, batched.logits)
    for i in (0, 9):
        assert torch.equal(batched.logits[i], plain[i]), "a row without steering is the plain model's"
    assert all(not torch.equal(batched.logits[i], plain[i]) for i in range(1, 9))
    assert hook_count(model) == before


def test_batch_steering_decode_steps_equal_today_and_each_row_alone() -> None:
    """Greedy generation with the KV cache: bit-equal scores to one hook set per row; and each row as it runs alone
    (a single row of an adapter computes its update on that row only, as alone)."""
    model = tiny_model("llama")
    rows = _rows_of_every_kind(model)
    ids = torch.randint(3, 90, (len(rows), 6), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    kwargs |= {"output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        with _one_context_per_row(model, rows):
            today = model.generate(ids, **kwargs)
        with batch_steering(model, rows):
            batched = model.generate(ids, **kwargs)
        assert torch.equal(today.sequences, batched.sequences)
        for a, b in zip(today.scores, batched.scores, strict=True):
            assert torch.equal(a, b)
        for i in (1, 2, 4, 5, 6):  # rows whose steering is theirs alone
            with batch_steering(model, [rows[i]]):
                alone = model.generate(ids[i : i + 1], **kwargs)
            assert torch.equal(alone.sequences[0], batched.sequences[i])


def test_batch_steering_is_one_hook_per_module_and_reassigns_in_place() -> None:
    model = tiny_model("llama")
    name = "model.layers.1.mlp.down_proj"
    many = [RowSteering(vector=_vec(seed=s)) for s in range(8)] + [
        RowSteering(lowrank=LowRank({name: _adapter_params(model, name, s)})) for s in range(8)
    ]
    ids, mask = _batch(len(many))
    with torch.no_grad(), batch_steering(model, many) as batch:
        assert hook_count(model) == 3  # the model's (skip_bos), the block's and the adapters' module's
        first = model(ids, attention_mask=mask).logits
        swapped = many[8:] + [None] * 8  # rows leave and others take their places: no hook added or removed
        batch.assign(swapped)
        assert hook_count(model) == 3
        second = model(ids, attention_mask=mask).logits
        with pytest.raises(ValueError, match="holds 16 rows but the batch has 3"):
            model(ids[:3], attention_mask=mask[:3])
        batch.assign([RowSteering(vector=_vec(seed=9, layer=2))] + [None] * 15)  # a new module gets its hook
        assert hook_count(model) == 4
    with torch.no_grad():
        with _one_context_per_row(model, many):
            assert torch.equal(model(ids, attention_mask=mask).logits, first)
        with _one_context_per_row(model, swapped):
            assert torch.equal(model(ids, attention_mask=mask).logits, second)
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), batch_steering(model, many):
        raise RuntimeError("boom")
    assert hook_count(model) == 0
