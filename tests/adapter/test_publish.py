"""Pushes through huggingface_hub's own client to a Hub on loopback (tests/fakehub.py), at the HTTP layer."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fakehub import FakeHub, Repo, use
from helpers import D_MODEL, build_sae, tiny_lm
from steer_core.adapter.publish import PushError, RepoExistsError, check_repo_id, push
from steer_core.export import export
from steer_core.sites import HookPoint
from steer_core.vectors.recipe import VectorRecipe
from steer_core.vectors.vector import SteeringVector

SECRET = "hf_test_SECRET_token_value"
OTHER = "hf_someone_else"


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub({SECRET: "me", OTHER: "someone"}).serve() as server:
        use(server, monkeypatch)
        yield server


def _export(out: Path, target: str = "peft") -> Path:
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL)})
    mode = "portable" if target == "llama.cpp" else "exact"
    return export(
        tiny_lm("llama"), vec, out, mode=mode, verify_tokens=256, calibration_tokens=512, target=target
    ).folder


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return _export(tmp_path / "a")


def test_push_is_one_commit_as_the_token_and_never_writes_the_token(
    folder: Path, hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    result = push(folder, "me/steer-test", token=SECRET, private=True)
    assert result.url.endswith("/me/steer-test") and result.private and not result.plan.exists
    assert len(hub.commits["me/steer-test"]) == 1
    assert sorted(hub.repos["me/steer-test"].files) == sorted(p.name for p in folder.iterdir())
    assert hub.repos["me/steer-test"].private
    assert hub.tokens_seen("me/steer-test") == {SECRET}, "every request of the push carried the pusher's token"
    assert "me/steer-test" in (folder / "README.md").read_text()
    listed = json.loads(hub.repos["me/steer-test"].files["steering.json"])["files"]
    assert sorted(listed) == sorted(hub.repos["me/steer-test"].files), "steering.json lists what the push wrote"
    for path in folder.rglob("*"):
        assert SECRET.encode() not in path.read_bytes()
    assert SECRET not in caplog.text


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "me/bad name", "/x", "me/..", "me/x.git"])
def test_bad_repo_ids(repo: str) -> None:
    with pytest.raises(ValueError, match="repo id"):
        check_repo_id(repo)


def test_unverified_adapter_is_not_pushed(folder: Path, hub: FakeHub) -> None:
    meta = json.loads((folder / "steering.json").read_text())
    del meta["fidelity"]
    (folder / "steering.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not verified"):
        push(folder, "me/x", token=SECRET)
    assert hub.log == [], "nothing reached the Hub"


@pytest.mark.parametrize(
    ("fail", "message", "left"),
    [
        ({"create": 401}, r"the Hub refused the token \(401\): it is expired, revoked", "nothing was pushed"),
        ({"commit": 500}, r"the Hub failed the push \(500", "the repo created for it was deleted again"),
        ({"commit": "drop"}, r"could not reach the Hub", "the repo created for it was deleted again"),
    ],
)
def test_a_failed_push_says_what_happened_and_leaves_no_half_repo(
    folder: Path, hub: FakeHub, fail: dict, message: str, left: str
) -> None:
    hub.fail = fail
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir() if p.name != "README.md")
    with pytest.raises(PushError, match=message) as info:
        push(folder, "me/steer-fail", token=SECRET)
    text = str(info.value)
    assert left in text and str(folder) in text and SECRET not in text
    assert "me/steer-fail" not in hub.repos, "no repo is left claiming to hold the adapter"
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir() if p.name != "README.md") == before
    hub.fail = {}
    assert push(folder, "me/steer-fail", token=SECRET).url.endswith("me/steer-fail")  # and the next push works


def test_a_push_into_an_existing_repo_waits_for_the_users_say_so(folder: Path, hub: FakeHub) -> None:
    push(folder, "me/steer-twice", token=SECRET)
    with pytest.raises(RepoExistsError, match=r"me/steer-twice exists already \(public\)") as info:
        push(folder, "me/steer-twice", token=SECRET)
    assert "--update-existing" in str(info.value) and len(hub.commits["me/steer-twice"]) == 1
    hub.fail = {"commit": 500}
    with pytest.raises(PushError, match="no commit was made"):
        push(folder, "me/steer-twice", token=SECRET, update_existing=True)
    assert hub.repos["me/steer-twice"].files, "the repo and its first commit stay"
    assert not [r for r in hub.log if r.path == "/api/repos/delete"]


def test_an_update_removes_only_an_earlier_exports_leftovers_and_keeps_the_owners_files(
    tmp_path: Path, hub: FakeHub
) -> None:
    gguf = _export(tmp_path / "gguf", target="llama.cpp")
    push(gguf, "me/steer", token=SECRET)
    repo = hub.repos["me/steer"]
    assert {"adapter.gguf", "control_vector.gguf"} <= set(repo.files)
    repo.files["LICENSE"] = b"the owner's own licence"
    repo.files["notes/eval.md"] = b"the owner's notes"
    peft = _export(tmp_path / "peft")
    result = push(peft, "me/steer", token=SECRET, update_existing=True)
    assert result.plan.delete == ("adapter.gguf", "control_vector.gguf")
    assert set(result.plan.keep) == {"LICENSE", "notes/eval.md"}
    assert set(repo.files) == {p.name for p in peft.iterdir()} | {"LICENSE", "notes/eval.md"}
    assert repo.files["LICENSE"] == b"the owner's own licence"
    assert hub.commits["me/steer"][-1]["operations"].count({"delete": "adapter.gguf"}) == 1, "in the same commit"
    assert "removed adapter.gguf, control_vector.gguf" in result.describe(asked_private=False)


def test_an_update_keeps_a_readme_the_owner_wrote_and_reports_real_visibility(folder: Path, hub: FakeHub) -> None:
    hub.add("me/mine", Repo(owner="me", files={"README.md": b"# my model", "weights.bin": b"x" * 10}))
    with pytest.raises(RepoExistsError, match="It keeps README.md, weights.bin.*README stays.*STEERING.md"):
        push(folder, "me/mine", token=SECRET, private=True)
    result = push(folder, "me/mine", token=SECRET, private=True, update_existing=True)
    files = hub.repos["me/mine"].files
    assert files["README.md"] == b"# my model" and files["weights.bin"] == b"x" * 10
    assert b"library_name: peft" in files["STEERING.md"]
    assert not result.private and "is PUBLIC" in result.describe(asked_private=True)
    listed = json.loads(files["steering.json"])["files"]
    assert "STEERING.md" in listed and "README.md" not in listed, "a later push will not take the owner's README"


def test_an_update_over_an_export_from_before_files_were_listed(folder: Path, hub: FakeHub, tmp_path: Path) -> None:
    old_meta = {k: v for k, v in json.loads((folder / "steering.json").read_text()).items() if k != "files"}
    files = {"steering.json": json.dumps(old_meta).encode(), "Modelfile": b"FROM x",
             "README.md": b"---\ntags:\n- steer-core\n---", "data.csv": b"1"}  # fmt: skip
    hub.add("me/old", Repo(owner="me", files=files))
    result = push(folder, "me/old", token=SECRET, update_existing=True)
    assert result.plan.delete == ("Modelfile",) and result.plan.keep == ("data.csv",)
    assert "STEERING.md" not in hub.repos["me/old"].files, "our earlier README is ours to replace"


def test_a_push_into_someone_elses_namespace_is_refused(folder: Path, hub: FakeHub) -> None:
    with pytest.raises(PushError, match=r"refused the token \(403\)"):
        push(folder, "someone/steer", token=SECRET)
    assert "someone/steer" not in hub.repos


def test_the_adapter_folder_names_no_path_or_file_name_of_this_machine(tmp_path: Path) -> None:
    """An upload's path names the server's upload folder and the uploader's own file name; a typed SAE folder, the
    server's disk. None of it may reach steering.json, the card or any other file a push makes public."""
    from safetensors.torch import save_file

    uploads = tmp_path / "gradio-uploads" / "0123abcd"
    uploads.mkdir(parents=True)
    upload = uploads / "Jane Doe secret plan (1).safetensors"
    save_file({"v": torch.randn(D_MODEL)}, str(upload))
    sae = build_sae(tmp_path / "private-sae-folder", d_sae=8)
    lm = tiny_lm("llama")
    for i, recipe in enumerate([
        VectorRecipe("file", (2.0,), "resid", path=str(upload), layer=1),
        VectorRecipe("sae", (2.0,), "resid", path=str(sae), features=(3,)),
    ]):  # fmt: skip
        out = export(lm, recipe.build(lm), tmp_path / f"out{i}", mode="exact", verify_tokens=256).folder
        text = "\n".join(p.read_bytes().decode("utf-8", "replace") for p in out.iterdir())
        for leak in (str(tmp_path), "gradio-uploads", "Jane Doe", "secret plan", "private-sae-folder"):
            assert leak not in text, f"{leak!r} is in the adapter folder"
        prov = json.loads((out / "steering.json").read_text())["vector"]["provenance"]
        source = prov if i == 0 else prov["sae"]
        named, digest = source.get("file") or source.get("folder"), source["sha256"]
        assert named == f"{('vector', 'sae')[i]}-{digest[:12]}" + (".safetensors" if i == 0 else "")
