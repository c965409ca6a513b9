"""Fidelity and cost of exported adapters across layers and strengths, on the embedded models.

Prints a table and writes benchmark.json / benchmark.csv / benchmark.png into --out. A script, not a test: every
number is measured in this run. Example (about 20 minutes on 2 CPU cores):

    .venv/bin/python -m scripts.benchmark --model smollm2-135m-instruct --out artifacts/bench-smollm2
    .venv/bin/python -m scripts.benchmark --model gemma-3-270m --strengths 0.25 1 --unit writer \\
        --out artifacts/bench-gemma
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import torch

from steer_core.activations import median_norm
from steer_core.export import export
from steer_core.generate import GenerationConfig, complete
from steer_core.model import load_model
from steer_core.sites import HookPoint, num_layers
from steer_core.vector import SteeringVector


def default_layers(n: int) -> list[int]:
    return sorted({1, *range(3, n - 1, 3), n - 1})


def random_vector(lm, point: HookPoint, k: float, unit: str, seed: int) -> SteeringVector:
    g = torch.Generator().manual_seed(1000 * seed + point.layer)
    v = torch.randn(lm.model.config.hidden_size, generator=g)
    norm = median_norm(lm.model, lm.tokenizer, point, unit)  # type: ignore[arg-type]
    return SteeringVector({point: v / v.norm() * k * norm}, {"source": "random", "seed": seed, "k": k, "unit": unit})


def speed_ratio(lm, vector: SteeringVector, tokens: int = 48) -> float:
    """Steered preview tokens/s ÷ unsteered, greedy, same prompt, measured back to back (best of 2)."""
    config = GenerationConfig(max_new_tokens=tokens, temperature=0.0)
    prompt = "Write a short paragraph about the sea."
    best = {"base": float("inf"), "steered": float("inf")}
    for _ in range(2):
        for name, vec in (("base", None), ("steered", vector)):
            t = time.perf_counter()
            complete(lm, prompt, vector=vec, config=config)
            best[name] = min(best[name], time.perf_counter() - t)
    return best["base"] / best["steered"]


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for (k, mode), group in _groups(rows).items():
        layers = sorted({r["layer"] for r in group})
        mean = [sum(r["top1"] for r in group if r["layer"] == layer) / sum(1 for r in group if r["layer"] == layer)
                for layer in layers]  # fmt: skip
        ax.plot(layers, [100 * m for m in mean], marker="o", label=f"{k}× ({mode})")
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("top-1 agreement with hook steering (%)")
    ax.set_title(rows[0]["model"])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _groups(rows: list[dict]) -> dict[tuple[float, str], list[dict]]:
    out: dict[tuple[float, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["k"], r["mode"]), []).append(r)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layers", type=int, nargs="*", help="default: 1, every 3rd, and the last")
    p.add_argument("--strengths", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--unit", choices=["resid", "writer"], default="resid")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--verify-tokens", type=int, default=2048)
    p.add_argument("--refine-steps", type=int, default=0)
    p.add_argument("--out", default="artifacts/benchmark")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    lm = load_model(args.model)
    load_s = time.perf_counter() - t
    layers = args.layers or default_layers(num_layers(lm.model))
    rows: list[dict] = []
    print(f"{args.model}: loaded in {load_s:.1f}s; layers {layers}; strengths {args.strengths} × {args.unit} norm")
    header = (
        f"{'layer':>5} {'k':>5} {'seed':>4} {'top1':>7} {'KL ratio':>9} {'greedy':>7} {'fit err':>8} {'export s':>8}"
    )
    print(header)
    for layer in layers:
        for k in args.strengths:
            for seed in range(args.seeds):
                point = HookPoint(layer, "resid_post")
                vec = random_vector(lm, point, k, args.unit, seed)
                with tempfile.TemporaryDirectory() as tmp:
                    res = export(lm, vec, Path(tmp) / "a", calibration_tokens=args.calibration_tokens,
                                 verify_tokens=args.verify_tokens, refine_steps=args.refine_steps)  # fmt: skip
                rep = res.report
                fit = next(iter(rep.fit_abs_error.values()), float("nan"))
                row = {
                    "model": args.model, "layer": layer, "k": k, "unit": args.unit, "seed": seed, "mode": "portable",
                    "refine_steps": args.refine_steps, "top1": rep.top1_agreement, "kl_ratio": rep.kl_ratio,
                    "kl_hook_adapter": rep.kl_hook_adapter, "kl_hook_base": rep.kl_hook_base,
                    "greedy_prefix": rep.greedy_prefix_mean, "fit_abs_error": fit,
                    "calibrate_s": res.seconds.get("calibrate"), "verify_s": res.seconds.get("verify"),
                    "export_s": res.seconds["total"],
                }  # fmt: skip
                rows.append(row)
                cells = f"{rep.top1_agreement:>7.1%} {rep.kl_ratio:>9.4f} {rep.greedy_prefix_mean:>7.1f} {fit:>8.3f}"
                print(f"{layer:>5} {k:>5g} {seed:>4} {cells} {res.seconds['total']:>8.1f}", flush=True)
    ratio = speed_ratio(lm, random_vector(lm, HookPoint(layers[len(layers) // 2], "resid_post"), 1.0, args.unit, 0))
    summary = {"model": args.model, "load_s": load_s, "steered_over_unsteered_tokens_per_s": ratio, "rows": rows}
    (out / "benchmark.json").write_text(json.dumps(summary, indent=1))
    with (out / "benchmark.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "benchmark.png")
    print(f"steered preview tokens/s ÷ unsteered: {ratio:.3f}")
    print(f"wrote {out}/benchmark.json, .csv, .png")


if __name__ == "__main__":
    main()
