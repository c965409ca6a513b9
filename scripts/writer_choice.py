"""Which writer serves a one-site vector, measured through the whole export: `--writer auto` against each candidate.

For each vector, an export with `--writer auto` (which fits the site's own MLP writer, block L+1's attention writer
and the two splitting the vector, and keeps the lowest held-in KL; steer_core.fit.composite), then an export with each
candidate forced. Every row is verify's own report on held-out text: worst format's top-1, all
formats' top-1, KL ratio, greedy tokens before the adapter first differs from the hook, and the export's seconds.

    .venv/bin/python -m scripts.writer_choice --vectors random:6:1 random:15:1 random:22:4 sae:676:0.5

A script that prints numbers (and writes them to --out), not a test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from scripts.benchmark import random_vector
from steer_core.export import export
from steer_core.model import keep_freed_memory, load_model
from steer_core.sites import HookPoint
from steer_core.vectors.recipe import VectorRecipe


def row(result: Any, writer: str) -> dict[str, Any]:
    rep = result.report
    worst = rep.worst_format
    return {
        "writer": writer,
        "modules": result.meta["target_modules"],
        "worst format": worst,
        "worst top-1": rep.by_format[worst]["top1_agreement"] if worst else rep.top1_agreement,
        "top-1": rep.top1_agreement,
        "kl_ratio": rep.kl_ratio,
        "greedy": rep.greedy_prefix_mean,
        "effect kept": rep.effect_kept,
        "seconds": result.seconds.get("total"),
        "choice": result.meta.get("calibration", {}).get("writer_choice"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--vectors", nargs="+", default=["random:15:1"], help="random:LAYER:K (K × resid norm) or sae:F:S")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--verify-tokens", type=int, default=2048)
    p.add_argument("--out", default="artifacts/writer-choice.json")
    args = p.parse_args()
    keep_freed_memory()
    lm = load_model(args.model)
    rows = []
    for spec in args.vectors:
        kind, *rest = spec.split(":")
        if kind == "random":
            vector = random_vector(lm, HookPoint(int(rest[0]), "resid_post"), float(rest[1]), "resid", 0)
        else:
            vector = VectorRecipe("sae", (float(rest[1]),), "resid", features=(int(rest[0]),)).build(lm)
        with tempfile.TemporaryDirectory() as tmp:
            results = {"auto": export(lm, vector, Path(tmp) / "auto", calibration_tokens=args.calibration_tokens,
                                      verify_tokens=args.verify_tokens)}  # fmt: skip
            for writer in ("own", "next", "split"):
                results[writer] = export(lm, vector, Path(tmp) / writer, calibration_tokens=args.calibration_tokens,
                                         verify_tokens=args.verify_tokens, writer=writer)  # fmt: skip
        for writer, result in results.items():
            r = {"vector": spec, **row(result, writer)}
            print(json.dumps(r), flush=True)
            rows.append(r)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
