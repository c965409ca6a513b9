"""What a request must be before it reaches the app's queue: bounded in bytes, in characters per field, in files, and
in how many of one visitor's requests may wait in each lane.

Gradio's queue runs any event by its `fn_index` (or its API name) for whoever writes the request by hand: a
component's `max_length`, `api_name=False` or a hidden button protect nothing, and Gradio downloads a `FileData` whose
path is a URL before any handler can look at it. So the bounds are enforced once, here, at the HTTP layer, for every
event alike, before Gradio parses or queues anything:

- a request body is at most `body_bytes`, and its JSON at most `depth` deep with lists of at most `items`;
- each input's strings are at most the component's own `max_length` (the page declares it on every textbox), or
  `text_chars` for components that declare none (dropdowns that take typed values, radios, numbers sent as text);
- a file input is a file uploaded to this server, never a URL;
- each lane (the event's concurrency group, `Lane`) keeps at most `waiting` requests waiting, so a flood of exports
  never fills the places previews wait in; one visitor (a browser session) has at most `per_visitor` requests of a
  lane in the app at once, and one address `per_address` times that (this machine's own loopback excepted: a local
  load test is its user's);
- uploads stop when the upload folder holds `upload_total` bytes.

Each refusal is a JSON `{"detail": message}` with an HTTP status the browser shows as that message (Gradio's page
shows `detail` for any status but 503 and 422) and a script can read.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer_core.hardware import format_bytes
from steer_core.ui.exposure import is_loopback

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_PREFIX = "/gradio_api"  # where Gradio mounts its routes (gradio.route_utils.API_PREFIX)
# The routes that run an event: the queue's, and the REST ones (refused by Gradio itself while api_open is False).
EVENT_ROUTES = ("/queue/join", "/call/v2/", "/call/", "/run/", "/api/")
UPLOAD_ROUTE = "/upload"
DEFAULT_LANE = "default"

# Characters per text field: the page declares each as its textbox's max_length, which the gate enforces for every
# request (the browser's own check protects nothing against a request written by hand).
PROMPT_CHARS = 16_384  # a preview's 1,024 tokens at up to 16 characters a token (Limits.check_prompt's own cut)
PROMPTS_CHARS = 65_536  # a box of contrastive prompts: 64 of ~1,000 characters (256 tokens each, Limits)
MIX_CHARS = 1_000  # 16 features mixed, as '123456:-12.25, '
NAME_CHARS = 256  # a Hub repo id (at most 96/96), an adapter's folder, a token, an SAE folder


@dataclass(frozen=True)
class Lane:
    """A kind of work with its own workers (a Gradio concurrency group), its own waiting line, and a share of it per
    visitor: a flood of one kind never takes the workers or the queue places of another."""

    name: str
    workers: int  # run at once
    per_visitor: int  # one visitor's requests of this lane in the app at once, waiting or running
    waiting: int  # requests of this lane waiting, all visitors together

    def __post_init__(self) -> None:
        if not all(isinstance(n, int) and n >= 1 for n in (self.workers, self.per_visitor, self.waiting)):
            raise ValueError(f"lane {self.name!r}: workers, per_visitor and waiting must be whole numbers >= 1")

    @property
    def events(self) -> dict[str, Any]:
        """The keyword arguments that put a Gradio event in this lane."""
        return {"concurrency_id": self.name, "concurrency_limit": self.workers}


# The app's lanes (app.py puts every event in one; a test checks that none is left out):
# - page: a page load shows what is loaded, and never loads;
# - preview: previews, searches, feature cards: a few seconds of CPU each; 4 at once keep a 2-core Space busy
#   without making each wait on the others for long. They never download or load;
# - light: form edits (a feature added, a unit changed, a row picked): milliseconds, no model;
# - load: a visitor's model or SAE (downloads, a minute of labelling), one at a time: a slow download holds up the
#   next load, never a preview, and two loads never hold two models' memory before the cache makes room;
# - heavy: exports, maps, control vectors (a minute or more of CPU, an export's calibration peaks at GBs), one at a
#   time, one per visitor;
# - push: network, seconds; two workers, so a slow upload does not hold up the next visitor's.
PAGE = Lane("page", workers=2, per_visitor=2, waiting=16)
PREVIEW = Lane("preview", workers=4, per_visitor=4, waiting=32)
LIGHT = Lane("light", workers=2, per_visitor=8, waiting=32)
LOAD = Lane("load", workers=1, per_visitor=2, waiting=8)
HEAVY = Lane("heavy", workers=1, per_visitor=1, waiting=6)
PUSH = Lane("push", workers=2, per_visitor=1, waiting=8)
LANES = {lane.name: lane for lane in (PAGE, PREVIEW, LIGHT, LOAD, HEAVY, PUSH)}
# An event in no named lane (a bug: Gradio would give it 1 worker of its own) is held to the tightest caps.
UNNAMED = Lane(DEFAULT_LANE, workers=1, per_visitor=1, waiting=4)


@dataclass(frozen=True)
class GateLimits:
    """The bounds of one request, and the lanes it queues in."""

    body_bytes: int = 1 << 20  # the largest form (two boxes of contrastive prompts) is ~260 kB of JSON
    text_chars: int = 1_000  # a model id is at most 193 characters, an SAE label a few dozen
    items: int = 256  # list items: a mix's checkbox group, a selected table row
    depth: int = 8  # a FileData inside a list inside the data is 4 deep
    per_address: int = 4  # × a lane's per_visitor: what every session from one address may have together
    upload_total: int = 2 * 10**9  # the upload folder, all visitors together (Gradio deletes uploads after an hour)
    lanes: dict[str, Lane] = field(default_factory=lambda: dict(LANES))

    def __post_init__(self) -> None:
        for name in ("body_bytes", "text_chars", "items", "depth", "per_address", "upload_total"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"gate limit {name} must be a whole number of at least 1, got {value!r}")

    def lane(self, name: str) -> Lane:
        return self.lanes.get(name, UNNAMED)

    @property
    def threads(self) -> int:
        """Every lane's workers at once, and two to spare for Gradio's own file and config routes."""
        return sum(lane.workers for lane in self.lanes.values()) + 2


class Refused(Exception):
    """A request the gate turns away: the HTTP status and the message the visitor reads."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Visitor:
    """Who sent a request: their browser session (Gradio's session hash) and their address."""

    session: str | None
    address: str


def address_of(headers: dict[str, str], client: str | None, *, behind_proxy: bool) -> str:
    """The visitor's address. Behind a Space's proxy every request comes from the proxy, which names the visitor
    first in X-Forwarded-For; elsewhere that header is the visitor's own to write, so the socket's peer is used."""
    if behind_proxy and (forwarded := headers.get("x-forwarded-for", "").split(",")[0].strip()):
        return forwarded[:64]
    return client or "unknown"


# ---- the data of one event ---------------------------------------------------------------------------------------


def check_shape(value: Any, limits: GateLimits) -> None:
    """JSON no deeper than `depth`, lists and objects of at most `items` entries (iteratively: no recursion to
    exhaust)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limits.depth:
                raise Refused(400, f"the request nests deeper than {limits.depth} levels: this server refuses it")
            if len(item) > limits.items:
                raise Refused(
                    400, f"the request has a list of {len(item)} items: this server takes up to {limits.items}"
                )
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))


def strings(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def file_paths(value: Any) -> Iterator[str]:
    """The paths of the FileData objects in an input (Gradio marks them with meta._type)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            meta = item.get("meta")
            if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData":
                yield str(item.get("path") or "")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def is_url(path: str) -> bool:
    return "://" in path or path.lower().startswith("data:")


def check_inputs(data: list[Any], components: list[Any], limits: GateLimits, uploads: str | Path | None = None) -> None:
    """Each input within its component's character limit; files by upload only (inside `uploads`, Gradio's upload
    folder, when given). Where the request's inputs do not line up with the event's (Gradio's simple API leaves some
    out), every string gets the largest limit of any."""
    caps = [getattr(c, "max_length", None) or limits.text_chars for c in components]
    widest = max(caps, default=limits.text_chars)
    aligned = len(data) == len(components)
    for i, value in enumerate(data):
        cap = caps[i] if aligned else widest
        label = _label(components[i]) if aligned else f"input {i + 1}"
        for text in strings(value):
            if len(text) > cap:
                raise Refused(400, f"{label} has {len(text):,} characters: this server takes up to {cap:,}")
        for path in file_paths(value):
            if is_url(path):
                raise Refused(
                    400, f"{label} names a file by URL ({path[:80]!r}): upload the file itself; this server does not "
                    "download files for a request"
                )  # fmt: skip
            if uploads is not None and not _inside(path, uploads):
                raise Refused(
                    400, f"{label} names a file that was not uploaded to this server ({path[:80]!r}): upload the file"
                )  # fmt: skip


def _inside(path: str, folder: str | Path) -> bool:
    try:
        return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)
    except ValueError:  # a relative path, or one on another drive
        return False


def _label(component: Any) -> str:
    label = getattr(component, "label", None)
    return f"{label!r}" if label else type(component).__name__


# ---- the queue, per lane and per visitor ---------------------------------------------------------------------------


def lane_of(fn: Any) -> str:
    return str(getattr(fn, "concurrency_id", None) or DEFAULT_LANE)


def check_room(
    queue: Any,
    lane: Lane,
    visitor: Visitor,
    limits: GateLimits,
    *,
    behind_proxy: bool,
    joining: Counter[tuple[str, ...]] | None = None,
) -> list[tuple[str, ...]]:
    """Refuse when the lane already has its `waiting` requests waiting, or this visitor (session or address) has
    their share of the lane in the app. Counts what Gradio's queue holds (its waiting lines, and every event pushed
    and not yet finished: `event_ids_to_events`) and what the gate let through that the queue has not taken yet
    (`joining`: requests sent at the same moment all pass the gate before the first reaches the queue). Returns the
    keys this request adds to `joining` until the queue has it."""
    joining = joining if joining is not None else Counter()
    keys = [("lane", lane.name), ("address", lane.name, visitor.address)]
    if visitor.session is not None:
        keys.append(("session", lane.name, visitor.session))
    line = getattr(queue, "event_queue_per_concurrency_id", {}).get(lane.name)
    waiting = (len(line.queue) if line is not None else 0) + joining[keys[0]]
    if waiting >= lane.waiting:
        raise Refused(
            429, f"{waiting} requests of this kind ({lane.name}) are waiting, the most this server queues: try again "
            "in a few minutes"
        )  # fmt: skip
    ours = joining[keys[1]]
    mine = joining[keys[2]] if visitor.session is not None else 0
    for event in list(getattr(queue, "event_ids_to_events", {}).values()):
        if lane_of(event.fn) != lane.name:
            continue
        if visitor.session is not None and event.session_hash == visitor.session:
            mine += 1
        request = getattr(event, "request", None)
        if request is not None and _event_address(request, behind_proxy) == visitor.address:
            ours += 1
    if mine >= lane.per_visitor:
        raise Refused(
            429, f"you already have {mine} request{'s' * (mine > 1)} of this kind ({lane.name}) running or waiting, "
            f"the most one visitor may: wait for {'them' if mine > 1 else 'it'} to finish"
        )  # fmt: skip
    if ours >= lane.per_visitor * limits.per_address and not is_loopback(visitor.address):
        raise Refused(
            429, f"{ours} requests of this kind ({lane.name}) from your address are running or waiting, the most one "
            "address may: wait for them to finish"
        )  # fmt: skip
    return keys


def _event_address(request: Any, behind_proxy: bool) -> str:
    headers = {k.lower(): v for k, v in getattr(request, "headers", {}).items()}
    client = getattr(request, "client", None)
    return address_of(headers, getattr(client, "host", None), behind_proxy=behind_proxy)


# ---- uploads -------------------------------------------------------------------------------------------------------


def folder_bytes(folder: str | Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue  # deleted meanwhile
    return total


def check_upload(length: str | None, used: int, limits: GateLimits) -> None:
    if length is None or not length.isdigit():
        raise Refused(411, "an upload must say its length (Content-Length)")
    if used + int(length) > limits.upload_total:
        raise Refused(
            507, f"this server's upload space is full ({format_bytes(used)} of {format_bytes(limits.upload_total)}, "
            "kept an hour): try again later"
        )  # fmt: skip


# ---- the middleware ------------------------------------------------------------------------------------------------


class RequestGate:
    """ASGI middleware in front of Gradio's app (`launch(app_kwargs={"middleware": [...]})`). `blocks` returns the
    page (its functions and its queue) once it is built; `upload_folder` is where Gradio keeps uploads."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        blocks: Callable[[], Any],
        limits: GateLimits | None = None,
        behind_proxy: bool = False,
        upload_folder: Callable[[], str | Path] | None = None,
    ) -> None:
        self.app, self.blocks, self.limits = app, blocks, limits or GateLimits()
        self.behind_proxy = behind_proxy
        self.upload_folder = upload_folder
        self.refused: Counter[int] = Counter()  # by status, for the tests and a curious owner
        self.joining: Counter[tuple[str, ...]] = Counter()  # requests let through that the queue has not answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        route = scope["path"].removeprefix(scope.get("root_path", "")).removeprefix(API_PREFIX)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            if route.rstrip("/") == UPLOAD_ROUTE:
                used = folder_bytes(self.upload_folder()) if self.upload_folder else 0
                check_upload(headers.get("content-length"), used, self.limits)
                return await self.app(scope, receive, send)
            body = await self._body(headers, receive)
            keys: list[tuple[str, ...]] = []
            if route.startswith(EVENT_ROUTES):
                client = scope.get("client")
                visitor_address = address_of(headers, client[0] if client else None, behind_proxy=self.behind_proxy)
                keys = self._check_event(route, body, visitor_address)
        except Refused as refused:
            self.refused[refused.status] += 1
            return await _answer(send, refused.status, str(refused))
        # Checked and counted with no await in between, so requests arriving together are counted one by one; the
        # count lasts until the queue has answered the join (and then holds the event itself).
        self.joining.update(keys)
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.joining.subtract(keys)

    async def _body(self, headers: dict[str, str], receive: Receive) -> bytes:
        """The whole body, refused past `body_bytes` (by its declared length first, without reading it)."""
        limit = self.limits.body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"the request is {format_bytes(int(declared))}: this server takes up to "
                               f"{format_bytes(limit)}")  # fmt: skip
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(400, "the request ended before its body did")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"the request is over {format_bytes(limit)}: this server takes up to "
                                   f"{format_bytes(limit)}")  # fmt: skip
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _check_event(self, route: str, body: bytes, address: str) -> list[tuple[str, ...]]:
        try:  # NaN and Infinity are not JSON, though Python's reader takes them: no handler sees a non-finite number
            payload = json.loads(body, parse_constant=_not_json)
        except (ValueError, RecursionError) as err:
            raise Refused(400, f"the request is not JSON this server reads ({type(err).__name__})") from err
        check_shape(payload, self.limits)
        if not isinstance(payload, dict):
            return []  # Gradio answers it
        blocks = self.blocks()
        fn = _event_fn(blocks, route, payload)
        if fn is None:
            return []  # no such event: Gradio says so
        data = payload.get("data")
        uploads = self.upload_folder() if self.upload_folder else None
        check_inputs(data if isinstance(data, list) else [data], list(getattr(fn, "inputs", [])), self.limits, uploads)
        session = payload.get("session_hash")
        visitor = Visitor(str(session)[:128] if session is not None else None, address)
        queue = getattr(blocks, "_queue", None)
        lane = self.limits.lane(lane_of(fn))
        return check_room(queue, lane, visitor, self.limits, behind_proxy=self.behind_proxy, joining=self.joining)


def middleware(blocks: Callable[[], Any], limits: GateLimits, *, behind_proxy: bool) -> Any:
    """The gate as Gradio's launch takes it (`app_kwargs={"middleware": [...]}`), over Gradio's upload folder."""
    from gradio.utils import get_upload_folder
    from starlette.middleware import Middleware

    return Middleware(
        RequestGate, blocks=blocks, limits=limits, behind_proxy=behind_proxy, upload_folder=get_upload_folder
    )


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _event_fn(blocks: Any, route: str, payload: dict[str, Any]) -> Any:
    fns = getattr(blocks, "fns", {})
    if route.startswith("/queue/join"):
        index = payload.get("fn_index")
        return fns.get(index) if isinstance(index, int) else None
    name = route.strip("/").split("/")[-1]
    return next((fn for fn in fns.values() if fn.api_name == name), None)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read once, then the connection's own messages (a streamed answer listens there for the client
    leaving)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"detail": message, "error": message}).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})
