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
    # models hold 2.5 tiny models; the rest of 1 GB is the requests' memory, which holds an export on their vocabulary
    budget = Budget(10**9, "test", models_share=2.5 * size / 10**9)
    ws = Workspace(lambda _n, **_: tiny_lm("llama"), budget=budget, pinned=("a",))
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


# ---- admitted on what it will cost: loads in flight, pinned revisions, names ----


def test_concurrent_loads_reserve_what_they_were_admitted_for(tmp_path: Path) -> None:
    """Four loads at once (the page-load event can bypass the load lane): each reserves its bytes while it runs, and
    every room check counts them, so together they never exceed the budget."""
    import time

    from steer_core.hardware import Budget
    from steer_core.ui.workspace import model_bytes

    lm = tiny_lm("llama")
    folders = []
    for i in range(4):
        lm.model.save_pretrained(tmp_path / f"m{i}")
        folders.append(str(tmp_path / f"m{i}"))
    size = model_bytes(lm)
    budget = Budget(10**9, "test", models_share=2.5 * size / 10**9)  # two fit, not three
    seen: list[int] = []
    errors: list[str] = []

    def slow_loader(name: str, **_: object):
        seen.append(ws.models.total + ws.reserved)
        deadline = time.monotonic() + 30
        while len(errors) < 2 and time.monotonic() < deadline:  # in flight until the other two were answered
            time.sleep(0.01)
        return tiny_lm("llama")

    ws = Workspace(slow_loader, budget=budget)

    def load(name: str) -> None:
        try:
            ws.model(name)
        except ValueError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=load, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 2 and max(seen) <= budget.models, "never more in flight than the budget holds"
    assert len(errors) == 2 and all("held by loads in flight: try again once they finish" in e for e in errors)
    assert len(ws.models) == 2 and ws.models.total <= budget.models and ws.reserved == 0
    assert ws._key_locks == {}, "no lock outlives its load"


def test_key_locks_hold_loads_in_flight_only_and_names_are_checked_first() -> None:
    import time

    from steer_core.hub import Access

    ws = Workspace(lambda _n, **_: tiny_lm("llama"))
    ws.model("m")
    space = Access(space=True)
    for bad in ["a" * 10**6, "x" * 200, "a/b/c/d", "not a/name", "/etc/passwd", "~/x"]:
        start = time.perf_counter()
        with pytest.raises(ValueError, match="is not a Hub model id|is a path on this server|characters"):
            ws.model(bad, space)
        assert time.perf_counter() - start < 0.1
    with pytest.raises(ValueError, match="is not a Hub model id"):
        ws.model("bad name")
    assert ws._key_locks == {}


def test_a_config_only_model_is_refused_before_its_weights_and_a_model_loads_at_its_pinned_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import LlamaConfig

    from fakehub import FakeHub, Repo, safetensors_header, use
    from spacesim import tiny_repo
    from steer_core.model import load_model

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=32000)
    with FakeHub({}).serve() as hub:
        use(hub, monkeypatch)
        weights = safetensors_header({"w": ("F32", [16, 16])})
        hub.add(
            "evil/6b", Repo("evil", {"config.json": config.to_json_string().encode(), "model.safetensors": weights})
        )
        hub.add("evil/tokenizer", tiny_repo(tmp_path / "t", "evil"))
        hub.repos["evil/tokenizer"].declared = {"tokenizer.json": 2 * 10**9}
        hub.add("org/tiny", tiny_repo(tmp_path / "m", "org", sha="d" * 40))
        ws = Workspace(load_model)
        with pytest.raises(ValueError, match=r"evil/6b's config.json declares 6.74B parameters, but its weight files"):
            ws.model("evil/6b")
        with pytest.raises(ValueError, match=r"evil/tokenizer's tokenizer.json is 2.0 GB: this server downloads"):
            ws.model("evil/tokenizer")
        hub.repos["org/tiny"].sha = "d" * 40
        lm = ws.model("org/tiny")
        assert lm.model.config.hidden_size == 32
        loads = {
            r.path.split("/resolve/")[1].split("/")[0] for r in hub.requests_for("org/tiny") if "/resolve/" in r.path
        }
        downloads = [r for r in hub.log if r.method == "GET" and r.status == 200 and "/resolve/" in r.path]
    assert loads == {"d" * 40}, "every file of the load at the commit that was checked"
    assert not [r for r in downloads if r.repo in ("evil/6b", "evil/tokenizer") and "config.json" not in r.path]
    assert ws._key_locks == {} and ws.reserved == 0


def test_a_registry_sae_that_does_not_fit_is_refused_before_its_weights_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from fakehub import FakeHub, Repo, safetensors_header, use

    folder = "resid_post/layer_12_width_16k_l0_medium"
    with FakeHub({}).serve() as hub:
        use(hub, monkeypatch)
        hub.add("google/gemma-scope-2-270m-it", Repo("google", {
            f"{folder}/params.safetensors": safetensors_header({
                "w_enc": ("F32", [640, 16384]), "w_dec": ("F32", [16384, 640]), "b_enc": ("F32", [16384]),
                "b_dec": ("F32", [640]), "threshold": ("F32", [16384])}),
            f"{folder}/config.json": json.dumps({"layer": 12, "hf_hook_point_in": "model.layers.12.output"}).encode(),
        }))  # fmt: skip
        ws = Workspace(lambda _n, **_: tiny_lm("llama"), sae_loader=lambda **_: pytest.fail("must not load"))
        choice = SAEChoice("scope", release="gemma-scope-2-270m-it-res", sae_id="layer_12_width_16k_l0_medium")
        with pytest.raises(ValueError, match=r"has d_in=640, but the model's hidden size is 32"):
            ws.sae(choice, tiny_lm("llama"))
        assert not [r for r in hub.log if r.method == "GET" and r.status == 200 and "params" in r.path]
    assert ws._key_locks == {}


def test_an_export_on_a_huge_vocabulary_is_counted_with_its_model() -> None:
    """verify's vocabulary-wide tensors: 537 MB each for Gemma 3's 262k tokens (ten of them: docs/space.md measured
    4-6 GB); a model that fits by its weights but whose export would not fit is refused."""
    from steer_core.hardware import Budget
    from steer_core.ui.workspace import export_peak_bytes

    assert export_peak_bytes(262_144) == 10 * 4 * 2 * 256 * 262_144  # 5.4 GB
    assert export_peak_bytes(49_152) == 10 * 4 * 8 * 256 * 49_152  # SmolLM2: 8 documents a batch
    ws = Workspace(budget=Budget(16 * 10**9, "test"))
    assert ws.export_reserve(262_144) == 0, "every curated model's export fits the requests' memory"
    assert ws.export_reserve(4_000_000) == export_peak_bytes(4_000_000) - ws.requests_memory > 30 * 10**9


def test_exports_stop_when_their_folders_fill_the_quota(tmp_path: Path) -> None:
    from steer_core.ui.workspace import make_work_room

    old, new = tmp_path / "steer-export-old", tmp_path / "steer-export-new"
    for folder in (old, new):
        folder.mkdir()
        (folder / "adapter.zip").write_bytes(b"x" * 600)
    os.utime(old, (0, 0))  # past its hour: pruned first, and then there is room
    make_work_room(tmp_path, quota=1000)
    assert not old.exists() and new.exists()
    (tmp_path / "steer-cv-1").mkdir()
    (tmp_path / "steer-cv-1" / "cv.gguf").write_bytes(b"x" * 500)
    with pytest.raises(ValueError, match=r"space for exports is full \(1.1 kB of 1.0 kB"):
        make_work_room(tmp_path, quota=1000)
