"""How far end-to-end refinement takes the portable adapter: held-out fidelity against refinement steps and rank.

The closed form fits A·x to a per-token target at one writer; `--refine-steps` trains A and B on KL(hook ‖ adapter)
from there. This script asks what that training converges to, so that a target the closed form misses can be called
reachable (at some cost) or not: for each layer and strength it calibrates once, then trains rank-r updates
(rank 1 is the exported adapter; rank r > 1 starts from it, extra rows of A small and random, extra columns of B zero;
`--extra-modules` adds LoRAs on other modules of the writer's layer, starting at zero) with Adam and a cosine
learning-rate decay, and measures top-1 agreement and KL(hook ‖ adapter) / KL(hook ‖ base)
on the same held-out text as `verify` at each checkpoint. `--export` also exports the final rank-1 adapter and
verifies it through PEFT, as `export` does. A script, not a test; every number is measured in the run:

    .venv/bin/python -m scripts.refine_curve --layers 6 --strengths 1 --checkpoints 0 50 100 --out artifacts/curve
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scripts.benchmark import random_vector
from steer_core.check.servability import HeldOut
from steer_core.export import export
from steer_core.fit.calibrate import Calibration, WriterFit, balance, calibrate
from steer_core.fit.refine import cosine_decay, default_lr, train
from steer_core.model import LoadedModel, load_model
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector


def init_params(
    calibration: Calibration, rank: int, device: torch.device, seed: int, extra: dict[str, nn.Linear] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rank-r (A, B) per writer whose first component is the calibrated rank-1 adapter, so training starts at it;
    each `extra` module gets a rank-r update that starts at zero (A small and random, B zero)."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, module in (extra or {}).items():
        a = torch.randn(rank, module.in_features, generator=g) * extra_scale(module)
        b = torch.zeros(module.out_features, rank)
        params[name] = (a.to(device).requires_grad_(True), b.to(device).requires_grad_(True))
    for f in calibration.fits:
        a = torch.zeros(rank, f.A.numel())
        b = torch.zeros(f.B.numel(), rank)
        a[0], b[:, 0] = f.A.float(), f.B.float()
        if rank > 1:
            a[1:] = torch.randn(rank - 1, f.A.numel(), generator=g) * float(f.A.abs().mean())
        params[f.module] = (a.to(device).requires_grad_(True), b.to(device).requires_grad_(True))
    return params


def extra_scale(module: nn.Linear) -> float:
    """A typical coordinate for an extra module's A and B: ΔW = BAᵀ then grows on the scale of W's entries."""
    return float(module.weight.detach().abs().mean()) ** 0.5


def rank1_calibration(
    calibration: Calibration, params: dict[str, tuple[torch.Tensor, torch.Tensor]], steps: int
) -> Calibration:
    fits: list[WriterFit] = []
    for f in calibration.fits:
        a, b = (t.detach().cpu() for t in params[f.module])
        a, b = balance(a[0], b[:, 0])
        fits.append(dataclasses.replace(f, A=a, B=b, refined_steps=steps))
    return dataclasses.replace(calibration, fits=fits, refine={"steps": steps})


def curve(lm: LoadedModel, vector: SteeringVector, args: argparse.Namespace, label: dict[str, Any]) -> list[dict]:
    t0 = time.perf_counter()
    cal = calibrate(lm.model, lm.tokenizer, vector, tokens=args.calibration_tokens)
    held = HeldOut(lm, vector, args.eval_tokens)
    setup = time.perf_counter() - t0
    rows: list[dict] = []
    last = max(args.checkpoints)
    lr = args.lr if args.lr is not None else default_lr(cal)
    for rank in args.ranks:
        layer = cal.fits[0].writer[0]
        extra = {n: lm.model.get_submodule(n) for n in (f"model.layers.{layer}.{m}" for m in args.extra_modules)}
        params = init_params(cal, rank, lm.device, args.seed, extra)
        groups = []
        for name, module in extra.items():
            groups.append({"params": list(params[name]), "lr": lr * extra_scale(module)})
        for f in cal.fits:
            a, b = params[f.module]
            # Adam moves each coordinate by about lr per step: scale lr to the calibrated A's and B's coordinates.
            groups.append({"params": [a], "lr": lr * float(f.A.abs().mean())})
            groups.append({"params": [b], "lr": lr * float(f.B.abs().mean())})
        opt = torch.optim.Adam(groups)
        sched = cosine_decay(opt, last)
        done, losses, start = 0, [], time.perf_counter()
        for checkpoint in sorted(args.checkpoints):
            if checkpoint > done:
                losses += train(
                    lm.model, lm.tokenizer, vector, params, opt, steps=checkpoint - done,
                    skip_bos=cal.skip_bos, batch_size=args.batch_size, max_doc_tokens=args.max_doc_tokens,
                    on_step=lambda _s, _kl, sched=sched: sched.step(),
                )  # fmt: skip
                done = checkpoint
            row = {
                **label,
                "rank": rank,
                "lr": lr,
                "extra_modules": args.extra_modules,
                "steps": done,
                **held.measure(params),
                "train_kl_last10": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None,
                "train_seconds": round(time.perf_counter() - start, 1),
                "setup_seconds": round(setup, 1),
                "tokens_per_step": args.batch_size * args.max_doc_tokens,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
        if rank == 1 and args.export and not extra:
            with tempfile.TemporaryDirectory() as tmp:
                refined = rank1_calibration(cal, params, done)
                result = export(lm, vector, Path(tmp) / "adapter", calibration=refined, verify_tokens=args.eval_tokens)
            row = {**rows[-1], "peft_top1": result.report.top1_agreement, "peft_kl_ratio": result.report.kl_ratio}
            print(json.dumps({**label, "verify": result.report.summary()}), flush=True)
            rows[-1] = row
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device-map", default=None, help="e.g. cuda (default: where the model loads, the CPU)")
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--strengths", type=float, nargs="+", default=[1.0])
    p.add_argument("--unit", choices=["resid", "writer"], default="resid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, nargs="+", default=[1])
    p.add_argument("--checkpoints", type=int, nargs="+", default=[0, 100, 300, 1000])
    p.add_argument(
        "--extra-modules",
        nargs="*",
        default=[],
        help="also train a LoRA on these modules of the writer's layer, e.g. mlp.gate_proj mlp.up_proj (Llama names)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-doc-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, help="Adam's relative learning rate (default: refine's for the architecture)")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--export", action="store_true", help="also export and PEFT-verify the final rank-1 adapter")
    p.add_argument("--out", default="artifacts/refine-curve")
    args = p.parse_args()
    if any(r < 1 for r in args.ranks) or min(args.checkpoints) < 0:
        p.error(f"ranks must be >= 1 and checkpoints >= 0, got {args.ranks} and {args.checkpoints}")
    lm = load_model(args.model, device_map=args.device_map)
    rows = []
    for layer in args.layers:
        for k in args.strengths:
            vector = random_vector(lm, HookPoint(layer, "resid_post"), k, args.unit, args.seed)
            label = {"model": args.model, "layer": layer, "strength": k, "unit": args.unit, "seed": args.seed}
            rows += curve(lm, vector, args, label)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "refine_curve.json").write_text(json.dumps(rows, indent=1))
    print(f"{'layer':>5} {'k':>5} {'rank':>4} {'steps':>6} {'top-1':>7} {'KL ratio':>9} {'train s':>8}")
    for r in rows:
        print(
            f"{r['layer']:>5} {r['strength']:>5g} {r['rank']:>4} {r['steps']:>6} {r['top1']:>7.1%} "
            f"{r['kl_ratio']:>9.4f} {r['train_seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
