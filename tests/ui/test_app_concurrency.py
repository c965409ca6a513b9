"""One model serves many users: a request's steering never reaches another, and no generation leaves a hook behind."""

from __future__ import annotations

import threading

import gradio as gr
import pytest

import app
from helpers import build_sae, hook_count, tiny_lm
from steer_core.ui.form import SteeringForm

UNIT = "× residual norm"


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_sae(tmp_path_factory.mktemp("sae") / "sae", d_sae=16, model_name="tiny-llama"))


@pytest.fixture(autouse=True)
def shared_model() -> None:
    app.workspace.forget_model("shared")
    app._models["shared"] = tiny_lm("llama")


def _args(folder: str, mix: str, temperature: float = 0.0, seed: int = 0) -> list:
    form = SteeringForm(sae_folder=folder, mix=mix, unit=UNIT, layer=1)
    return ["shared", "hello there", 12, temperature, seed, "", 1, *form.values()]


def _final(args: list) -> tuple[str, str]:
    base, steered, _, _ = list(app.preview(*args))[-1]
    return base, steered


def test_concurrent_previews_equal_their_solo_runs(sae_folder: str) -> None:
    requests = [_args(sae_folder, f"{f}:{6 + f % 3}") for f in range(8)]
    requests += [_args(sae_folder, "2:5, 9:-5", temperature=0.9, seed=s) for s in (1, 2)]
    solo = [_final(r) for r in requests]
    assert len({s for _, s in solo[:8]}) > 1, "different features must steer differently for this test to mean much"
    results: dict[int, list[tuple[str, str]]] = {i: [] for i in range(len(requests))}
    barrier = threading.Barrier(len(requests))

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(2):
            results[i].append(_final(requests[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        assert outs == [solo[i]] * 2, f"request {i} ({requests[i][8]}) was changed by another request"
    assert hook_count(app._models["shared"].model) == 0


def test_cancelled_preview_leaves_no_hook(sae_folder: str) -> None:
    model = app._models["shared"].model
    base_alone = _final(_args(sae_folder, "3:8"))[0]
    stream = app.preview(*_args(sae_folder, "3:8"))
    for _base, steered, _, _ in stream:
        if steered:  # the generation has started: the steered row's hooks are on the model
            assert hook_count(model) > 0
            break
    stream.close()  # what Gradio does when the user leaves or presses stop
    assert hook_count(model) == 0
    assert _final(_args(sae_folder, "3:8"))[0] == base_alone


def test_failed_generation_leaves_no_hook(sae_folder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = app._models["shared"]
    real = lm.model.generate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the batched generation fails with the steering hooks on
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(lm.model, "generate", flaky)
    with pytest.raises(gr.Error, match="Generation failed: device lost"):
        list(app.preview(*_args(sae_folder, "3:8")))
    assert hook_count(lm.model) == 0
    monkeypatch.setattr(lm.model, "generate", real)
    assert _final(_args(sae_folder, "3:8"))[1]
