import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core.export import export
from steer_core.publish import PushError, check_repo_id, push
from steer_core.sites import HookPoint
from steer_core.vector import SteeringVector

SECRET = "hf_test_SECRET_token_value"


class FakeApi:
    calls: list = []

    def __init__(self, token: str | None = None, endpoint: str | None = None) -> None:
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


# ---- the Hub faked at the HTTP layer: huggingface_hub's own client talks to a local server ----


class _Hub(http.server.BaseHTTPRequestHandler):
    """create, preupload, commit, delete; `fail` picks the failure: {"create": 401} or {"commit": 500 | "drop"}."""

    fail: ClassVar[dict[str, object]] = {}
    log: ClassVar[list[tuple[str, str]]] = []
    repos: ClassVar[dict[str, list[str]]] = {}  # repo -> files committed

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _step(self) -> str:
        path = self.path.split("?")[0]
        for step in ("create", "preupload", "commit", "delete", "validate-yaml"):
            if f"/{step}" in path:
                return step
        return path

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        step = self._step()
        _Hub.log.append((self.command, step))
        failure = _Hub.fail.get(step)
        if failure == "drop":
            self.connection.close()  # the network fails mid-request
            return
        if isinstance(failure, int):
            return self._reply(failure, {"error": f"fake Hub: {step} failed"})
        if step == "create":
            name = json.loads(body)["name"]
            repo = f"{json.loads(body).get('organization') or 'me'}/{name}"
            if repo in _Hub.repos:
                return self._reply(409, {"error": "You already created this model repo", "url": repo})
            _Hub.repos[repo] = []
            return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": repo})
        if step == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files], "commitOid": "0" * 40})  # fmt: skip
        if step == "commit":
            repo = "/".join(self.path.split("/api/models/")[1].split("/")[:2])
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            _Hub.repos[repo] = [x["value"]["path"] for x in lines if x["key"] == "file"]
            commit = f"http://{self.headers['Host']}/{repo}/commit/1"
            return self._reply(200, {"commitUrl": commit, "commitOid": "1" * 40})
        if step == "validate-yaml":  # the model card's metadata
            return self._reply(200, {"errors": [], "warnings": []})
        if step == "delete":
            _Hub.repos.pop(f"{json.loads(body).get('organization')}/{json.loads(body)['name']}", None)
            return self._reply(200, {})
        return self._reply(404, {"error": f"fake Hub has no {self.command} {self.path}"})

    do_POST = do_GET = do_DELETE = do_PUT = _handle


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Hub]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Hub.fail, _Hub.log, _Hub.repos = {}, [], {}
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    # huggingface_hub retries failed requests five times with backoff (1+2+4+8+8 s); the retries stay, the waits go
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda _s: None)
    yield _Hub
    server.shutdown()


def test_push_through_huggingface_hubs_client(folder: Path, hub: type[_Hub]) -> None:
    url = push(folder, "me/steer-ok", token=SECRET)
    assert url.endswith("me/steer-ok")
    assert sorted(hub.repos["me/steer-ok"]) == sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    ("fail", "message", "left"),
    [
        ({"create": 401}, r"the Hub refused the token \(401\): it is expired, revoked", "nothing was pushed"),
        ({"commit": 500}, r"the Hub failed the push \(500", "the repo created for it was deleted again"),
        ({"commit": "drop"}, r"could not reach the Hub", "the repo created for it was deleted again"),
    ],
)
def test_a_failed_push_says_what_happened_and_leaves_no_half_repo(
    folder: Path, hub: type[_Hub], fail: dict, message: str, left: str
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
    assert push(folder, "me/steer-fail", token=SECRET).endswith("me/steer-fail")  # and the next push works


def test_a_failed_push_to_an_existing_repo_keeps_its_earlier_commit(folder: Path, hub: type[_Hub]) -> None:
    push(folder, "me/steer-twice", token=SECRET)
    hub.fail = {"commit": 500}
    with pytest.raises(PushError, match="no commit was made"):
        push(folder, "me/steer-twice", token=SECRET)
    assert hub.repos["me/steer-twice"], "the repo and its first commit stay"
    assert ("DELETE", "delete") not in hub.log
