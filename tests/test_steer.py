import itertools
import threading

import pytest
import torch

from helpers import D_MODEL, hook_count, tiny_lm, tiny_model
from steer_core.generate import GenerationConfig, complete, stream
from steer_core.sites import HookPoint
from steer_core.steer import ablation, lowrank_updates, steering
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
