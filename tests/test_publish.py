import json
from pathlib import Path

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core.export import export
from steer_core.publish import check_repo_id, push
from steer_core.sites import HookPoint
from steer_core.vector import SteeringVector

SECRET = "hf_test_SECRET_token_value"


class FakeApi:
    calls: list = []

    def __init__(self, token: str | None = None) -> None:
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id: str, **kwargs: object) -> str:
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs: object) -> None:
        FakeApi.calls.append(("upload_folder", kwargs))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL)})
    return export(tiny_lm("llama"), vec, tmp_path / "a", mode="exact", verify_tokens=256).folder


def test_push_is_one_commit_and_never_writes_the_token(
    folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    FakeApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    url = push(folder, "me/steer-test", token=SECRET, private=True)
    assert url == "https://huggingface.co/me/steer-test"
    kinds = [c[0] for c in FakeApi.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    assert FakeApi.calls[1][2]["private"] is True
    assert "me/steer-test" in (folder / "README.md").read_text()
    for path in folder.rglob("*"):
        assert SECRET.encode() not in path.read_bytes()
    assert SECRET not in caplog.text


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "me/bad name", "/x", "me/..", "me/x.git"])
def test_bad_repo_ids(repo: str) -> None:
    with pytest.raises(ValueError, match="repo id"):
        check_repo_id(repo)


def test_unverified_adapter_is_not_pushed(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    meta = json.loads((folder / "steering.json").read_text())
    del meta["fidelity"]
    (folder / "steering.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not verified"):
        push(folder, "me/x")
    assert FakeApi.calls == []
