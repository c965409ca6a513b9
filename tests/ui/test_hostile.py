"""A hostile visitor against the app run as a Space (tests/spacesim.py: a Space's environment, the fake Hub at the
HTTP layer, a CPU Space's memory limit): raw requests to Gradio's queue, written by hand as an attacker would, to
every event the page has (found from the app's own /config, not from a list), with the worst input for each field.

For each case: the hostile request ends with one clear message within a few seconds; another visitor's cheap
request keeps answering in time meanwhile (a bystander thread asks for a feature card all along); memory stays
under the cgroup's limit; the disk stays under its budget; the app is alive. Each case's numbers are written to
docs/hostile.json when STEER_HOSTILE_REPORT names a file (scripts use it for the closing note)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import spacesim
from fakehub import FakeHub, Repo, safetensors_header
from spacesim import Space
from steer_core.hardware import parse_size

pytestmark = pytest.mark.e2e

BOMB_TEMPLATE = "{{ 'a' * 20000000000 }}"
SAE = "embedded: smollm2-135m-instruct-res-L15 (offline)"
DEFAULT = "smollm2-135m-instruct"
QUICK = 10.0  # seconds a refusal may take, end to end, on 2 shared cores late in a test run
BYSTANDER_LIMIT = 20.0  # the worst wait another visitor's feature card may see while an attack runs
DISK_BUDGET = 3 * 10**9  # the Space's temp and Hub cache folders together, after every case
REPORT: dict[str, dict[str, Any]] = {}


@dataclass
class Outcome:
    status: int  # the HTTP status of the join: 200 queued, else refused by the gate
    success: bool | None  # the event's own result, once queued
    message: str
    seconds: float


# Behind a Space's proxy a visitor's address is the proxy's X-Forwarded-For: the attacker and the bystander each
# have their own (the test machine itself is one address).
ATTACKER = {"X-Forwarded-For": "198.51.100.66"}
BYSTANDER = {"X-Forwarded-For": "203.0.113.7"}


def join(url: str, fn_index: int, data: list[Any], session: str | None = None, headers: Any = None) -> httpx.Response:
    body = {"data": data, "fn_index": fn_index, "session_hash": session or uuid.uuid4().hex, "event_data": None,
            "trigger_id": None}  # fmt: skip
    # json.dumps writes NaN as a raw request may (httpx's own encoder refuses it)
    headers = {"Content-Type": "application/json", **(headers or ATTACKER)}
    return httpx.post(f"{url}/gradio_api/queue/join", content=json.dumps(body), headers=headers, timeout=60)


def call(
    url: str, fn_index: int, data: list[Any], *, session: str | None = None, timeout: float = 120, headers: Any = None
) -> Outcome:
    """One event through the queue, as Gradio's own client sends it, until it completes or the gate refuses it."""
    session = session or uuid.uuid4().hex
    start = time.perf_counter()
    joined = join(url, fn_index, data, session, headers)
    if joined.status_code != 200:
        return Outcome(joined.status_code, None, _detail(joined), time.perf_counter() - start)
    event_id = joined.json()["event_id"]
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}, timeout=timeout) as s:
        for line in s.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                output = message.get("output") or {}
                text = output.get("error") or json.dumps(output.get("data"))[:2000]
                return Outcome(200, bool(message.get("success")), str(text), time.perf_counter() - start)
    raise AssertionError(f"event {fn_index} never completed")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text[:500]


# ---- the Space, its page, and a bystander -----------------------------------------------------------------------


@dataclass
class Page:
    url: str
    dependencies: list[dict[str, Any]]
    components: dict[int, dict[str, Any]]

    def fn(self, api_name: str) -> int:
        return next(d["id"] for d in self.dependencies if d.get("api_name") == api_name)

    def inputs(self, fn_index: int) -> list[dict[str, Any]]:
        dep = next(d for d in self.dependencies if d["id"] == fn_index)
        return [self.components[i] for i in dep["inputs"]]

    def defaults(self, fn_index: int, values: dict[str, Any] | None = None) -> list[Any]:
        """The event's inputs as the page first shows them, with some replaced: by label, or by a word of it."""
        out = []
        for c in self.inputs(fn_index):
            label = str(c.get("props", {}).get("label"))
            given = [v for k, v in (values or {}).items() if k == label or k in label]
            out.append(given[0] if given else c.get("props", {}).get("value"))
        return out


@dataclass
class Bystander:
    """Another visitor, asking for a feature card (the preview lane) every second, timing each answer."""

    page: Page
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (when it was asked, seconds it took)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        fn = self.page.fn("show_feature")
        while not self.stop.is_set():
            asked = time.time()
            try:
                out = call(self.page.url, fn, [DEFAULT, SAE, "", 676], timeout=120, headers=BYSTANDER)
                if not (out.status == 200 and out.success and "Feature 676" in out.message):
                    self.failures.append(f"{out.status}: {out.message[:200]}")
            except Exception as err:  # a dead server: recorded, and the case asserts on it
                self.failures.append(f"{type(err).__name__}: {err}")
            self.latencies.append((asked, time.time() - asked))
            self.stop.wait(1.0)

    def worst_since(self, since: float) -> float:
        return max((took for asked, took in self.latencies if asked + took >= since), default=0.0)


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Space, FakeHub, Page, Bystander]]:
    tmp = tmp_path_factory.mktemp("hostile")
    hub = spacesim.fake_hub(tmp)
    add_hostile_repos(hub, tmp)
    with hub.serve(), spacesim.launch(hub, tmp) as running:
        config = httpx.get(f"{running.url}/config", timeout=30).json()
        page = Page(running.url, config["dependencies"], {c["id"]: c for c in config["components"]})
        bystander = Bystander(page)
        thread = threading.Thread(target=bystander.run, daemon=True)
        thread.start()
        try:
            yield running, hub, page, bystander
        finally:
            bystander.stop.set()
            thread.join(130)
            if path := os.environ.get("STEER_HOSTILE_REPORT"):
                Path(path).write_text(json.dumps(REPORT, indent=1) + "\n")


def add_hostile_repos(hub: FakeHub, tmp: Path) -> None:
    """What a hostile visitor puts on the Hub for the Space to read."""
    tiny = spacesim.tiny_repo(tmp / "evil-tiny", "evil")
    files = dict(tiny.files)
    config = json.loads(Path(files["config.json"]).read_text())
    six_b = {**config, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "head_dim": 128}  # fmt: skip
    tiny_weights = safetensors_header({"model.norm.weight": ("F32", [8])}) + b"\0" * 32
    hub.add("evil/config-6b", Repo("evil", {**files, "config.json": json.dumps(six_b).encode(),
                                            "model.safetensors": tiny_weights}))  # fmt: skip
    hub.add("evil/big-tokenizer", Repo("evil", {k: v for k, v in files.items() if k != "tokenizer.json"},
                                       declared={"tokenizer.json": 2 * 10**9}))  # fmt: skip
    tokenizer_config = json.loads(Path(files["tokenizer_config.json"]).read_text())
    bomb = json.dumps({**tokenizer_config, "chat_template": BOMB_TEMPLATE}).encode()
    # transformers reads chat_template.jinja first, where save_pretrained puts the template
    hub.add("evil/template-bomb", Repo("evil", {**files, "tokenizer_config.json": bomb,
                                                "chat_template.jinja": BOMB_TEMPLATE.encode()}))  # fmt: skip
    module = "a" * 40  # the name the adapter's own keys give, which `alpha_pattern` was matched against as a regex
    adapter_config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [module],
                      "alpha_pattern": {"(a+)+b": 8}, "base_model_name_or_path": DEFAULT}  # fmt: skip
    import torch
    from safetensors.torch import save as save_tensors

    weights = save_tensors({f"base_model.model.{module}.lora_A.weight": torch.ones(1, 8),
                            f"base_model.model.{module}.lora_B.weight": torch.ones(8, 1)})  # fmt: skip
    hub.add("evil/backtrack", Repo("evil", {"adapter_config.json": json.dumps(adapter_config).encode(),
                                            "adapter_model.safetensors": weights}))  # fmt: skip
    hub.add("evil/huge-adapter-config", Repo("evil", {"adapter_model.safetensors": weights},
                                             declared={"adapter_config.json": 3 * 10**9}))  # fmt: skip


def disk_used(space: Space) -> int:
    root = space.log.parent
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture()
def case(space: tuple[Space, FakeHub, Page, Bystander], request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Per case: the bystander's worst wait, the memory and disk reached, and the app alive, all checked after."""
    running, _, _, bystander = space
    start, failures = time.time(), len(bystander.failures)
    record: dict[str, Any] = {}
    yield record
    time.sleep(1.5)  # the bystander's next answer lands inside this case's window
    worst = bystander.worst_since(start)
    peak = running.peak_memory()["process_peak_rss"]
    record.update(bystander_worst_s=round(worst, 2), peak_rss_gb=round(peak / 1e9, 2),
                  disk_gb=round(disk_used(running) / 1e9, 3))  # fmt: skip
    REPORT[request.node.name] = record
    assert running.process.poll() is None, "the app died"
    assert peak < parse_size(spacesim.CPU_SPACE_MEMORY), f"memory peaked at {peak / 1e9:.1f} GB"
    assert disk_used(running) < DISK_BUDGET
    assert bystander.failures[failures:] == [], "another visitor's feature card failed meanwhile"
    assert worst < BYSTANDER_LIMIT, f"another visitor waited {worst:.1f} s for a feature card"


# ---- every event, every field ------------------------------------------------------------------------------------


STRING_TYPES = {"textbox", "dropdown", "radio"}
PATHOLOGICAL = [" " * 10, ":,;=@×* " * 2, "[{(<" * 3, "9" * 12, "{{ 'a' * 99 }}", "\\" * 9, "\u202e\u0000\ud7ff"]


def string_inputs(page: Page, fn_index: int) -> list[tuple[int, str, int]]:
    """(position, label, character limit) of each string input of an event."""
    out = []
    for i, c in enumerate(page.inputs(fn_index)):
        if c.get("type") in STRING_TYPES:
            props = c.get("props", {})
            out.append((i, str(props.get("label")), props.get("max_length") or 1000))
    return out


def test_no_event_runs_outside_the_queue(space: Any, case: dict[str, Any]) -> None:
    _, _, page, _ = space
    # (which lane each event runs in is not in the page's config: tests/ui/test_app.py checks the page itself)
    backend = [d for d in page.dependencies if d.get("backend_fn")]
    assert backend and all(d.get("queue") is not False for d in backend), "every event waits in the queue"
    refused = httpx.post(f"{page.url}/gradio_api/run/preview", json={"data": [DEFAULT, "hi"]}, timeout=30)
    assert refused.status_code == 404 and "join the queue" in refused.text
    case["events"] = len(page.dependencies)


def test_each_text_field_of_every_event_is_bounded_at_the_gate(space: Any, case: dict[str, Any]) -> None:
    """One character over each field's limit, and a megabyte, in every string input of every event: refused with
    a message naming the field, before Gradio parses or queues anything."""
    _, _, page, _ = space
    worst, fields = 0.0, 0
    for dep in page.dependencies:
        fn = dep["id"]
        for position, label, cap in string_inputs(page, fn):
            for size, status in ((cap + 1, 400), (2**20, 413)):
                data = page.defaults(fn)
                data[position] = ":" * size
                out = call(page.url, fn, data)
                worst = max(worst, out.seconds)
                assert out.status == status, (dep.get("api_name"), label, out)
                if status == 400:
                    assert f"{label!r} has {size:,} characters: this server takes up to {cap:,}" in out.message
            fields += 1
    case.update(fields=fields, hostile_worst_s=round(worst, 3))
    assert fields > 20 and worst < QUICK


def test_every_event_ends_in_time_with_the_worst_text_within_its_limits(space: Any, case: dict[str, Any]) -> None:
    """Every string input of every event filled to its limit with pathological text (runs of spaces and separators,
    nested brackets, huge numbers, template syntax, control characters): every event ends, in success or with one
    message."""
    _, _, page, _ = space
    worst, name = 0.0, ""
    for dep in page.dependencies:
        fn = dep["id"]
        for k, kind in enumerate(PATHOLOGICAL):
            data = page.defaults(fn, {"Max new tokens": 8})
            for position, _label, cap in string_inputs(page, fn):
                data[position] = (kind * (cap // len(kind) + 1))[:cap]
            out = call(page.url, fn, data, timeout=180)
            assert out.status == 200, out
            if out.seconds > worst:
                worst, name = out.seconds, f"{dep.get('api_name') or fn} with text {k}"
    case.update(hostile_worst_s=round(worst, 2), slowest=name)
    assert worst < 60, f"{name} took {worst:.0f} s"


@pytest.mark.parametrize("extreme", [1e308, -1e308, float("nan"), 2**70])
def test_every_number_field_at_its_extremes(space: Any, case: dict[str, Any], extreme: float) -> None:
    """Numbers past any range (and NaN, which Python's JSON reads) in every number and slider input of every event."""
    _, _, page, _ = space
    worst, fields = 0.0, 0
    for dep in page.dependencies:
        fn = dep["id"]
        for position, c in enumerate(page.inputs(fn)):
            if c.get("type") not in ("number", "slider"):
                continue
            data = page.defaults(fn, {"Max new tokens": 8})
            data[position] = extreme
            out = call(page.url, fn, data, timeout=180)
            assert out.status in (200, 400), out
            worst, fields = max(worst, out.seconds), fields + 1
    case.update(fields=fields, hostile_worst_s=round(worst, 2))
    assert fields > 10 and worst < 30


# The fields a handler parses, each filled alone (the others as the page shows them, so the parser is reached):
# (event, the field's label or a word of it, other inputs set by label).
PARSED = [
    ("preview", "Prompt", {"Max new tokens": 8}),
    ("preview", "Features to steer with", {"Max new tokens": 8}),
    ("preview", "Positive prompts", {"Max new tokens": 8, "Steer with": "Contrastive prompts"}),
    ("preview", "Served adapter", {"Max new tokens": 8}),
    ("search_features", "Words", {}),
    ("use_concept", "Words", {}),
    ("push", "Repo", {}),
]


@pytest.mark.parametrize(("api_name", "label", "values"), PARSED, ids=[f"{a}-{b.split()[0]}" for a, b, _ in PARSED])
def test_each_parsed_field_ends_in_time_with_its_worst_text(
    space: Any, case: dict[str, Any], api_name: str, label: str, values: dict[str, Any]
) -> None:
    _, _, page, _ = space
    fn = page.fn(api_name)
    position, _, cap = next(f for f in string_inputs(page, fn) if label in f[1])
    worst = 0.0
    for kind in PATHOLOGICAL:
        data = page.defaults(fn, values)
        data[position] = (kind * (cap // len(kind) + 1))[:cap]
        out = call(page.url, fn, data, timeout=180)
        assert out.status == 200, out
        worst = max(worst, out.seconds)
    case.update(hostile_worst_s=round(worst, 2))
    assert worst < 30


# ---- the cases the review found, and more ---------------------------------------------------------------------------


def test_a_backtracking_alpha_pattern_is_refused_in_milliseconds(space: Any, case: dict[str, Any]) -> None:
    _, _, page, _ = space
    fn = page.fn("preview")
    out = call(page.url, fn, page.defaults(fn, {"Served adapter": "evil/backtrack"}))
    case.update(hostile_s=round(out.seconds, 2), message=out.message[:300])
    assert out.success is False and "pattern" in out.message and out.seconds < QUICK


def test_a_huge_adapter_config_is_refused_before_it_downloads(space: Any, case: dict[str, Any]) -> None:
    _, hub, page, _ = space
    fn = page.fn("preview")
    out = call(page.url, fn, page.defaults(fn, {"Served adapter": "evil/huge-adapter-config"}))
    case.update(hostile_s=round(out.seconds, 2), message=out.message[:300])
    assert out.success is False and "adapter_config.json" in out.message and out.seconds < QUICK
    assert not [r for r in hub.requests_for("evil/huge-adapter-config") if r.method == "GET" and "/resolve/" in r.path]


@pytest.mark.parametrize(
    ("repo", "says"),
    [("evil/config-6b", "parameters"), ("evil/big-tokenizer", "tokenizer.json")],
)
def test_a_model_is_admitted_on_what_it_will_cost(space: Any, case: dict[str, Any], repo: str, says: str) -> None:
    _, hub, page, _ = space
    out = call(page.url, page.fn("load_model"), [repo])
    case.update(hostile_s=round(out.seconds, 2), message=out.message[:300])
    assert out.success is False and says in out.message and out.seconds < QUICK
    weights = [
        r
        for r in hub.requests_for(repo)
        if r.method == "GET" and r.path.endswith(("model.safetensors", "tokenizer.json"))
    ]
    assert all(r.status == 206 for r in weights), "nothing but headers was read"  # fmt: skip


def test_a_chat_template_bomb_ends_with_a_message_not_a_dead_space(space: Any, case: dict[str, Any]) -> None:
    _, _, page, _ = space
    start = time.perf_counter()
    loaded = call(page.url, page.fn("load_model"), ["evil/template-bomb"])
    messages = [loaded.message]
    if loaded.success:  # admitted: the template is rendered under limits when a preview applies it
        fn = page.fn("preview")
        contrastive = {"Model": "evil/template-bomb", "Steer with": "Contrastive prompts", "Layer": 1}
        out = call(page.url, fn, page.defaults(fn, contrastive))
        messages.append(out.message)
        assert out.success is False
    else:
        assert "template" in loaded.message
    case.update(hostile_s=round(time.perf_counter() - start, 2), message=" / ".join(m[:200] for m in messages))
    assert "template" in messages[-1] and time.perf_counter() - start < 60


def test_twenty_parallel_loads_stay_in_the_load_lane(space: Any, case: dict[str, Any]) -> None:
    """Twenty page loads (an event a raw request can send with any model) and twenty loads from twenty browser
    sessions of one address, at once: page loads never load, and the load lane takes its share per address."""
    _, hub, page, _ = space
    opened = next(d["id"] for d in page.dependencies if any(t[1] == "load" for t in d["targets"]))  # link.on_open
    # the page load's model step (on_page), after the link's: page load → wait_for_model → on_page
    waited = next(d["id"] for d in page.dependencies if d.get("trigger_after") == opened)
    page_load = next(d["id"] for d in page.dependencies if d.get("trigger_after") == waited)
    assert call(page.url, opened, ["someone/public-tiny-x"]).success  # echoes the name; opens no model
    before = len([r for r in hub.log if "/resolve/" in r.path])
    start = time.perf_counter()
    with ThreadPoolExecutor(40) as pool:
        pages = list(pool.map(lambda i: call(page.url, page_load, [f"someone/public-tiny-{i}"]), range(20)))
        loads = list(pool.map(lambda i: call(page.url, page.fn("load_model"), [f"someone/nothing-{i}"]), range(20)))
    took = time.perf_counter() - start
    assert not [o for o in pages if o.success], "a page load loads nothing"
    assert all("not loaded yet" in o.message or o.status == 429 for o in pages), pages
    refused = [o for o in loads if o.status == 429]
    assert len(refused) >= 20 - 8 and "from your address" in refused[-1].message, loads
    assert len([r for r in hub.log if "/resolve/" in r.path]) == before, "no page load downloaded anything"
    case.update(hostile_s=round(took, 2), refused=len(refused), message=refused[0].message[:200])
    assert took < 60


def test_seventy_exports_from_one_browser_take_one_place(space: Any, case: dict[str, Any]) -> None:
    _, _, page, _ = space
    fn = page.fn("run_export")
    session = uuid.uuid4().hex
    data = page.defaults(fn, {"Calibration tokens": 1024})
    start = time.perf_counter()
    answers = [join(page.url, fn, data, session) for _ in range(70)]
    took = time.perf_counter() - start
    refused = [a for a in answers if a.status_code == 429]
    case.update(hostile_s=round(took, 2), refused=len(refused), message=_detail(refused[0])[:200])
    assert len(refused) == 69 and "the most one visitor may" in _detail(refused[0]) and took < QUICK * 3
    # the one export that was let in runs to its end, so that the next case does not share the CPU with it
    with httpx.stream("GET", f"{page.url}/gradio_api/queue/data", params={"session_hash": session}, timeout=600) as s:
        for line in s.iter_lines():
            if '"process_completed"' in line:
                break


@pytest.mark.parametrize("path", ["https://example.com/vector.npy", "/etc/passwd"])
def test_a_vector_file_is_an_upload_never_a_url_or_a_server_path(space: Any, case: dict[str, Any], path: str) -> None:
    _, _, page, _ = space
    fn = page.fn("preview")
    file = {"path": path, "orig_name": "vector.npy", "meta": {"_type": "gradio.FileData"}}
    data = page.defaults(fn, {"Steer with": "Vector file"})
    data[[c["type"] for c in page.inputs(fn)].index("file")] = file
    out = call(page.url, fn, data)
    case.update(hostile_s=round(out.seconds, 2), message=out.message[:300])
    assert out.success is not True and out.seconds < QUICK and "root:" not in out.message
    if path.startswith("http"):
        assert out.status == 400 and "by URL" in out.message
    else:
        assert out.status == 400 and "not uploaded to this server" in out.message


def test_a_request_nested_a_million_deep_is_refused(space: Any, case: dict[str, Any]) -> None:
    _, _, page, _ = space
    start = time.perf_counter()
    bomb = b'{"data": ' + b"[" * 500_000 + b"]" * 500_000 + b', "fn_index": 0, "session_hash": "x"}'
    answer = httpx.post(f"{page.url}/gradio_api/queue/join", content=bomb, timeout=30,
                        headers={"content-type": "application/json"})  # fmt: skip
    case.update(hostile_s=round(time.perf_counter() - start, 2), message=_detail(answer)[:200])
    assert answer.status_code == 400 and time.perf_counter() - start < QUICK


def test_disk_is_bounded_after_it_all(space: Any, case: dict[str, Any]) -> None:
    running, _, _, bystander = space
    case.update(disk_gb=round(disk_used(running) / 1e9, 3), bystander_answers=len(bystander.latencies))
    assert shutil.disk_usage(running.log.parent).free > 0
