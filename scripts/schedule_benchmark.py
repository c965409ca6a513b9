"""Tokens per second for N concurrent previews, each its own generate call (today: 4 at a time, as the app's preview
lane) against rows of one scheduler batch (steer_core.schedule), measured in one run on the same model.

    .venv/bin/python -m scripts.schedule_benchmark                       # tiny random llama, 16 previews
    .venv/bin/python -m scripts.schedule_benchmark --model smollm2-135m-instruct --previews 16 --tokens 24

Each preview has three sides (unsteered, a hook vector, a served adapter), as the app's. Tokens are counted as rows
x max_new_tokens (a row that stops early still counts its budget; prompts are chosen so that rows rarely stop).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from steer_core.adapter.served import ServedAdapter
from steer_core.generate import GenerationConfig, Side, stream_sides
from steer_core.model import LoadedModel
from steer_core.schedule import Scheduler
from steer_core.sites import HookPoint, blocks
from steer_core.vectors.vector import SteeringVector

PROMPTS = ["Describe something you like.", "Tell me about the sea.", "What is a good breakfast?", "Write a short poem."]


def _model(name: str) -> LoadedModel:
    if name == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import tiny_lm

        return tiny_lm("llama", layers=4)
    from steer_core.model import load_model

    return load_model(name)


def _sides(lm: LoadedModel, seed: int) -> list[Side]:
    g = torch.Generator().manual_seed(seed)
    d = int(lm.model.config.get_text_config().hidden_size)
    layer = len(blocks(lm.model)) // 2
    vector = SteeringVector({HookPoint(layer, "resid_post"): torch.randn(d, generator=g)})
    name = lm.arch.adds_to_residual_name(layer, "mlp")
    module = lm.model.get_submodule(name)
    a = torch.randn(1, module.in_features, generator=g) / module.in_features**0.5
    b = torch.randn(module.out_features, 1, generator=g)
    return [None, vector, ServedAdapter(f"bench-{seed}", {name: (a, b)}, {name: 1.0})]


def _run(lm: LoadedModel, n: int, config: GenerationConfig, workers: int, scheduler: Scheduler | None) -> list[float]:
    """Every preview's seconds from submission to its last token."""

    def one(i: int) -> float:
        start = time.perf_counter()
        for _ in stream_sides(lm, PROMPTS[i % len(PROMPTS)], _sides(lm, i), config=config, scheduler=scheduler):
            pass
        return time.perf_counter() - start

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (a random 4-layer llama) or a load_model name")
    parser.add_argument("--previews", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--lane", type=int, default=4, help="previews at once without the scheduler (the app's lane)")
    parser.add_argument("--max-rows", type=int, default=48)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default); on a busy 2-core machine "
        "2 threads stall in OpenMP waits and take ~10x longer per step than 1 (same as OMP_NUM_THREADS=1)"
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = _model(args.model)
    config = GenerationConfig(max_new_tokens=args.tokens)
    tokens = args.previews * 3 * args.tokens
    _run(lm, 1, config, 1, None)  # warm up
    rows = []
    for label, workers, make in [
        ("one preview alone, generate", 1, lambda: None),
        ("one preview alone, scheduler", 1, lambda: Scheduler(lm, max_rows=args.max_rows)),
        (f"{args.previews} previews, generate ({args.lane} at a time)", args.lane, lambda: None),
        (
            f"{args.previews} previews, one scheduler batch",
            args.previews,
            lambda: Scheduler(lm, max_rows=args.max_rows),
        ),
    ]:
        scheduler = make()
        n = 1 if "alone" in label else args.previews
        start = time.perf_counter()
        latencies = _run(lm, n, config, workers, scheduler)
        wall = time.perf_counter() - start
        if scheduler is not None:
            scheduler.close()
        p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else latencies[0]
        toks = n * 3 * args.tokens
        rows.append((label, wall, toks / wall, statistics.median(latencies), p95))
    print(f"model {args.model}, {torch.get_num_threads()} torch threads, {args.tokens} new tokens per row, 3 rows per "
          f"preview ({tokens} tokens for {args.previews} previews)")  # fmt: skip
    for label, wall, rate, median, p95 in rows:
        print(f"{label:48s} wall {wall:7.2f} s  {rate:8.1f} tok/s  preview median {median:6.2f} s  p95 {p95:6.2f} s")
    print(f"speed-up under load (tokens/s, scheduler / generate): {rows[3][2] / rows[2][2]:.2f}x")


if __name__ == "__main__":
    main()
