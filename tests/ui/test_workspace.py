import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import build_sae, tiny_lm
from steer_core.ui.catalog import SAEChoice, folder_choice
from steer_core.ui.workspace import Workspace, prune_work_folders
from steer_core.vectors.recipe import VectorRecipe


def test_each_model_loads_once_even_when_asked_concurrently() -> None:
    calls: list[str] = []

    def loader(name: str, token: object = None):
        calls.append(name)
        return tiny_lm("llama")

    ws = Workspace(loader)
    threads = [threading.Thread(target=ws.model, args=("m",)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["m"] and ws.model(" m ") is ws.models["m"]
    with pytest.raises(ValueError, match="no model chosen"):
        ws.model(" ")


def test_vectors_and_labels_are_built_once_and_forgotten_with_their_model(tmp_path: Path) -> None:
    ws = Workspace(lambda _n, **_: tiny_lm("llama"))
    lm = ws.model("m")
    sae = folder_choice(str(build_sae(tmp_path / "sae", d_sae=8)))
    recipe = VectorRecipe("sae", (2.0,), "resid", path=sae.path, features=(1,))
    assert ws.vector(lm, recipe) is ws.vector(lm, recipe)
    labels = ws.labels(sae, lm)
    assert set(labels.labels) == set(range(8)) and ws.labels(sae, lm) is labels
    ws.forget_model("m")
    assert ws.models == {} and ws.vector(ws.model("m"), recipe) is not None


def test_sae_must_fit_the_model_and_missing_embedded_sae_is_named(tmp_path: Path) -> None:
    ws = Workspace(lambda _n, **_: tiny_lm("llama"))
    wide = folder_choice(str(build_sae(tmp_path / "wide", d_in=48)))
    with pytest.raises(ValueError, match="d_in=48"):
        ws.sae(wide, ws.model("m"))
    missing = SAEChoice("embedded: x (offline)", path=str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="embedded SAE is not in this install"):
        ws.sae(missing)


def test_old_export_and_control_vector_folders_are_pruned_and_recent_ones_stay(tmp_path: Path) -> None:
    now = 1_000_000.0
    ages = {"steer-export-old": 7200, "steer-cv-old": 3601, "steer-export-new": 600, "steer-cv-new": 0,
            "other-old": 7200}  # fmt: skip
    for name, age in ages.items():
        (tmp_path / name / "adapter").mkdir(parents=True)
        (tmp_path / name / "adapter" / "w.bin").write_bytes(b"x")
        os.utime(tmp_path / name, (now - age, now - age))
    old_file = tmp_path / "steer-export-file"  # not a folder the app made: left alone
    old_file.write_text("x")
    os.utime(old_file, (now - 7200, now - 7200))
    removed = prune_work_folders(tmp_path, now=now)
    assert sorted(p.name for p in removed) == ["steer-cv-old", "steer-export-old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-old", "steer-cv-new", "steer-export-file",
                                                          "steer-export-new"]  # fmt: skip
    assert prune_work_folders(tmp_path, now=now) == []
    assert len(prune_work_folders(tmp_path, now=now + 3601)) == 2  # an hour later the recent ones go too


# ---- bounded by the hardware, and by who may read what ----


def test_a_model_too_large_for_the_budget_is_refused_before_it_downloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fakehub import FakeHub, Repo, safetensors_header, use
    from steer_core.hardware import Budget

    with FakeHub({}).serve() as hub:
        use(hub, monkeypatch)
        header = safetensors_header({"w": ("BF16", [2**16, 2**16])})  # 4.3B parameters, in a few bytes
        hub.add("big/model", Repo("big", {"model.safetensors": header, "config.json": b"{}"}))
        ws = Workspace(lambda *_a, **_k: pytest.fail("must not load"), budget=Budget(16 * 10**9, "test limit"))
        too_large = r"big/model has 4.29B parameters: 17.2 GB in float32, more than the 8.0 GB this server holds"
        with pytest.raises(ValueError, match=too_large + r" models in \(half of its 16.0 GB memory, test"):
            ws.model("big/model")
        assert all(r.status == 206 for r in hub.log if "/resolve/" in r.path and r.method == "GET")


def test_caches_drop_the_least_recently_used_to_make_room_and_keep_the_pinned() -> None:
    from steer_core.hardware import Budget
    from steer_core.ui.workspace import model_bytes

    size = model_bytes(tiny_lm("llama"))
    ws = Workspace(lambda _n, **_: tiny_lm("llama"), budget=Budget(int(2.5 * size / 0.5), "test"), pinned=("a",))
    for name in ("a", "b", "c"):
        ws.model(name)
    assert list(ws.models) == ["a", "b"] or list(ws.models) == ["a", "c"]
    assert "a" in ws.models and "c" in ws.models, "the pinned default stays; the least recently used (b) goes"
    ws.model("a")
    ws.model("d")
    assert set(ws.models) == {"a", "d"} and ws.models.total <= ws.budget.models


def test_one_visitors_slow_sae_load_does_not_hold_up_what_is_loaded(tmp_path: Path) -> None:
    from steer_core.sae.feature import load_sae

    release = threading.Event()
    started = threading.Event()

    def slow_loader(**kwargs: object):
        if str(kwargs.get("path")).endswith("held"):
            started.set()
            assert release.wait(30)
        return load_sae(**kwargs)  # type: ignore[arg-type]

    ws = Workspace(lambda _n, **_: tiny_lm("llama"), sae_loader=slow_loader)
    lm = ws.model("m")
    fast = folder_choice(str(build_sae(tmp_path / "quick", d_sae=8)))
    slow = folder_choice(str(build_sae(tmp_path / "held", d_sae=8)))
    ws.sae(fast, lm)
    loading = threading.Thread(target=ws.sae, args=(slow, lm))
    loading.start()
    assert started.wait(30)
    done = threading.Event()

    def meanwhile() -> None:
        ws.sae(fast, lm, load=False)
        ws.vector(lm, VectorRecipe("sae", (2.0,), "resid", path=fast.path, features=(1,)))
        ws.model("m", load=False)
        done.set()

    threading.Thread(target=meanwhile).start()
    assert done.wait(20), "the loaded SAE and model were held up by another SAE's load"
    release.set()
    loading.join()


@pytest.fixture()
def visitors_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A Hub on loopback with alice's private model and a gated model she accepted, and an empty Hub cache."""
    from fakehub import FakeHub, use
    from spacesim import tiny_repo

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    with FakeHub({"hf_alice": "alice", "hf_owner": "owner"}).serve() as hub:
        use(hub, monkeypatch)
        hub.add("alice/secret", tiny_repo(tmp_path / "m", "alice", private=True))
        hub.add("org/gated", tiny_repo(tmp_path / "g", "org", gated=True, readers={"alice"}))
        yield hub, cache


@pytest.mark.parametrize("repo", ["alice/secret", "org/gated"])
def test_what_a_visitor_reads_with_their_own_token_stays_theirs(visitors_hub: Any, repo: str) -> None:
    """In memory, and on disk: huggingface_hub serves a cached file when the Hub refuses a request, so her files must
    never be in the cache the next visitor's reads fall back to."""
    from steer_core.hub import Access
    from steer_core.model import load_model

    hub, cache = visitors_hub
    ws = Workspace(load_model)
    alice = Access(space=True, owner="hf_owner", visitor="hf_alice")
    anonymous = Access(space=True, owner="hf_owner")
    mine = ws.model(repo, alice)
    assert ws.model(repo, alice) is mine and repo not in ws.models, "kept for her, not under the shared name"
    assert not (cache / f"models--{repo.replace('/', '--')}").exists(), "nothing of it in the shared Hub cache"
    assert not list(Path(alice.cache_dir or "").rglob("*.safetensors")), "her own download folder is emptied"
    with pytest.raises(LookupError, match="sign in|gated"):
        ws.model(repo, anonymous)
    with pytest.raises(LookupError, match="could not load model"):  # and a load past the check fails too
        load_model(repo, token=False)
    assert hub.tokens_seen(repo) <= {"hf_alice", None}, "never the owner's token"
