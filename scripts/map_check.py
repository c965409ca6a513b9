"""How well the servability map predicts the export: predicted top-1 (a map cell) against the measured top-1 of the
full portable export (default calibration and verification) for random directions at benchmark layers and strengths.
A script that prints numbers, not a test:

    .venv/bin/python -m scripts.map_check --out docs/map-check-smollm2.json     # ~1.5 min a row on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from scripts.benchmark import random_vector
from steer_core.check.servability import predict
from steer_core.export import export
from steer_core.model import load_model
from steer_core.sites import HookPoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 6, 15, 22, 27])
    p.add_argument("--strengths", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model(args.model)
    rows = []
    for layer in args.layers:
        for k in args.strengths:
            vector = random_vector(lm, HookPoint(layer, "resid_post"), k, "resid", args.seed)
            t0 = time.perf_counter()
            cell = predict(lm, vector, layer, k)
            t_map = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                report = export(lm, vector, Path(tmp) / "a").report
            row = {
                "layer": layer,
                "strength": k,
                "predicted_top1": round(cell.top1, 4),
                "measured_top1": round(report.top1_agreement, 4),
                "error_points": round(100 * (cell.top1 - report.top1_agreement), 2),
                "predicted_servable": cell.servable,
                "measured_servable": report.top1_agreement >= 0.95,
                "map_seconds": round(t_map, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    within = sum(abs(r["error_points"]) <= 5 for r in rows)
    agree = sum(r["predicted_servable"] == r["measured_servable"] for r in rows)
    summary = {"rows": len(rows), "within_5_points": within, "servable_verdict_agrees": agree}
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
