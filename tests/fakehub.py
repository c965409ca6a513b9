"""A Hugging Face Hub on loopback, at the HTTP layer, for huggingface_hub's own client (and so transformers' and
sae_lens' downloads, and our pushes), and for Gradio's OAuth sign-in on a Space.

It serves what those clients request: model info, file resolve (HEAD, GET, byte ranges), trees, paths-info,
safetensors headers, whoami, repo creation, preupload, commits and deletion, the model list (`HfApi.list_models`:
filter by tags, search, author, sort, limit, expand, full, cardData, with the tags and cardData the Hub derives from
each repo's README.md front matter); and an OpenID provider (discovery, authorize, token). It enforces who may read
and write: private repos for their owner, gated repos for the users who accepted them, writes for the namespace's
owner. Every request is logged with the token it carried, so tests can assert whose token reached which repo.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import math
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHA = "a" * 40
DECLARED_BODY = b"fake Hub: a declared file has no content"


@dataclass
class Repo:
    owner: str
    files: dict[str, bytes | Path] = field(default_factory=dict)  # path in repo -> content, or a file to serve
    private: bool = False
    gated: bool = False
    readers: set[str] = field(default_factory=set)  # users who may read it although private or gated
    safetensors_total: int | None = None  # the Hub's own parameter count in model info (absent: clients read headers)
    delay: float = 0.0  # seconds each whole-file download takes: a slow download
    # Files listed (model info, trees, paths-info, HEAD) with this size but with no content: a "2 GB tokenizer.json"
    # in a few bytes. A GET of one answers a short body (DECLARED_BODY), which a size check must never come to.
    declared: dict[str, int] = field(default_factory=dict)
    sha: str = SHA  # the commit the repo is at: what model info and resolve's X-Repo-Commit say
    likes: int = 0  # what the model list says of it
    downloads: int = 0
    last_modified: str = "2026-01-01T00:00:00.000Z"

    def paths(self) -> list[str]:
        return sorted({*self.files, *self.declared})

    def card_data(self) -> dict[str, Any]:
        """The README.md front matter as the Hub parses it (huggingface_hub's own pattern, then YAML); {} when there
        is none or it is not a mapping."""
        import yaml
        from huggingface_hub.repocard import REGEX_YAML_BLOCK

        if "README.md" not in self.files:
            return {}
        try:
            match = REGEX_YAML_BLOCK.search(self.read("README.md").decode("utf-8"))
            data = yaml.safe_load(match.group(2)) if match else None
        except (UnicodeDecodeError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    def tags(self) -> list[str]:
        """The tags the Hub lists a model with: its card's, its library, and base_model:[relation:]<id> for each base
        model it names, with the relation said in base_model_relation or, as the Hub infers it, adapter for a PEFT
        repo, merge for several bases, finetune otherwise."""
        card = self.card_data()
        tags = card.get("tags") or []
        tags = [tags] if isinstance(tags, str) else [t for t in tags if isinstance(t, str)]
        if isinstance(card.get("library_name"), str):
            tags.append(card["library_name"])
        bases = card.get("base_model") or []
        bases = [bases] if isinstance(bases, str) else [b for b in bases if isinstance(b, str)]
        relation = card.get("base_model_relation")
        if relation not in ("adapter", "merge", "quantized", "finetune"):
            peft = card.get("library_name") == "peft" or "adapter_config.json" in self.files
            relation = "merge" if len(bases) > 1 else "adapter" if peft else "finetune"
        for base in bases:
            tags += [f"base_model:{base}", f"base_model:{relation}:{base}"]
        return list(dict.fromkeys(tags))

    def size(self, path: str) -> int:
        if path in self.declared:
            return self.declared[path]
        content = self.files[path]
        return content.stat().st_size if isinstance(content, Path) else len(content)

    def read(self, path: str, start: int = 0, end: int | None = None) -> bytes:
        if path in self.declared:
            return DECLARED_BODY
        content = self.files[path]
        if isinstance(content, Path):
            with content.open("rb") as f:
                f.seek(start)
                return f.read(None if end is None else end - start + 1)
        return content[start : None if end is None else end + 1]


@dataclass
class Logged:
    method: str
    path: str
    token: str | None  # the bearer token the request carried
    repo: str | None
    status: int = 0


class FakeHub:
    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.log: list[Logged] = []
        self.fail: dict[str, int | str] = {}  # step ("create", "commit", ...) -> HTTP status or "drop"
        self.codes: dict[str, str] = {}  # OAuth: code -> token
        self.commits: dict[str, list[dict[str, Any]]] = {}  # repo -> operations of each commit
        self.oauth_user = "visitor"  # who signs in at /oauth/authorize
        self.url = ""

    def add(self, repo_id: str, repo: Repo) -> Repo:
        self.repos[repo_id] = repo
        return repo

    def requests_for(self, repo_id: str) -> list[Logged]:
        return [r for r in self.log if r.repo == repo_id]

    def tokens_seen(self, repo_id: str | None = None) -> set[str | None]:
        return {r.token for r in self.log if repo_id is None or r.repo == repo_id}

    @contextmanager
    def serve(self) -> Iterator[FakeHub]:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()


def _handler(hub: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        # ---- plumbing ----

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None

        def _user(self) -> str | None:
            return hub.tokens.get(self._token() or "")

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self._entry.status = status
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
            self._json(status, {"error": message}, headers)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _repo_of(self, rest: str) -> tuple[str, str]:
            """(repo id, what follows it) of a path inside a repo's URL space: known repos first, else two parts."""
            for repo_id in sorted(hub.repos, key=len, reverse=True):
                if rest == repo_id or rest.startswith(repo_id + "/"):
                    return repo_id, rest[len(repo_id) + 1 :]
            parts = rest.split("/", 2)
            return "/".join(parts[:2]), parts[2] if len(parts) > 2 else ""

        def _readable(self, repo_id: str, *, files: bool = True) -> Repo | None:
            """The repo if this request may read it (its files, or only its metadata, which a gated repo shows to
            everyone, as the Hub does); else the Hub's error has been sent and None is returned."""
            repo = hub.repos.get(repo_id)
            user = self._user()
            if repo is None or (repo.private and user != repo.owner and user not in repo.readers):
                self._error(401 if user is None else 404, "RepoNotFound", "Repository not found")
                return None
            if files and repo.gated and user != repo.owner and user not in repo.readers:
                self._error(401 if user is None else 403, "GatedRepo", "Access to this repo is restricted")
                return None
            return repo

        def _failure(self, step: str) -> bool:
            failure = hub.fail.get(step)
            if failure == "drop":
                self.close_connection = True
                self.connection.close()  # the network fails mid-request
                return True
            if isinstance(failure, int):
                self._error(failure, None, f"fake Hub: {step} failed")
                return True
            return False

        def _handle(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(url.path)
            query = urllib.parse.parse_qs(url.query)
            body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
            self._entry = Logged(self.command, path, self._token(), None)
            # huggingface_hub (2.4+) fetches its agent-harness registry once a day, anonymously, from whichever
            # endpoint is set: not a request of the app's. Logged only if it ever carries a token.
            if path == "/api/agent-harnesses" and self._entry.token is None:
                return self._json(200, {"standardEnvVars": [], "harnesses": {}})
            hub.log.append(self._entry)
            with suppress(BrokenPipeError, ConnectionResetError):
                self._route(path, query, body)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

        # ---- routes ----

        def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
            if path == "/.well-known/openid-configuration":
                return self._json(200, {
                    "issuer": hub.url, "authorization_endpoint": f"{hub.url}/oauth/authorize",
                    "token_endpoint": f"{hub.url}/oauth/token", "userinfo_endpoint": f"{hub.url}/oauth/userinfo",
                    "jwks_uri": f"{hub.url}/oauth/jwks", "response_types_supported": ["code"],
                })  # fmt: skip
            if path == "/oauth/authorize":  # the visitor signs in (and consents) at once
                user = hub.oauth_user
                code = hashlib.sha256(f"{user}{len(hub.codes)}".encode()).hexdigest()[:20]
                hub.codes[code] = next(t for t, u in hub.tokens.items() if u == user)
                target = query["redirect_uri"][0]
                sep = "&" if "?" in target else "?"
                state = urllib.parse.quote(query["state"][0])
                return self._send(302, headers={"Location": f"{target}{sep}code={code}&state={state}"})
            if path == "/oauth/token":
                form = urllib.parse.parse_qs(body.decode())
                token = hub.codes.pop(form.get("code", [""])[0], None)
                if token is None:
                    return self._json(400, {"error": "invalid_grant"})
                user = hub.tokens[token]
                return self._json(200, {
                    "access_token": token, "token_type": "bearer", "expires_in": 3600,
                    "scope": "openid profile write-repos manage-repos",
                    # no id_token, so authlib keeps this as the session's userinfo without checking a signature
                    "userinfo": {"sub": user, "name": user.title(), "preferred_username": user,
                                 "profile": f"{hub.url}/{user}", "picture": ""},
                })  # fmt: skip
            if path == "/api/whoami-v2":
                user = self._user()
                if user is None:
                    return self._error(401, None, "Invalid credentials in Authorization header")
                return self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": [], "auth": {}})
            if path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            if path == "/api/repos/delete":
                data = json.loads(body)
                repo_id = f"{data.get('organization') or self._user()}/{data['name']}"
                self._entry.repo = repo_id
                if self._failure("delete"):
                    return None
                hub.repos.pop(repo_id, None)
                return self._json(200, {})
            if path == "/api/models":
                return self._json(200, self._list_models(query))
            if path.startswith("/api/models/"):
                repo_id, rest = self._repo_of(path.removeprefix("/api/models/"))
                self._entry.repo = repo_id
                return self._api(repo_id, rest, query, body)
            repo_id, rest = self._repo_of(path.lstrip("/"))
            if rest.startswith("resolve/"):
                self._entry.repo = repo_id
                return self._resolve(repo_id, rest.split("/", 2)[2])
            return self._error(404, None, f"fake Hub has no {self.command} {path}")

        def _create(self, data: dict[str, Any]) -> None:
            user = self._user()
            namespace = data.get("organization") or user
            repo_id = f"{namespace}/{data['name']}"
            self._entry.repo = repo_id
            if self._failure("create"):
                return None
            if user is None or namespace != user:
                return self._error(401 if user is None else 403, None, f"You cannot create {repo_id}")
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": repo_id})
            private = data.get("visibility", "private" if data.get("private") else "public") != "public"
            hub.add(repo_id, Repo(owner=user, private=private))
            return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _api(self, repo_id: str, rest: str, query: dict[str, list[str]], body: bytes) -> None:
            step = rest.split("/", 1)[0]
            if step in ("preupload", "commit"):
                repo = hub.repos.get(repo_id)
                if self._failure(step):
                    return None
                if repo is None or self._user() != repo.owner:
                    return self._error(401 if self._user() is None else 403, None, f"You cannot write to {repo_id}")
                if step == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._json(200, {"files": modes, "commitOid": SHA})
                return self._commit(repo_id, repo, body)
            repo = self._readable(repo_id, files=step == "auth-check")
            if repo is None:
                return None
            if step == "auth-check":
                return self._json(200, {})
            if step in ("", "revision"):
                siblings = [{"rfilename": p, "size": repo.size(p)} for p in repo.paths()]
                info = {"id": repo_id, "private": repo.private, "gated": "auto" if repo.gated else False,
                        "sha": repo.sha,
                        "siblings": siblings}  # fmt: skip
                if repo.safetensors_total:
                    info["safetensors"] = {
                        "parameters": {"BF16": repo.safetensors_total},
                        "total": repo.safetensors_total,
                    }
                return self._json(200, info)
            if step == "tree":  # tree/{revision}[/{folder}]
                parts = rest.split("/", 2)
                folder = parts[2].strip("/") if len(parts) > 2 else ""
                recursive = query.get("recursive", ["False"])[0].lower() == "true"
                return self._json(200, self._tree(repo, folder, recursive))
            if step == "paths-info":
                form = urllib.parse.parse_qs(body.decode())
                entries = []
                for p in form.get("paths", []):
                    if p in repo.files or p in repo.declared:
                        entries.append(self._file_entry(repo, p))
                    elif any(f.startswith(p.rstrip("/") + "/") for f in repo.paths()):
                        entries.append({"type": "directory", "path": p.rstrip("/"), "oid": SHA})
                return self._json(200, entries)
            return self._error(404, None, f"fake Hub has no /api/models/{repo_id}/{rest}")

        def _list_models(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
            """GET /api/models: the repos this request may see (private ones only to their owner and readers) that
            carry every `filter` tag, whose id holds `search` and is in `author`'s namespace; sorted (descending) and
            cut to `limit`; each with the `expand`ed properties, or the Hub's default ones (+ cardData with `full` or
            `cardData`). One page: no Link header to a next one."""
            user = self._user()
            wanted = query.get("filter", [])
            search = query.get("search", [""])[0].lower()
            author = query.get("author", [None])[0]
            rows = []
            for repo_id, repo in list(hub.repos.items()):  # a commit of another thread may add one meanwhile
                if repo.private and user != repo.owner and user not in repo.readers:
                    continue
                tags, card = repo.tags(), repo.card_data()
                if not all(f in tags for f in wanted) or search not in repo_id.lower():
                    continue
                if author is not None and repo_id.split("/")[0] != author:
                    continue
                rows.append({
                    "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                    "author": repo_id.split("/")[0], "private": repo.private,
                    "gated": "auto" if repo.gated else False, "likes": repo.likes, "downloads": repo.downloads,
                    "lastModified": repo.last_modified, "createdAt": repo.last_modified, "tags": tags,
                    "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
                    "sha": repo.sha, "cardData": card,
                })  # fmt: skip
            sort = query.get("sort", [None])[0]
            if sort in ("likes", "downloads", "lastModified", "createdAt"):
                rows.sort(key=lambda r: r[sort], reverse=query.get("direction", ["-1"])[0] == "-1")
            if "limit" in query:
                rows = rows[: int(query["limit"][0])]
            expand = query.get("expand")
            full = query.get("full", ["false"])[0].lower() == "true"
            card = full or query.get("cardData", ["false"])[0].lower() == "true"
            default = {"_id", "id", "modelId", "likes", "downloads", "private", "tags", "pipeline_tag", "library_name",
                       "createdAt"} | ({"lastModified", "sha", "author", "gated"} if full else set())  # fmt: skip
            keep = {"_id", "id", *expand} if expand else default | ({"cardData"} if card else set())
            # json.dumps(default=str): a YAML date in a card is a date, the Hub's JSON a string
            return json.loads(json.dumps([{k: v for k, v in r.items() if k in keep} for r in rows], default=str))

        def _file_entry(self, repo: Repo, path: str) -> dict[str, Any]:
            return {
                "type": "file",
                "path": path,
                "size": repo.size(path),
                "oid": hashlib.sha1(path.encode()).hexdigest(),
            }

        def _tree(self, repo: Repo, folder: str, recursive: bool) -> list[dict[str, Any]]:
            prefix = folder + "/" if folder else ""
            out, dirs = [], set()
            for path in repo.paths():
                if not path.startswith(prefix):
                    continue
                inner = path[len(prefix) :]
                if "/" in inner and not recursive:
                    dirs.add(prefix + inner.split("/", 1)[0])
                    continue
                parts = inner.split("/")
                dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts) - 1))
                out.append(self._file_entry(repo, path))
            return [{"type": "directory", "path": d, "oid": SHA} for d in sorted(dirs)] + out

        def _resolve(self, repo_id: str, file: str) -> None:
            repo = self._readable(repo_id)
            if repo is None:
                return None
            if file not in repo.files and file not in repo.declared:
                return self._error(404, "EntryNotFound", f"{file} does not exist")
            size = repo.size(file)
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha1((repo_id + file).encode()).hexdigest()}"',
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}  # fmt: skip
            if self.command == "HEAD":
                self._entry.status = 200
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                return None
            ranged = self.headers.get("Range") or self.headers.get("range")
            if ranged and ranged.startswith("bytes="):
                first, _, last = ranged.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                return self._send(206, repo.read(file, start, end), headers)
            if file in repo.declared:  # listed at its declared size, sent as what it is: a few bytes
                return self._send(200, DECLARED_BODY, headers)
            if repo.delay and file.endswith(".safetensors"):  # a slow link: the bytes trickle in over `delay` s
                return self._trickle(repo.read(file), headers, repo.delay)
            return self._send(200, repo.read(file), headers)

        def _trickle(self, body: bytes, headers: dict[str, str], seconds: float, parts: int = 20) -> None:
            self._entry.status = 200
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            step = -(-len(body) // parts)
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                self.wfile.flush()
                time.sleep(seconds / parts)

        def _commit(self, repo_id: str, repo: Repo, body: bytes) -> None:
            import base64

            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            operations = []
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else b""
                    repo.files[value["path"]] = content
                    repo.declared.pop(value["path"], None)
                    operations.append({"add": value["path"]})
                elif line["key"] == "deletedFile":
                    repo.files.pop(value["path"], None)
                    repo.declared.pop(value["path"], None)
                    operations.append({"delete": value["path"]})
            hub.commits.setdefault(repo_id, []).append({"operations": operations, "token": self._token()})
            return self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{SHA}", "commitOid": SHA})

    return Handler


def use(hub: FakeHub, monkeypatch: Any) -> None:
    """Point this process's huggingface_hub (and so transformers, sae_lens and our pushes) at `hub`, online, without
    its retry back-off waits. A process started afterwards gets the same from HF_ENDPOINT in its environment."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub's module-level functions (file_exists, ...) are methods of an HfApi made at import
    monkeypatch.setattr("huggingface_hub.hf_api.api.endpoint", hub.url)
    # transformers keeps one HfApi, made on first use with the endpoint of that moment (an earlier test's Hub, whose
    # kept-alive connections may still answer): the next use makes a new one here
    if "transformers.utils.hub" in sys.modules:
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)
    # huggingface_hub retries failed requests five times with backoff (1+2+4+8+8 s); the retries stay, the waits go
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda _s: None)


def safetensors_header(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """The header of a safetensors file (no data after it): what size checks read with a range request, so a test can
    put a 19 GB SAE "on the Hub" in a few hundred bytes. Anything that downloads it whole gets a truncated file."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    data = json.dumps(header).encode()
    return len(data).to_bytes(8, "little") + data
