"""The receiving side of sharing (#40), handler by handler on a tiny model and the fake Hub (tests/fakehub.py) as a
public Space runs it: one visitor exports and pushes an adapter; another, anonymous, finds it by a word in its label,
opens it, previews it against its own stored vector (no SAE), verifies it here and writes it for llama.cpp and at
rank 4, then pushes that. And each adapter that cannot be opened as one of ours gets its one message."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
import torch

import app
from fakehub import SHA, FakeHub, Repo, use
from helpers import build_sae, tiny_lm, tiny_model
from steer_core.adapter.card import model_card
from steer_core.adapter.record import SteeringRecord
from steer_core.adapter.served import read_adapter
from steer_core.generate import GenerationConfig, stream_sides
from steer_core.ui.form import SAE_FEATURES, SERVED_VECTOR, SteeringForm
from steer_core.vectors.vector import SteeringVector

ALICE, BOB, OWNER = "hf_alice_token", "hf_bob_token", "hf_owner_SECRET"
NO_PROGRESS = {"progress": lambda *a, **k: None}
OWN_VECTOR = SteeringForm(SERVED_VECTOR).values()  # no SAE chosen, no features: the adapter's own vector
PROMPT = "hello"


@pytest.fixture(autouse=True)
def tiny_model_loaded() -> None:
    app.workspace.forget_model("tiny")
    app._models["tiny"] = tiny_lm("llama")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A portable export of feature 3 of a tiny SAE, as the first visitor makes it, its feature labelled "puppies"
    (the label key another change adds to the provenance: written here until it lands)."""
    sae = build_sae(tmp_path_factory.mktemp("sae") / "sae", d_sae=16, model_name="tiny-llama")
    app.workspace.forget_model("tiny")
    app._models["tiny"] = tiny_lm("llama")
    form = SteeringForm(SAE_FEATURES, sae_folder=str(sae), mix="3:8", layer=1).values()
    folder = Path(app.run_export("tiny", "portable", 1024, 0, "peft", *form, **NO_PROGRESS)[4])
    return relabel(folder, tmp_path_factory.mktemp("puppies") / "adapter", "puppies")


def relabel(folder: Path, out: Path, label: str, **changes: Any) -> Path:
    """A copy of `folder` whose features are labelled `label` (steering.json and its card), with `changes` to
    steering.json's top level."""
    shutil.copytree(folder, out)
    data = json.loads((out / "steering.json").read_text())
    for feature in data["vector"]["provenance"]["features"]:
        feature["label"] = label
    data |= changes
    (out / "steering.json").write_text(json.dumps(data))
    (out / "README.md").write_text(model_card(SteeringRecord.from_dict(data)), encoding="utf-8")
    return out


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub({ALICE: "alice", BOB: "bob", OWNER: "owner"}).serve() as server:
        use(server, monkeypatch)
        yield server


@pytest.fixture()
def on_a_space(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "PUBLIC", True)
    monkeypatch.setattr(app, "OWNER_TOKEN", OWNER)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture()
def pushed(hub: FakeHub, exported: Path, on_a_space: None, tmp_path: Path) -> str:
    """Alice's public puppies adapter, a kittens one beside it, and a private one of hers."""
    assert app.run_push(str(exported), "alice/puppy-steer", False, False, ALICE).startswith("✅ Pushed")
    app.run_push(str(relabel(exported, tmp_path / "kittens", "kittens")), "alice/kitten-steer", False, False, ALICE)
    app.run_push(str(relabel(exported, tmp_path / "secret", "puppies secret")), "alice/secret", True, False, ALICE)
    return "alice/puppy-steer"


def anonymous() -> Any:
    return app.visitor_access(None)


def files_of(folder: Path, replaced: dict[str, bytes | None] | None = None) -> dict[str, bytes | Path]:
    """An adapter folder's files as a fake Hub repo holds them, some replaced (None: left out)."""
    files: dict[str, bytes | Path] = {p.name: p for p in folder.iterdir() if p.is_file()}
    for name, content in (replaced or {}).items():
        if content is None:
            files.pop(name, None)
        else:
            files[name] = content
    return files


def preview(repo: str, scale: float = 1.0, access: Any = None) -> tuple[str, str, str, str]:
    return list(app.preview("tiny", PROMPT, 8, 0, 0, repo, scale, *OWN_VECTOR, access=access or anonymous()))[-1]


def test_a_second_visitor_finds_opens_previews_verifies_and_reserves_a_shared_adapter(
    hub: FakeHub, exported: Path, pushed: str, tmp_path: Path
) -> None:
    import gguf

    from steer_core.adapter.targets import write_gguf_lora
    from steer_core.check.verify import load_peft

    # find: by a word of its label, anonymously (public adapters only), with what the card's metadata says
    rows = app.list_shared("tiny", "puppies", access=anonymous())
    assert [r[0] for r in rows] == [pushed]
    repo, labels, features, strength, site, top1, _servable, likes, downloads = rows[0]
    assert (labels, features, strength, site) == ("puppies", "#3", "8 × residual norm", "blocks.1.hook_resid_post")
    assert top1.endswith("%") and (likes, downloads) == (0, 0)
    assert {r[0] for r in app.list_shared("tiny", "", access=anonymous())} == {pushed, "alice/kitten-steer"}
    lists = [r for r in hub.log if r.path == "/api/models"]
    assert lists and {r.token for r in lists} == {None}, "an anonymous visitor of a Space lists with no token"
    alice = app.visitor_access(app_oauth(ALICE))
    assert "alice/secret" in [r[0] for r in app.list_shared("tiny", "puppies", access=alice)]
    assert app.pick_shared(gr.SelectData(None, {"index": [0, 0], "value": repo, "row_value": rows[0]})) == repo

    # open: the page filled from steering.json
    served, scale, source, strength, unit, panel, opened = app.open_shared("tiny", repo, access=anonymous())
    assert (served, scale, source, strength, unit) == (repo, 1.0, SERVED_VECTOR, 8.0, "× residual norm")
    assert (opened.repo, opened.commit, opened.kind) == (repo, SHA, "ours")
    assert f"### Opened `{repo}`" in panel and "labelled “puppies”" in panel and "feature 3, strength" in panel
    assert "By input format" in panel and "**Strength dial**: Servable" in panel and "own stored vector" in panel

    # preview: unsteered, the hook of its stored vector, and it served; no SAE anywhere in the form
    base, hook, served_text, info = preview(repo)
    lm = app._models["tiny"]
    vector = SteeringVector.load(exported / "steering_vector.safetensors")
    expected = list(stream_sides(lm, PROMPT, [None, vector, read_adapter(exported)], config=GenerationConfig(8)))[-1]
    assert (base, hook, served_text) == expected and hook != base
    assert "Served adapter" in info and "another vector" not in info
    # the engine scale: the hook at 2× its vector, the adapter at LoRA scale 2
    scaled = [None, vector.scaled(2), read_adapter(exported).at(2)]
    assert preview(repo, 2.0)[:3] == list(stream_sides(lm, PROMPT, scaled, config=GenerationConfig(8)))[-1]

    # verify here, beside the author's report: the same model and text give the same figures
    report = app.verify_shared("tiny", opened, access=anonymous())
    assert "| measure | published by its author | measured on this server |" in report
    top1_row = next(line for line in report.splitlines() if line.startswith("| top-1 next-token agreement"))
    theirs, ours = top1_row.strip("|").split("|")[1:3]
    assert theirs.strip() == ours.strip() != "n/a"

    # export for llama.cpp: the adapter as it is, GGUF'd, with where it came from
    text, download, folder, name = app.export_shared("tiny", opened, "llama.cpp", access=anonymous())
    names = set(zipfile.ZipFile(download.value["path"]).namelist())
    assert {"adapter.gguf", "control_vector.gguf", "adapter_model.safetensors", "steering.json", "README.md"} <= names
    meta = json.loads(Path(folder, "steering.json").read_text())
    assert meta["derived_from"] == {"repo": repo, "commit": SHA, "target": "llama.cpp", "refit": False}
    assert meta["target"] == "llama.cpp" and meta["fidelity"] == json.loads((exported / "steering.json").read_text())[
        "fidelity"]  # fmt: skip
    assert "Written for **llama.cpp**" in text and "--lora" in text and name.startswith("steer-tiny-llama-f3")
    reference = write_gguf_lora(exported, lm.model, tmp_path / "reference.gguf")
    assert Path(folder, "adapter.gguf").read_bytes() == reference.read_bytes(), "no refit: the author's weights"
    assert gguf.GGUFReader(str(Path(folder, "adapter.gguf"))).get_tensor(0).name.endswith(".lora_a")

    # and rank 4 (Fireworks): zero ranks added, the same function
    _, _, padded, _ = app.export_shared("tiny", opened, "fireworks", access=anonymous())
    assert json.loads(Path(padded, "adapter_config.json").read_text())["r"] == 4
    ids = lm.tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        before, after = (load_peft(lm.model, f)(input_ids=ids).logits for f in (exported, Path(padded)))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)

    # pushed by the second visitor: its card says where it came from
    assert app.run_push(folder, "bob/puppy-llama-cpp", False, False, BOB).startswith("✅ Pushed")
    card = hub.repos["bob/puppy-llama-cpp"].read("README.md").decode()
    assert f"derived from {repo} at commit {SHA[:12]}" in card and "Exported for **llama.cpp**" in card


def test_a_link_to_a_shared_adapter_opens_it_with_the_links_own_strength(hub: FakeHub, pushed: str) -> None:
    from steer_core.ui.link import restore

    values, notes = restore({"v": "1", "src": "adapter", "adapter": pushed, "scale": "1.5", "strength": "4"})
    assert not notes and (values["served"], values["served_scale"], values["source"]) == (pushed, 1.5, SERVED_VECTOR)
    panel, opened = app.open_linked("tiny", values["served"], values["source"], None, access=anonymous())
    assert opened.repo == pushed and f"### Opened `{pushed}`" in panel
    # opened already, or not a shared adapter's vector: nothing downloads again
    requests = len(hub.log)
    assert app.open_linked("tiny", pushed, SERVED_VECTOR, opened, access=anonymous())[1] is opened
    assert app.open_linked("tiny", pushed, SAE_FEATURES, None, access=anonymous())[1] is None
    assert len(hub.log) == requests


def app_oauth(token: str) -> gr.OAuthToken:
    return gr.OAuthToken(token=token, scope="openid profile write-repos", expires_at=2**40)


def test_an_adapter_of_another_base_model_is_one_message(hub: FakeHub, exported: Path, on_a_space: None,
                                                         tmp_path: Path) -> None:  # fmt: skip
    other = relabel(exported, tmp_path / "other", "puppies", base_model="org/other-model")
    hub.add("carol/other-base", Repo("carol", files_of(other)))
    with pytest.raises(gr.Error, match=r"made for base model org/other-model, not for the model loaded here "
                                       r"\(tiny-llama\): load org/other-model in step 1"):  # fmt: skip
        app.open_shared("tiny", "carol/other-base", access=anonymous())


def test_a_damaged_steering_json_is_one_message(hub: FakeHub, exported: Path, on_a_space: None) -> None:
    hub.add("carol/damaged", Repo("carol", files_of(exported, {"steering.json": b'{"mode": "portable", '})))
    damaged = r"carol/damaged's steering.json is damaged, so neither its recipe nor its author's report can be read"
    with pytest.raises(gr.Error, match=damaged + r" \(its steering.json is not valid JSON"):
        app.open_shared("tiny", "carol/damaged", access=anonymous())
    hub.add("carol/no-mode", Repo("carol", files_of(exported, {"steering.json": b'{"base_model": "tiny-llama"}'})))
    with pytest.raises(gr.Error, match="steering.json is damaged.*needs at least 'mode'"):
        app.open_shared("tiny", "carol/no-mode", access=anonymous())


def test_a_missing_steering_json_opens_with_its_stored_vector_and_says_what_it_lacks(
    hub: FakeHub, exported: Path, on_a_space: None
) -> None:
    hub.add("carol/no-record", Repo("carol", files_of(exported, {"steering.json": None})))
    *_, panel, opened = app.open_shared("tiny", "carol/no-record", access=anonymous())
    assert opened.kind == "no_record" and "its steering.json is missing" in panel and "stored hook vector" in panel
    base, hook, served, _ = preview("carol/no-record")
    assert hook != base and served  # its hook from the stored vector, beside it served
    for action in (lambda: app.verify_shared("tiny", opened), lambda: app.export_shared("tiny", opened, "llama.cpp")):
        with pytest.raises(gr.Error, match="carol/no-record has no steering.json: .* needs its steering.json"):
            action()


def test_a_plain_lora_previews_as_served_and_its_hook_column_says_why_it_is_empty(
    hub: FakeHub, on_a_space: None, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    lora.save_pretrained(str(tmp_path / "plain"))
    files = {f: tmp_path / "plain" / f for f in ("adapter_config.json", "adapter_model.safetensors")}
    hub.add("dave/plain-lora", Repo("dave", files))  # type: ignore[arg-type]
    served, _, source, strength, _, panel, opened = app.open_shared("tiny", "dave/plain-lora", access=anonymous())
    assert (served, source, opened.kind) == ("dave/plain-lora", SERVED_VECTOR, "plain")
    assert "A plain LoRA, not exported by steer_core" in panel and strength == gr.update()
    base, hook, served_text, info = preview("dave/plain-lora")
    assert hook.startswith("(no hook: dave/plain-lora is a plain LoRA") and served_text and served_text != base
    assert "Served adapter" in info
    with pytest.raises(gr.Error, match="is a plain LoRA, not exported by steer_core: verifying needs"):
        app.verify_shared("tiny", opened)
    with pytest.raises(gr.Error, match="Open a shared adapter first"):
        app.export_shared("tiny", None, "llama.cpp")


def test_the_adapters_own_vector_is_for_the_preview_only() -> None:
    with pytest.raises(gr.Error, match="steers the preview only: to write that adapter for another engine"):
        app.run_export("tiny", "portable", 1024, 0, "peft", *OWN_VECTOR, **NO_PROGRESS)
    with pytest.raises(gr.Error, match="Served adapter: no adapter given"):
        list(app.preview("tiny", PROMPT, 8, 0, 0, "", 1, *OWN_VECTOR))
