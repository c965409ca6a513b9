"""The preview's cost: unsteered then steered one after another (before) vs both as rows of one batch (now); with
--adapter also the three-column preview (the served adapter as a third row) against three generations in turn.

Greedy previews of --tokens new tokens on the embedded SmolLM2 with the default feature, each way --repeats times in
alternation (so background load hits both alike); prints the median wall times, tokens/s per side and the ratios.
A script that prints numbers, not a test:

    .venv/bin/python -m scripts.preview_benchmark          # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from steer_core.adapter.served import read_adapter
from steer_core.generate import GenerationConfig, stream_sides
from steer_core.model import load_model
from steer_core.sae.feature import embedded_sae_for
from steer_core.vectors.recipe import VectorRecipe

PROMPTS = ["Tell me about your day.", "What should I cook tonight?", "Write a short note to a friend."]


def _run(lm, prompt: str, sides: list, config: GenerationConfig) -> tuple[float, list[int]]:
    """Wall time and tokens generated per side; min_new_tokens keeps every side generating the full length."""
    t0 = time.perf_counter()
    last: tuple[str, ...] = ()
    for last in stream_sides(lm, prompt, sides, config=config):  # noqa: B007
        pass
    return time.perf_counter() - t0, [len(lm.tokenizer(t).input_ids) for t in last]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--adapter", help="an exported adapter folder: also time the three-column preview (+ served)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model("smollm2-135m-instruct")
    spec = embedded_sae_for(lm.name)
    assert spec is not None
    vector = VectorRecipe("sae", (spec.default_strength,), "resid", features=(spec.default_feature,)).build(lm)
    config = GenerationConfig(args.tokens)
    lm.model.generation_config.min_new_tokens = args.tokens  # equal lengths, so times compare
    _run(lm, PROMPTS[0], [None, vector], config)  # warm-up
    served = read_adapter(args.adapter) if args.adapter else None
    keys = ("sequential", "sequential_unsteered", "sequential_steered", "batched", "sequential_3", "batched_3")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(args.repeats):
        prompt = PROMPTS[r % len(PROMPTS)]
        t_base, _ = _run(lm, prompt, [None], config)
        t_steer, _ = _run(lm, prompt, [vector], config)
        t_batch, _ = _run(lm, prompt, [None, vector], config)
        rows["sequential_unsteered"].append(t_base)
        rows["sequential_steered"].append(t_steer)
        rows["sequential"].append(t_base + t_steer)
        rows["batched"].append(t_batch)
        if served is not None:
            rows["sequential_3"].append(t_base + t_steer + _run(lm, prompt, [served], config)[0])
            rows["batched_3"].append(_run(lm, prompt, [None, vector, served], config)[0])
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    out = {
        "new_tokens_per_side": args.tokens,
        "repeats": args.repeats,
        "seconds_sequential_2_sides": round(med["sequential"], 2),
        "seconds_batched_2_sides": round(med["batched"], 2),
        "batched_over_sequential": round(med["batched"] / med["sequential"], 3),
        "tokens_per_s_per_side_sequential_unsteered": round(args.tokens / med["sequential_unsteered"], 1),
        "tokens_per_s_per_side_sequential_steered": round(args.tokens / med["sequential_steered"], 1),
        "steered_over_unsteered_sequential": round(med["sequential_unsteered"] / med["sequential_steered"], 3),
        "tokens_per_s_per_side_batched": round(args.tokens / med["batched"], 1),
        "steered_over_unsteered_batched": 1.0,  # one batch: both rows advance together, token for token
    }
    if served is not None:
        out["seconds_sequential_3_sides"] = round(med["sequential_3"], 2)
        out["seconds_batched_3_sides"] = round(med["batched_3"], 2)
        out["batched_over_sequential_3"] = round(med["batched_3"] / med["sequential_3"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
