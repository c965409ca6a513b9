"""The batched preview: each side's steering on its own row only, and the served adapter as PEFT serves it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from helpers import D_MODEL, hook_count, tiny_lm
from steer_core.adapter.served import read_adapter
from steer_core.check.verify import load_peft
from steer_core.export import export
from steer_core.generate import GenerationConfig, complete, stream, stream_sides
from steer_core.model import LoadedModel
from steer_core.sites import HookPoint
from steer_core.steer import steering
from steer_core.vectors.vector import SteeringVector

CONFIG = GenerationConfig(max_new_tokens=16)


def _vec(seed: int, scale: float = 4.0, layer: int = 1) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({HookPoint(layer, "resid_post"): torch.randn(D_MODEL, generator=g) * scale})


def _last(it) -> tuple[str, ...]:
    out = ()
    for out in it:  # noqa: B007
        pass
    return out


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_lm("llama")


@pytest.fixture(scope="module")
def adapter(lm: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A portable (fitted, so not exact) adapter: its served text may differ from the hook's, as it does in use."""
    out = tmp_path_factory.mktemp("adapter") / "a"
    export(lm, _vec(7, scale=6.0), out, mode="portable", calibration_tokens=512, verify_tokens=256)
    return out


def test_the_row_mask_steers_its_row_only(lm: LoadedModel) -> None:
    ids = lm.tokenizer("hello there", return_tensors="pt").input_ids
    vec = _vec(0)
    with torch.no_grad():
        plain = lm.model(ids).logits[0]
        with steering(lm.model, vec):
            steered = lm.model(ids).logits[0]
        with steering(lm.model, vec, rows=[1]):
            both = lm.model(ids.repeat(3, 1)).logits
    torch.testing.assert_close(both[0], plain)
    torch.testing.assert_close(both[2], plain)
    torch.testing.assert_close(both[1], steered)
    assert not torch.allclose(steered, plain)
    with (
        pytest.raises(ValueError, match="steered rows \\[4\\] but the batch has 3 rows"),
        steering(lm.model, vec, rows=[4]),
    ):
        lm.model(ids.repeat(3, 1))


def test_batched_sides_equal_their_solo_generations(lm: LoadedModel) -> None:
    vectors = [None, _vec(0), _vec(1)]
    batched = _last(stream_sides(lm, "hello there", vectors, config=CONFIG))
    solo = tuple(complete(lm, "hello there", vector=v, config=CONFIG) for v in vectors)
    assert batched == solo
    assert len(set(batched)) == 3, "the vectors must change the text for this test to mean much"
    assert hook_count(lm.model) == 0


def test_concurrent_batched_previews_never_share_steering(lm: LoadedModel) -> None:
    requests = [[None, _vec(s)] for s in range(6)]
    solo = [_last(stream_sides(lm, "hi", r, config=CONFIG)) for r in requests]
    results: dict[int, tuple[str, ...]] = {}
    barrier = threading.Barrier(len(requests))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = _last(stream_sides(lm, "hi", requests[i], config=CONFIG))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(requests))] == solo
    assert len({s[0] for s in solo}) == 1, "the unsteered row never sees another row's or request's vector"
    assert hook_count(lm.model) == 0


def test_the_served_side_is_what_peft_serves(lm: LoadedModel, adapter: Path) -> None:
    served = read_adapter(adapter)
    assert served.record is not None and served.record.mode == "portable"
    assert set(served.scaling.values()) == {1.0}
    peft_lm = LoadedModel(load_peft(lm.model, adapter), lm.tokenizer, lm.name, lm.base_model_id)  # type: ignore[arg-type]
    ids = lm.tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = peft_lm.model(ids).logits[0]
        with served.applied(lm.model, rows=[1]):
            rows = lm.model(ids.repeat(2, 1)).logits
    torch.testing.assert_close(rows[1], reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[0], lm.model(ids).logits[0].detach())
    # the preview's served column is `generate --adapter`'s text (which loads the folder with PeftModel)
    base, steered, served_text = _last(stream_sides(lm, "hello there", [None, _vec(7, 6.0), served], config=CONFIG))
    assert served_text == complete(peft_lm, "hello there", config=CONFIG)
    assert base == complete(lm, "hello there", config=CONFIG)
    assert steered == complete(lm, "hello there", vector=_vec(7, 6.0), config=CONFIG)
    assert hook_count(lm.model) == 0


def test_scaling_follows_the_adapter_config(lm: LoadedModel, adapter: Path, tmp_path: Path) -> None:
    """lora_alpha / r, as PEFT and every LoRA server read it; rsLoRA's alpha / sqrt(r) too."""
    import shutil

    copy = tmp_path / "alpha"
    shutil.copytree(adapter, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 3}))
    assert set(read_adapter(copy).scaling.values()) == {3.0}
    peft_lm = LoadedModel(load_peft(lm.model, copy), lm.tokenizer, lm.name, lm.base_model_id)  # type: ignore[arg-type]
    served = _last(stream_sides(lm, "hi", [read_adapter(copy)], config=CONFIG))[0]
    assert served == complete(peft_lm, "hi", config=CONFIG)


def test_bad_adapters_are_refused_with_the_reason(lm: LoadedModel, adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a PEFT LoRA adapter"):
        read_adapter(tmp_path)
    other = tiny_lm("gpt2")
    with pytest.raises(ValueError, match="does not have"), read_adapter(adapter).applied(other.model):
        pass
    assert hook_count(other.model) == 0
    with pytest.raises(ValueError, match="at least one side"):
        next(stream_sides(lm, "hi", []))


def test_a_single_side_streams_as_before(lm: LoadedModel) -> None:
    texts = list(stream(lm, "hello there", vector=_vec(0), config=CONFIG))
    assert len(texts) > 1, "streamed token by token"
    assert texts[-1] == complete(lm, "hello there", vector=_vec(0), config=CONFIG)


# ---- adapters a visitor names: patterns matched as names, Hub files sized and pinned ----


def _with_config(adapter: Path, folder: Path, **changes: object) -> Path:
    import shutil

    shutil.copytree(adapter, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return folder


def test_a_regex_pattern_is_refused_at_once(adapter: Path, tmp_path: Path) -> None:
    """PEFT runs alpha_pattern's keys as regular expressions; (a+)+b on 40 a's backtracks for hours."""
    import time

    for field in ("alpha_pattern", "rank_pattern"):
        bad = _with_config(adapter, tmp_path / field, **{field: {"(a+)+b": 2, "a" * 40: 1}})
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"{field} key '\(a\+\)\+b' uses a regex pattern .*; this server matches "
                           "module names exactly"):  # fmt: skip
            read_adapter(bad)
        assert time.perf_counter() - start < 0.5


def test_an_exact_alpha_pattern_key_scales_as_peft_does(lm: LoadedModel, adapter: Path, tmp_path: Path) -> None:
    name = next(iter(read_adapter(adapter).params))
    suffix = name.split(".", 2)[2]  # a dot-separated suffix of the module's name, as PEFT's keys usually are
    copy = _with_config(adapter, tmp_path / "exact", lora_alpha=1, alpha_pattern={suffix: 5, "other_proj": 7})
    served = read_adapter(copy)
    peft = load_peft(lm.model, copy)
    module = peft.get_submodule("base_model.model." + name)
    assert served.scaling[name] == module.scaling["default"] == 5.0  # type: ignore[index]
    assert {v for k, v in served.scaling.items() if k != name} <= {1.0}
    torch.testing.assert_close(served.params[name][0], read_adapter(adapter).params[name][0])


def test_a_hub_adapter_is_read_at_its_pinned_commit_with_its_steering(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from fakehub import FakeHub, Repo, use
    from steer_core.hub import Access
    from steer_core.ui.workspace import Workspace

    files = {p.name: p for p in adapter.iterdir() if p.is_file()}
    with FakeHub({}).serve() as hub:
        use(hub, monkeypatch)
        hub.add("bob/steer", Repo("bob", files, sha="e" * 40))  # type: ignore[arg-type]
        hub.add("bob/huge-config", Repo("bob", dict(files), declared={"adapter_config.json": 3 * 10**9}))
        hub.add("bob/huge", Repo("bob", dict(files), declared={"adapter_model.safetensors": 10**9}))
        ws = Workspace(lambda *_a, **_k: pytest.fail("no model loads"))
        space = Access(space=True)
        served = ws.served_adapter("bob/steer", space)
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"bob/huge-config's adapter_config.json is 3.0 GB: this server downloads "
                           "such a file up to 1.0 MB"):  # fmt: skip
            ws.served_adapter("bob/huge-config", space)
        with pytest.raises(
            ValueError, match=r"bob/huge's weights are 1.0 GB: this server previews adapters up to 67.1"
        ):
            ws.served_adapter("bob/huge", space)
        assert time.perf_counter() - start < 2
        with pytest.raises(ValueError, match="is a path on this server"):
            ws.served_adapter(str(adapter), space)
        revisions = {r.path.split("/resolve/")[1].split("/")[0] for r in hub.requests_for("bob/steer")
                     if "/resolve/" in r.path}  # fmt: skip
        refused = [r for r in hub.log if r.repo in ("bob/huge-config", "bob/huge") and "/resolve/" in r.path]
    local = read_adapter(adapter)
    assert revisions == {"e" * 40} and not refused
    assert served.source == "bob/steer" and served.record == local.record and served.vector is not None
    assert served.scaling == local.scaling and served.params.keys() == local.params.keys()
