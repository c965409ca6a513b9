"""Fidelity and cost of exported adapters across layers, strengths, vectors and modes, on the embedded models.

Prints tables and writes benchmark.json / .csv / .md / .png into --out. A script, not a test: every
number is measured in this run, on held-out text that calibration never saw, in every input format the model is served
in (chat, system prompt, multi-turn, plain text for the instruct model; plain text for a base model).
Examples, as run for the README (2 CPU cores, one process at a time; about 22, 15 and 40 minutes):

    .venv/bin/python -m scripts.benchmark --model smollm2-135m-instruct --out artifacts/bench-smollm2
    .venv/bin/python -m scripts.benchmark --vectors sae caa --seeds 3 --layers 15 --strengths 0.5 4 --cost \\
        --out artifacts/bench-smollm2-real
    .venv/bin/python -m scripts.benchmark --model gemma-3-270m --layers 1 5 9 13 17 --strengths 0.25 1 \\
        --unit writer --out artifacts/bench-gemma

Vectors: "random" (a seeded random direction), "sae" (a feature of the model's embedded SAE, at its layer only;
seed i takes the i-th of a fixed, seeded choice of live features), "caa" (mean difference of examples/joy_pairs.json
at the layer). Each is scaled to k × the layer's median norm (--unit). --cost adds calibration time against
calibration tokens and the serving speed ratios (hook-steered preview, unmerged PEFT adapter and merged adapter,
each ÷ the base model, tokens/s measured back to back in this run).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from steer_core.activations import median_norm
from steer_core.check.verify import load_peft
from steer_core.corpus import FORMATS
from steer_core.export import export
from steer_core.fit.calibrate import calibrate
from steer_core.fit.ridge import forget_statistics
from steer_core.generate import GenerationConfig, complete
from steer_core.model import keep_freed_memory, load_model
from steer_core.sae.feature import embedded_sae_for, load_sae_from_disk
from steer_core.sites import HookPoint, num_layers
from steer_core.vectors.recipe import VectorRecipe
from steer_core.vectors.vector import SteeringVector

EXAMPLE_PAIRS = Path(__file__).resolve().parents[1] / "examples" / "joy_pairs.json"


def default_layers(n: int) -> list[int]:
    return sorted({1, *range(3, n - 1, 3), n - 1})


def random_vector(lm, point: HookPoint, k: float, unit: str, seed: int) -> SteeringVector:
    g = torch.Generator().manual_seed(1000 * seed + point.layer)
    v = torch.randn(lm.model.config.hidden_size, generator=g)
    norm = median_norm(lm.model, lm.tokenizer, point, unit)  # type: ignore[arg-type]
    return SteeringVector({point: v / v.norm() * k * norm}, {"source": "random", "seed": seed, "k": k, "unit": unit})


def sae_features(lm, seeds: int) -> tuple[HookPoint, list[int]]:
    """The embedded SAE's layer and `seeds` live features drawn with a fixed seed (labels say which fired)."""
    from steer_core.sae.labels import load_labels

    spec = embedded_sae_for(lm.name)
    if spec is None:
        raise SystemExit(f"--vectors sae needs a model with an embedded SAE; {lm.name} has none")
    sae = load_sae_from_disk(spec.path)
    labels = load_labels(spec.labels_path)
    live = sorted(f for f, label in labels.labels.items() if 1e-4 < label.density < 0.05)
    chosen = [live[i] for i in torch.randperm(len(live), generator=torch.Generator().manual_seed(0))[:seeds]]
    return sae.source.point, chosen


def make_vector(lm, kind: str, point: HookPoint, k: float, unit: str, seed: int, features: list[int]) -> SteeringVector:
    if kind == "random":
        return random_vector(lm, point, k, unit, seed)
    if kind == "sae":
        return VectorRecipe("sae", (k,), unit, features=(features[seed],)).build(lm)
    from steer_core.vectors.contrastive import read_pairs

    pos, neg = read_pairs(EXAMPLE_PAIRS)
    recipe = VectorRecipe("contrastive", (k,), unit, layer=point.layer, positive=tuple(pos), negative=tuple(neg))
    return recipe.build(lm)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def speed_ratios(lm, vector: SteeringVector, adapter_dir: Path, tokens: int = 48, rounds: int = 5) -> dict[str, float]:
    """Tokens/s ÷ the base model's, greedy, one prompt, measured back to back (best of `rounds` each): hook-steered
    preview, the adapter unmerged in PEFT, and the adapter merged into the weights."""
    config = GenerationConfig(max_new_tokens=tokens, temperature=0.0)
    prompt = "Write a short paragraph about the sea."
    peft_model = load_peft(lm.model, adapter_dir)
    ids = lm.tokenizer(lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                       add_generation_prompt=True) if lm.is_chat else prompt, return_tensors="pt")  # fmt: skip

    def gen(model) -> None:
        # min_new_tokens: every variant generates exactly `tokens` tokens, so times compare
        model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    runs = {
        "base": lambda: gen(lm.model),
        "hook_preview": lambda: complete(lm, prompt, vector=vector, config=config),
        "base_preview": lambda: complete(lm, prompt, vector=None, config=config),
        "peft_unmerged": lambda: gen(peft_model),
    }
    best = dict.fromkeys(runs, float("inf"))
    # Interleaved rounds, best of `rounds`: with best of 2 the ratios wandered by ±25% between runs on 2 cores.
    for _ in range(rounds):
        for name, fn in runs.items():
            best[name] = min(best[name], _timed(fn))
    merged = peft_model.merge_and_unload()
    base_again = float("inf")
    best["merged"] = float("inf")
    for _ in range(rounds):  # base again, interleaved with the merged model
        base_again = min(base_again, _timed(lambda: gen(lm.model)))
        best["merged"] = min(best["merged"], _timed(lambda: gen(merged)))
    return {
        "steered_preview_over_unsteered": best["base_preview"] / best["hook_preview"],
        "peft_unmerged_over_base": best["base"] / best["peft_unmerged"],
        "merged_over_base": base_again / best["merged"],
    }


def calibration_cost(lm, vector: SteeringVector, budgets: list[int]) -> list[dict]:
    """Seconds to calibrate (forward passes + the ridge fit) against calibration tokens."""
    rows = []
    for tokens in budgets:
        forget_statistics(lm.model)  # a full pass each time, as a first export at a site makes
        cal = calibrate(lm.model, lm.tokenizer, vector, tokens=tokens)
        rows.append({"tokens": cal.tokens, "seconds": cal.seconds, "cv_rel_rmse": cal.fits[0].cv_rel_rmse})
        print(f"  calibration {cal.tokens:>6} tokens: {cal.seconds:6.1f} s  (validation rel. RMSE "
              f"{cal.fits[0].cv_rel_rmse:.4f})", flush=True)  # fmt: skip
    return rows


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for (k, mode, kind), group in _groups(rows).items():
        layers = sorted({r["layer"] for r in group})
        mean = [sum(r["top1"] for r in group if r["layer"] == layer) / sum(1 for r in group if r["layer"] == layer)
                for layer in layers]  # fmt: skip
        ax.plot(layers, [100 * m for m in mean], marker="o", label=f"{kind} {k:g}× ({mode})")
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("top-1 agreement with hook steering (%)")
    ax.set_title(rows[0]["model"])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _groups(rows: list[dict]) -> dict[tuple[float, str, str], list[dict]]:
    out: dict[tuple[float, str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["k"], r["mode"], r["vector"]), []).append(r)
    return out


def _shares(row: dict) -> str:
    """Which post-norm shares the export used, with both candidates' held-in KL(hook ‖ adapter)."""
    s = row.get("shares")
    if not s:
        return "-"
    kl = s["held_in_kl"]
    return f"{s['used']} ({kl['split']:.3g} / {kl['fitted']:.3g})"


def _worst(row: dict) -> str:
    worst = row.get("worst_format")
    if not worst:
        return "-"
    g = row["by_format"][worst]
    return f"{worst} {g['top1_agreement']:.1%} / {g['kl_ratio']:.4f}"


def _formats(row: dict) -> str:
    by = row.get("by_format") or {}
    return " / ".join(f"{by[f]['top1_agreement']:.1%}" if f in by else "-" for f in FORMATS)


def markdown(summary: dict) -> str:
    """The run as markdown tables: fidelity rows, then calibration cost and speed ratios when measured."""
    shares = any(r.get("shares") for r in summary["rows"])
    lines = [
        f"{summary['model']} (held-out text; top-1 and KL ratio against hook steering; greedy = tokens before the "
        "first divergence, of 20; fit err = mean |A·x - target| / mean |target|)",
        "",
        "| vector | mode | layer | strength | seed | top-1 | KL ratio | worst format: top-1 / KL ratio | top-1 by "
        f"format ({' / '.join(FORMATS)}) | greedy | fit err | pos-0 weight | export s |"
        + (" post-norm shares (held-in KL split / fitted) |" if shares else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if shares else ""),
    ]
    for r in summary["rows"]:
        name = r["vector"] + (f" #{r['feature']}" if r.get("feature") is not None else "")
        lines.append(
            f"| {name} | {r['mode']} | {r['layer']} | {r['k']:g}× {r['unit']} | {r['seed']} | {r['top1']:.1%} "
            f"| {r['kl_ratio']:.4f} | {_worst(r)} | {_formats(r)} | {r['greedy_prefix']:.1f} "
            f"| {r['fit_abs_error']:.3f} "
            f"| {r.get('first_weight') or '-'} | {r['export_s']:.1f} |" + (f" {_shares(r)} |" if shares else "")
        )
    if summary.get("calibration_cost"):
        lines += ["", "| calibration tokens | seconds | validation rel. RMSE of A·x |", "|---|---|---|"]
        cost = summary["calibration_cost"]
        lines += [f"| {c['tokens']} | {c['seconds']:.1f} | {c['cv_rel_rmse']:.4f} |" for c in cost]
    if summary.get("speed"):
        lines += ["", "| speed ratio (tokens/s, same run) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in summary["speed"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    keep_freed_memory()  # as the command line does, so the export times below are the CLI's
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layers", type=int, nargs="*", help="default: 1, every 3rd, and the last")
    p.add_argument("--strengths", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--unit", choices=["resid", "writer"], default="resid")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--verify-tokens", type=int, default=2048)
    p.add_argument("--refine-steps", type=int, default=0)
    p.add_argument("--vectors", nargs="+", choices=["random", "sae", "caa"], default=["random"])
    p.add_argument("--modes", nargs="+", choices=["portable", "exact", "ablate"], default=["portable"])
    p.add_argument("--cost", action="store_true", help="also calibration time vs tokens and serving speed ratios")
    p.add_argument("--out", default="artifacts/benchmark")
    p.add_argument("--markdown-from", metavar="JSON", help="only print an earlier run's benchmark.json as markdown")
    args = p.parse_args()
    if args.markdown_from:
        print(markdown(json.loads(Path(args.markdown_from).read_text())), end="")
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    lm = load_model(args.model)
    load_s = time.perf_counter() - t
    layers = args.layers or default_layers(num_layers(lm.model))
    rows: list[dict] = []
    print(f"{args.model}: loaded in {load_s:.1f}s; layers {layers}; strengths {args.strengths} × {args.unit} norm")
    header = (
        f"{'vector':>6} {'mode':>8} {'layer':>5} {'k':>5} {'seed':>4} {'top1':>7} {'KL ratio':>9} {'greedy':>7} "
        f"{'fit err':>8} [top-1 {' / '.join(FORMATS)}] {'export s':>8}"
    )
    print(header)
    sae_point, features = sae_features(lm, args.seeds) if "sae" in args.vectors else (None, [])
    last: tuple[SteeringVector, Path] | None = None
    keep = Path(tempfile.mkdtemp())
    for kind in args.vectors:
        for layer in [sae_point.layer] if kind == "sae" and sae_point else layers:
            for k in args.strengths:
                for seed in range(args.seeds if kind != "caa" else 1):
                    point = HookPoint(layer, "resid_post")
                    vec = make_vector(lm, kind, point, k, args.unit, seed, features)
                    for mode in args.modes:
                        folder = keep / f"{kind}-{mode}-{layer}-{k}-{seed}"
                        forget_statistics(lm.model)  # every row's export time is a first export's, calibration made
                        res = export(lm, vec, folder, mode=mode, calibration_tokens=args.calibration_tokens,
                                     verify_tokens=args.verify_tokens, refine_steps=args.refine_steps)  # fmt: skip
                        if mode == "portable":
                            last = (vec, folder)
                        rep = res.report
                        fit = next(iter(rep.fit_abs_error.values()), float("nan"))
                        row = {
                            "model": args.model, "vector": kind, "feature": features[seed] if kind == "sae" else None,
                            "layer": layer, "k": k, "unit": args.unit, "seed": seed, "mode": mode,
                            "refine_steps": args.refine_steps, "top1": rep.top1_agreement, "kl_ratio": rep.kl_ratio,
                            "kl_hook_adapter": rep.kl_hook_adapter, "kl_hook_base": rep.kl_hook_base,
                            "greedy_prefix": rep.greedy_prefix_mean, "fit_abs_error": fit,
                            "worst_format": rep.worst_format, "by_format": rep.by_format, "by_source": rep.by_source,
                            "first_weight": res.meta.get("calibration", {}).get("first_weight"),
                            "shares": res.meta.get("calibration", {}).get("post_norm_shares") or None,
                            "calibrate_s": res.seconds.get("calibrate"), "verify_s": res.seconds.get("verify"),
                            "export_s": res.seconds["total"],
                        }  # fmt: skip
                        rows.append(row)
                        cells = (f"{rep.top1_agreement:>7.1%} {rep.kl_ratio:>9.4f} {rep.greedy_prefix_mean:>7.1f} "
                                 f"{fit:>8.3f} [{_formats(row)}]")  # fmt: skip
                        print(f"{kind:>6} {mode:>8} {layer:>5} {k:>5g} {seed:>4} {cells} {res.seconds['total']:>8.1f}"
                              + (f" shares {_shares(row)}" if row["shares"] else ""), flush=True)  # fmt: skip
    summary: dict = {"model": args.model, "load_s": load_s, "rows": rows}
    if args.cost and last is not None:
        print("cost:")
        summary["calibration_cost"] = calibration_cost(lm, last[0], [2048, 4096, 8192, 16384, 32768])
        summary["speed"] = speed_ratios(lm, *last)
        for name, value in summary["speed"].items():
            print(f"  {name}: {value:.3f}")
    shutil.rmtree(keep, ignore_errors=True)
    (out / "benchmark.json").write_text(json.dumps(summary, indent=1))
    with (out / "benchmark.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "benchmark.png")
    (out / "benchmark.md").write_text(markdown(summary))
    print(f"wrote {out}/benchmark.json, .csv, .md, .png")


if __name__ == "__main__":
    main()
