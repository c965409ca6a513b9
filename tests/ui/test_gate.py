"""The request gate on its own (steer_core.ui.gate), in front of a stand-in app: what it refuses, with which message,
and that what it lets through arrives whole. The gate in front of the real app is tests/ui/test_hostile.py."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from steer_core.ui import gate
from steer_core.ui.exposure import TRUST_ENV, exposure
from steer_core.ui.gate import GateLimits, Lane, Refused, RequestGate, Visitor


@dataclass
class Component:
    label: str
    max_length: int | None = None


@dataclass
class Fn:
    inputs: list[Any]
    concurrency_id: str = "preview"
    api_name: str = "preview"


@dataclass
class Queue:
    event_queue_per_concurrency_id: dict[str, Any] = field(default_factory=dict)
    event_ids_to_events: dict[str, Any] = field(default_factory=dict)


def event(fn: Fn, session: str, address: str = "1.2.3.4") -> Any:
    request = SimpleNamespace(headers={}, client=SimpleNamespace(host=address))
    return SimpleNamespace(fn=fn, session_hash=session, request=request)


def run(app: RequestGate, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One POST through the gate: (status, JSON answer); the stand-in app answers 200 with the body it received."""
    sent: list[dict[str, Any]] = []
    chunks = [body[:10], body[10:]]  # the body in two messages, as a client may send it

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "client": ("1.2.3.4", 5),
             "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()]}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps({"echo": body.decode()}).encode()})


PROMPT = Component("Prompt", max_length=100)
FN = Fn([PROMPT, Component("Model")])


def gatekeeper(queue: Queue | None = None, **limits: Any) -> RequestGate:
    blocks = SimpleNamespace(fns={0: FN}, _queue=queue or Queue())
    return RequestGate(echo, blocks=lambda: blocks, limits=GateLimits(**limits))


def join(data: list[Any], session: str = "s1") -> bytes:
    return json.dumps({"data": data, "fn_index": 0, "session_hash": session}).encode()


def test_a_file_input_is_an_upload_to_this_server(tmp_path: Any) -> None:
    uploaded = tmp_path / "abc" / "v.npy"
    file = {"path": str(uploaded), "meta": {"_type": "gradio.FileData"}}
    gate.check_inputs(["x", file], FN.inputs, GateLimits(), uploads=tmp_path)
    for path in ("/etc/passwd", str(tmp_path / ".." / "elsewhere"), "relative/v.npy"):
        with pytest.raises(Refused, match="'Model' names a file that was not uploaded to this server"):
            gate.check_inputs(["x", {**file, "path": path}], FN.inputs, GateLimits(), uploads=tmp_path)


def test_a_request_within_bounds_reaches_the_app_whole() -> None:
    body = join(["hello", "smollm2"])
    assert run(gatekeeper(), "/gradio_api/queue/join", body) == (200, {"echo": body.decode()})


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (["x" * 101, "m"], 400, "'Prompt' has 101 characters: this server takes up to 100"),
        (["x", "m" * 1001], 400, "'Model' has 1,001 characters: this server takes up to 1,000"),
        (["x", [[[[[[[["deep"]]]]]]]]], 400, "nests deeper than 8 levels"),
        (["x", list(range(300))], 400, "a list of 300 items"),
        (
            ["x", {"path": "https://example.com/v.npy", "meta": {"_type": "gradio.FileData"}}],
            400,
            "'Model' names a file by URL ('https://example.com/v.npy'): upload the file itself",
        ),
    ],
)
def test_each_input_is_bounded_by_its_component(data: list[Any], status: int, message: str) -> None:
    got, answer = run(gatekeeper(), "/gradio_api/queue/join", join(data))
    assert got == status and message in answer["detail"]


def test_a_body_past_the_limit_is_refused_by_its_length_or_as_it_arrives() -> None:
    body = join(["x" * 2000, "m"])
    status, answer = run(gatekeeper(body_bytes=1000), "/gradio_api/queue/join", body, {"content-length": "2100"})
    assert status == 413 and answer["detail"] == "the request is 2.1 kB: this server takes up to 1.0 kB"
    status, answer = run(gatekeeper(body_bytes=1000), "/gradio_api/call/preview", body)  # no length declared
    assert status == 413


def test_non_finite_numbers_never_reach_a_handler() -> None:
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"data": ["x", ' + constant + b'], "fn_index": 0, "session_hash": "s"}'
        status, answer = run(gatekeeper(), "/gradio_api/queue/join", body)
        assert status == 400 and "not JSON this server reads" in answer["detail"]


def test_a_json_bomb_is_refused_without_recursion() -> None:
    status, answer = run(gatekeeper(), "/gradio_api/queue/join", b"[" * 200_000 + b"]" * 200_000)
    assert status == 400 and ("not JSON" in answer["detail"] or "deeper" in answer["detail"])


def test_each_lane_has_its_waiting_places_and_each_visitor_a_share() -> None:
    lane = Lane("preview", workers=1, per_visitor=2, waiting=3)
    limits = GateLimits(lanes={"preview": lane}, per_address=2)
    queue = Queue(event_ids_to_events={"a": event(FN, "s1"), "b": event(FN, "s1")})
    with pytest.raises(Refused, match="you already have 2 requests of this kind \\(preview\\)"):
        gate.check_room(queue, lane, Visitor("s1", "9.9.9.9"), limits, behind_proxy=False)
    gate.check_room(queue, lane, Visitor("s2", "9.9.9.9"), limits, behind_proxy=False)  # another visitor
    queue.event_ids_to_events |= {"c": event(FN, "s3"), "d": event(FN, "s4")}  # four from 1.2.3.4
    with pytest.raises(Refused, match="4 requests of this kind \\(preview\\) from your address"):
        gate.check_room(queue, lane, Visitor("s5", "1.2.3.4"), limits, behind_proxy=False)
    queue.event_queue_per_concurrency_id["preview"] = SimpleNamespace(queue=[1, 2, 3])
    with pytest.raises(Refused, match="3 requests of this kind \\(preview\\) are waiting"):
        gate.check_room(queue, lane, Visitor("s6", "5.5.5.5"), limits, behind_proxy=False)


def test_the_address_is_the_proxys_word_only_behind_a_proxy() -> None:
    headers = {"x-forwarded-for": "7.7.7.7, 10.0.0.1"}
    assert gate.address_of(headers, "10.0.0.2", behind_proxy=True) == "7.7.7.7"
    assert gate.address_of(headers, "10.0.0.2", behind_proxy=False) == "10.0.0.2", "a header anyone can write"


def test_uploads_stop_at_the_quota(tmp_path: Any) -> None:
    (tmp_path / "old").write_bytes(b"x" * 900)
    app = RequestGate(echo, blocks=lambda: None, limits=GateLimits(upload_total=1000), upload_folder=lambda: tmp_path)
    status, answer = run(app, "/gradio_api/upload", b"y" * 200, {"content-length": "200"})
    assert status == 507 and "upload space is full" in answer["detail"]
    assert run(app, "/gradio_api/upload", b"y" * 50, {"content-length": "50"})[0] == 200
    assert run(app, "/gradio_api/upload", b"y" * 50)[0] == 411, "an upload says its length"


def test_every_lane_caps_what_it_holds() -> None:
    limits = GateLimits()
    assert {"page", "preview", "light", "load", "heavy", "push"} <= set(limits.lanes)
    assert limits.threads == sum(lane.workers for lane in limits.lanes.values()) + 2 < 40  # Gradio's default
    with pytest.raises(ValueError, match="whole numbers >= 1"):
        Lane("x", workers=0, per_visitor=1, waiting=1)


@pytest.mark.parametrize(
    ("env", "public", "says"),
    [
        ({}, False, "listens on 127.0.0.1 only"),
        ({"GRADIO_SERVER_NAME": "localhost"}, False, "localhost only"),
        ({"GRADIO_SERVER_NAME": "::1"}, False, "::1 only"),
        ({"GRADIO_SERVER_NAME": "0.0.0.0"}, True, "listens on 0.0.0.0"),
        ({"GRADIO_SERVER_NAME": "my-host"}, True, "listens on my-host"),
        ({"GRADIO_SHARE": "True"}, True, "shares a public link"),
        ({"SYSTEM": "spaces", "SPACE_ID": "o/s", "GRADIO_SERVER_NAME": "127.0.0.1"}, True, "a Hugging Face Space"),
        ({"SYSTEM": "spaces", "SPACE_ID": "o/s", TRUST_ENV: "1"}, True, "a Hugging Face Space"),
        ({"GRADIO_SERVER_NAME": "0.0.0.0", TRUST_ENV: "1"}, False, "listens on 0.0.0.0"),
    ],
)
def test_public_unless_it_listens_on_loopback_only(env: dict[str, str], public: bool, says: str) -> None:
    found = exposure(env)
    assert found.public is public and says in found.reason
    assert bool(found.banner()) is (TRUST_ENV in env and not public), "the page says when visitors are trusted"


def test_requests_sent_together_are_counted_one_by_one() -> None:
    """Twenty joins at the same moment all pass the gate before the first reaches the queue: the gate counts the
    ones it let through until the queue has answered them."""
    lane = Lane("preview", workers=1, per_visitor=2, waiting=50)
    answered: list[int] = []

    async def slow_queue(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.sleep(0.05)  # the queue's own work before it answers the join
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        answered.append(1)

    blocks = SimpleNamespace(fns={0: FN}, _queue=Queue())
    app = RequestGate(slow_queue, blocks=lambda: blocks, limits=GateLimits(lanes={"preview": lane}, per_address=3))

    async def one(i: int) -> int:
        sent: list[dict[str, Any]] = []
        body = join(["x", "m"], session=f"s{i % 2}")
        chunks = [body]

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": chunks.pop(0) if chunks else b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/gradio_api/queue/join", "client": ("8.8.8.8", 1),
                 "headers": []}  # fmt: skip
        await app(scope, receive, send)
        return int(sent[0]["status"])

    async def together() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(20)))

    statuses = asyncio.run(together())
    assert statuses.count(200) == 4, statuses  # two sessions, two each; the address's six would allow more
    assert sum(app.joining.values()) == 0, "nothing stays counted once the queue answered"
