"""Load test of the launched app: many users at once, through its public API (gradio_client), on this machine only.

Starts `python app.py` (as `bash run.sh` does) on a free 127.0.0.1 port, then:

1. solo: each of --users users (a different feature of the embedded SAE each, chosen with --seed, at the embedded
   SAE's default strength, and a short prompt) runs one greedy steered preview of --tokens new tokens, one user after
   another: the reference texts;
2. together: all users at once (one gradio_client session and thread each), each a preview and a feature search in
   an order that alternates between users, while one export (portable, --export-tokens calibration tokens) runs;
3. flood: more previews at once than the queue holds (its max_size waiting plus the 4 running plus --flood-extra):
   the ones past the queue must be refused with a clear "queue is full" message, the queued ones are then cancelled,
   and the app must still answer (and give the same text) afterwards.

Prints a JSON summary: median and p95 latency per endpoint, failed requests (must be 0), the server's peak memory
(resident set of its process tree, polled, and the kernel's high-water mark), whether every steered preview made
together equals its solo run, and the flood's result. Bounded: --timeout for the whole run, --max-requests in all;
the app is always stopped at the end. Exits 1 when a check fails. A script that prints numbers, not a test:

    .venv/bin/python -m scripts.load_test                         # 16 users; ~10 min on 2 busy CPU cores
    .venv/bin/python -m scripts.load_test --users 4 --tokens 8 --json out/load.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steer_core.ui.gate import LANES

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Tell me about your weekend.",
    "What should I cook tonight?",
    "Describe your favourite place.",
    "Write one sentence about the sea.",
    "What do you think of cities?",
    "Give me advice for a rainy day.",
    "Tell me a short story about a dog.",
    "What is a good hobby?",
]
QUERIES = ["love", "rain", "food", "music", "anger", "code", "travel", "sleep", "money", "school", "dog", "war"]
UNIT = "× residual norm"


def stop_app(proc: subprocess.Popen[bytes]) -> None:
    """Stop the launched app: politely, then for sure (scripts.screenshot uses it too)."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the server's memory -----------------------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """The process and all its descendants, from /proc/<pid>/task/*/children."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):  # the process ended meanwhile
                todo += [int(c) for c in task.read_text().split()]
    return pids


class MemoryWatch:
    """Polls the resident memory of the server's process tree and keeps its peak."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid, self.every_s, self.peak_kb, self._stop = pid, every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_kb(self) -> int:
        return sum(_status_kb(p, "VmRSS") for p in _tree(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_kb = max(self.peak_kb, self.now_kb())

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---- requests ----------------------------------------------------------------------------------------------------


class Run:
    """Every request's endpoint, phase, latency and outcome, against one deadline and one cap on their number."""

    def __init__(self, deadline: float, max_requests: int) -> None:
        self.deadline, self.max_requests, self.sent = deadline, max_requests, 0
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def left(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def reserve(self, n: int = 1) -> None:
        with self.lock:
            if self.sent + n > self.max_requests:
                raise RuntimeError(f"past --max-requests={self.max_requests}; raise it or use fewer users")
            self.sent += n

    def call(self, client: Any, endpoint: str, phase: str, *args: Any) -> Any:
        """One request, timed from submission to its final output; a failure is recorded, not raised."""
        if time.monotonic() > self.deadline:
            raise TimeoutError("--timeout reached")
        self.reserve()
        t0 = time.monotonic()
        rec: dict[str, Any] = {"endpoint": endpoint, "phase": phase, "ok": False, "start": t0}
        try:
            result = client.submit(*args, api_name=f"/{endpoint}").result(timeout=self.left())
            rec["ok"] = True
            return result
        except Exception as err:
            rec["error"] = f"{type(err).__name__}: {err}"[:300]
            return None
        finally:
            rec["end"] = time.monotonic()
            rec["seconds"] = rec["end"] - t0
            with self.lock:
                self.records.append(rec)


def _latency(seconds: list[float]) -> dict[str, Any]:
    s = sorted(seconds)
    return {
        "n": len(s),
        "median_s": round(statistics.median(s), 2) if s else None,
        "p95_s": round(s[max(0, math.ceil(0.95 * len(s)) - 1)], 2) if s else None,
        "max_s": round(s[-1], 2) if s else None,
    }


def _threads(targets: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---- the test ----------------------------------------------------------------------------------------------------


def load_test(url: str, args: argparse.Namespace, run: Run, watch: MemoryWatch) -> dict[str, Any]:
    from gradio_client import Client

    from steer_core.constants import DEFAULT_MODEL
    from steer_core.sae.feature import embedded_sae_for
    from steer_core.ui import catalog
    from steer_core.ui.form import SteeringForm

    spec = embedded_sae_for(DEFAULT_MODEL)
    choices = catalog.sae_choices(DEFAULT_MODEL)
    if spec is None or not choices:
        raise SystemExit(f"{DEFAULT_MODEL} has no embedded SAE to steer with")
    d_sae = json.loads((spec.path / "cfg.json").read_text())["d_sae"]
    features = random.Random(args.seed).sample(range(d_sae), args.users)
    sae_label, strength = choices[0].label, spec.default_strength

    def preview_args(user: int) -> list[Any]:
        # the inputs the UI sends on its default path
        vector = SteeringForm(sae_pick=sae_label, mix=f"{features[user]}:{strength}", strength=strength).values()
        return [DEFAULT_MODEL, PROMPTS[user % len(PROMPTS)], args.tokens, 0, 0, "", 1, *vector]

    first = Client(url, verbose=False)
    endpoints = set(first.view_api(print_info=False, return_format="dict")["named_endpoints"])
    missing = {"/preview", "/search_features", "/run_export"} - endpoints
    if missing:
        raise SystemExit(f"the app has no endpoints {sorted(missing)}; it has {sorted(endpoints)}")

    # 1 · solo references, one user after another, after a warm-up that loads the SAE (once per server)
    run.call(first, "search_features", "warm-up", DEFAULT_MODEL, sae_label, "", "warm")
    solo: dict[int, tuple[str, str] | None] = {}
    for user in range(args.users):
        out = run.call(first, "preview", "solo", *preview_args(user))
        solo[user] = (out[0], out[1]) if out else None
    idle_kb = watch.now_kb()

    # 2 · all users together, one session each, while one export runs
    clients = [Client(url, verbose=False) for _ in range(args.users)]
    together: dict[int, tuple[str, str] | None] = {}
    barrier = threading.Barrier(args.users + 1)

    def user_task(user: int) -> Callable[[], None]:
        def go() -> None:
            barrier.wait()

            def preview() -> None:
                out = run.call(clients[user], "preview", "together", *preview_args(user))
                together[user] = (out[0], out[1]) if out else None

            def search() -> None:
                query = QUERIES[user % len(QUERIES)]
                run.call(clients[user], "search_features", "together", DEFAULT_MODEL, sae_label, "", query)

            for step in (preview, search) if user % 2 == 0 else (search, preview):
                step()

        return go

    def export_task() -> None:
        barrier.wait()
        time.sleep(1.0)  # the previews are under way when the export arrives
        export_args = [DEFAULT_MODEL, "portable", args.export_tokens, 0, "peft", *preview_args(0)[6:]]
        run.call(Client(url, verbose=False), "run_export", "together", *export_args)

    t0 = time.monotonic()
    _threads([user_task(u) for u in range(args.users)] + [export_task])
    together_s = time.monotonic() - t0

    mismatches = [
        {"user": u, "feature": features[u], "solo": solo[u], "together": together.get(u)}
        for u in range(args.users)
        if solo[u] is None or together.get(u) != solo[u]
    ]
    export = next((r for r in run.records if r.get("endpoint") == "run_export"), None)
    during_export = [
        r
        for r in run.records
        if export and r.get("phase") == "together" and r.get("endpoint") == "preview" and r["end"] < export["end"]
    ]

    # 3 · flood: more previews at once than the queue holds
    flood = flood_check(url, args, run, preview_args, solo) if args.flood else None

    records = run.records
    by_endpoint: dict[str, list[float]] = {}
    for r in records:
        if r["ok"] and r["phase"] in ("solo", "together"):
            key = r["endpoint"] + (" (solo)" if r["phase"] == "solo" else "")
            by_endpoint.setdefault(key, []).append(r["seconds"])
    failed = [r for r in records if not r["ok"]]  # the flood's refusals are not run.call's: counted apart
    return {
        "users": args.users,
        "features": features,
        "max_new_tokens": args.tokens,
        "queue": {"max_size": args.queue_max, "lanes": {lane.name: lane.workers for lane in LANES.values()}},
        "latency": {k: _latency(v) for k, v in sorted(by_endpoint.items())},
        "together_wall_s": round(together_s, 1),
        "previews_done_while_the_export_ran": len(during_export),
        "requests": run.sent,
        "failed": len(failed),
        "failures": [f"{r['endpoint']} ({r['phase']}): {r.get('error')}" for r in failed[:10]],
        "memory_mb": {"after_solo": round(idle_kb / 1024), "peak_rss_tree": round(watch.peak_kb / 1024)},
        "steered_equal_solo": not mismatches,
        "mismatches": mismatches[:5],
        "flood": flood,
    }


def flood_check(
    url: str, args: argparse.Namespace, run: Run, preview_args: Callable[[int], list[Any]], solo: dict
) -> dict[str, Any]:
    from gradio_client import Client
    from gradio_client.utils import Status

    n = args.queue_max + LANES["preview"].workers + args.flood_extra
    run.reserve(n)  # counted against --max-requests; timed apart from the endpoints' latencies
    client = Client(url, verbose=False, max_workers=n)  # its default 40 threads would send them 40 at a time
    jobs = [client.submit(*preview_args(i % args.users), api_name="/preview") for i in range(n)]
    refused, messages, other = 0, set(), []
    until = time.monotonic() + 30
    while time.monotonic() < until and any(  # wait until every submission has had its answer: queued or refused
        not j.done() and j.status().code in (Status.STARTING, Status.JOINING_QUEUE) for j in jobs
    ):
        time.sleep(0.2)
    for job in jobs:
        if job.done():
            err = job.exception()
            # refused by the queue (full) or by the gate (one visitor's share of the lane: steer_core.ui.gate)
            said = str(err).lower() if err is not None else ""
            if err is not None and ("queue" in said or "429" in said or type(err).__name__ == "QueueError"):
                refused += 1
                messages.add(f"{type(err).__name__}: {err}")
            elif err is not None:
                other.append(f"{type(err).__name__}: {err}")
    cancelled = [job for job in jobs if not job.done() and job.cancel()]  # queued: leave the queue; running: stop
    for job in jobs:
        try:
            job.result(timeout=min(60.0, run.left()))
        except Exception as err:
            # A cancelled job ends in an error of gradio_client's own (no 'data' in the answer): expected.
            refusal = "queue" in str(err).lower() or type(err).__name__ == "QueueError"
            if not refusal and job not in cancelled:
                other.append(f"{type(err).__name__}: {err}")
    after = run.call(Client(url, verbose=False), "preview", "after flood", *preview_args(0))
    return {
        "submitted": n,
        "refused": refused,
        "cancelled_while_queued_or_running": len(cancelled),
        "messages": sorted(messages),
        "browser_message": "This application is currently busy. Please try again.",  # Gradio's front end, on a 503
        "other_errors": other[:5],
        "app_answers_after": after is not None,
        "after_equals_solo": after is not None and (after[0], after[1]) == solo.get(0),
        "ok": refused > 0 and not other and after is not None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=16, help="concurrent users, each with its own feature (at most 64)")
    p.add_argument("--tokens", type=int, default=24, help="max new tokens of each greedy preview")
    p.add_argument("--export-tokens", type=int, default=1024, help="calibration tokens of the export")
    p.add_argument("--queue-max", type=int, default=64, help="the app's queue max_size (STEER_QUEUE_MAX)")
    p.add_argument("--flood-extra", type=int, default=8, help="flood previews past what the queue and workers hold")
    p.add_argument("--no-flood", dest="flood", action="store_false", help="skip the flood check")
    p.add_argument("--seed", type=int, default=0, help="which features the users steer with")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the whole run, start-up included")
    p.add_argument("--max-requests", type=int, default=400, help="hard cap on the number of requests")
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args()
    if not 1 <= args.users <= 64:
        p.error("--users must be 1..64")

    start, load = time.monotonic(), os.getloadavg()[0]
    run = Run(start + args.timeout, args.max_requests)
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "STEER_QUEUE_MAX": str(args.queue_max)}  # fmt: skip  # loopback only, offline
    log = tempfile.NamedTemporaryFile("w+", prefix="load-test-app-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    summary: dict[str, Any] = {}
    try:
        with MemoryWatch(proc.pid) as watch:
            while True:
                try:
                    urllib.request.urlopen(url, timeout=5)
                    break
                except OSError as err:
                    if proc.poll() is not None or time.monotonic() > run.deadline:
                        log.flush()
                        raise SystemExit(
                            f"the app did not start; its log: {Path(log.name).read_text()[-3000:]}"
                        ) from err
                    time.sleep(1)
            startup_s = time.monotonic() - start
            summary = load_test(url, args, run, watch)
            summary["startup_s"] = round(startup_s, 1)
            summary["memory_mb"]["server_vmhwm"] = round(_status_kb(proc.pid, "VmHWM") / 1024)
            summary["memory_mb"]["peak_rss_tree"] = max(summary["memory_mb"]["peak_rss_tree"], watch.peak_kb // 1024)
            summary["wall_s"] = round(time.monotonic() - start, 1)
            summary["cpu_cores"] = os.cpu_count()
            summary["load_average_at_start"] = load
    finally:
        stop_app(proc)
        log.close()
    summary["app_log"] = log.name
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    flood_ok = summary["flood"] is None or summary["flood"]["ok"]
    sys.exit(0 if summary["failed"] == 0 and summary["steered_equal_solo"] and flood_ok else 1)


if __name__ == "__main__":
    main()
