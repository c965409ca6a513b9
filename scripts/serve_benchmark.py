"""Throughput of `serve` on llama-server, measured in one run: one engine with N adapters against N engines with one
adapter each (memory and requests per second), and one engine answering a mix of adapters against one adapter.

    .venv/bin/python -m scripts.serve_benchmark DIR DIR DIR [--base BASE.gguf] [--requests 24] [--tokens 32]

The folders are `export --target llama.cpp` outputs for one base model; the base defaults to the embedded SmolLM2 as
tests/adapter/test_llama_cpp.py converts it. Every request lists every id with its scale (llama.cpp #28674), greedy,
and all of a round's requests are sent at once. Memory is the engines' proportional set size (PSS: the base GGUF is
memory-mapped, so N engines share its pages; their summed RSS is printed too). A benchmark prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from steer_core.constants import cache_dir
from steer_core.serve import ServePlan, lora_field, plan, start

PROMPT = "<|im_start|>user\nTell me about your weekend.<|im_end|>\n<|im_start|>assistant\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in KiB, from the kernel's own accounting of the process."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)
    return fields["Pss"], fields["Rss"]


def _start(served: ServePlan) -> subprocess.Popen:
    return start(served.argv, f"http://127.0.0.1:{served.port}")


def _ask(port: int, lora: list, tokens: int) -> None:
    body = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
            "lora": lora}  # fmt: skip
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=900) as r:
        r.read()


def _rate(jobs: list[tuple[int, list]], tokens: int) -> float:
    """Requests per second for `jobs` (port, lora) sent all at once."""
    _ask(jobs[0][0], jobs[0][1], 2)  # first request's one-off costs out of the timing
    start = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(lambda j: _ask(j[0], j[1], tokens), jobs))
    return len(jobs) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--base", default=str(cache_dir() / "llama.cpp" / "smollm2-135m-instruct-f32.gguf"))
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument(
        "--slots", type=int, default=1, help="llama-server -np, per engine (more stalled on mixed lora lists)"
    )
    ap.add_argument("--threads", type=int, default=2, help="llama-server -t, per engine")
    args = ap.parse_args()
    n = len(args.folders)
    extra = ["-c", str(512 * args.slots), "-np", str(args.slots), "-t", str(args.threads)]

    one = plan("llama.cpp", args.folders, base=args.base, port=_free_port(), extra=extra)
    proc = _start(one)
    try:
        mixed = [(one.port, lora_field(one, {k % n: 1.0})) for k in range(args.requests)]
        single = [(one.port, lora_field(one, {0: 1.0}))] * args.requests
        rate_mix, rate_one = _rate(mixed, args.tokens), _rate(single, args.tokens)
        mem_one = _memory_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    many = [plan("llama.cpp", [f], base=args.base, port=_free_port(), extra=extra) for f in args.folders]
    procs = [_start(p) for p in many]
    try:
        spread = [(many[k % n].port, lora_field(many[k % n], {0: 1.0})) for k in range(args.requests)]
        rate_many = _rate(spread, args.tokens)
        mems = [_memory_kib(p.pid) for p in procs]
        mem_many = (sum(m[0] for m in mems), sum(m[1] for m in mems))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)

    print(f"llama-server, {n} adapters, {args.requests} concurrent requests × {args.tokens} tokens, greedy, "
          f"-np {args.slots} -t {args.threads} per engine, on this machine:")  # fmt: skip
    print(f"  one engine, {n} adapters, requests mixing them: {rate_mix:.2f} req/s; PSS {mem_one[0] / 1024:.0f} MiB "
          f"(RSS {mem_one[1] / 1024:.0f})")  # fmt: skip
    print(f"  one engine, every request adapter 0:           {rate_one:.2f} req/s")
    print(f"  {n} engines, one adapter each, requests spread:   {rate_many:.2f} req/s; "
          f"PSS {mem_many[0] / 1024:.0f} MiB (RSS {mem_many[1] / 1024:.0f}) in all")  # fmt: skip
    print(f"ratios: one engine / {n} engines: {rate_mix / rate_many:.2f}× req/s, "
          f"{mem_one[0] / mem_many[0]:.2f}× memory (PSS; RSS {mem_one[1] / mem_many[1]:.2f}×); "
          f"mixed adapters / one adapter: {rate_mix / rate_one:.2f}× req/s")  # fmt: skip


if __name__ == "__main__":
    main()
