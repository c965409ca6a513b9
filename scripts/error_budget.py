"""How small the portable adapter's per-token error must be for a fidelity target, and how small it can be.

On a pre-norm model the portable adapter adds (A·x) v at the writer where the hook adds v: its whole difference from
the hook is the per-token error e = A·x − 1, which the closed form makes as small as a linear functional of the
writer's input allows. This script scales that error down (λ·e: the hook adds (1 − λ)v, the adapter λ·(A·x) v, so
λ = 1 is the exported adapter and λ = 0 the hook) and, for comparison, replaces it by random per-token noise of the
same mean size, then measures top-1 agreement and KL(hook ‖ ·) / KL(hook ‖ base) on verify's held-out text. It
answers "what fit error would top-1 ≥ 99% need at this layer and strength", to set against the fit error the
closed form reaches (which more calibration text does not lower). A script, not a test; every number is measured:

    .venv/bin/python -m scripts.error_budget --layers 6 15 29 --strengths 1 4 --out artifacts/error-budget
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scripts.benchmark import random_vector
from steer_core import corpus
from steer_core.activations import forward_until, recording
from steer_core.check.servability import HeldOut
from steer_core.fit.calibrate import calibrate
from steer_core.hooks import gated_hooks
from steer_core.model import LoadedModel, keep_freed_memory, load_model
from steer_core.sites import HookPoint, architecture_for
from steer_core.steer import lowrank_updates, steering
from steer_core.vectors.vector import SteeringVector


@contextmanager
def noisy(model: torch.nn.Module, module: str, v: Tensor, scale: float, seed: int) -> Iterator[None]:
    """Add (1 + ε)v at the writer's output, ε ~ N(0, scale²) drawn per token."""
    g = torch.Generator().manual_seed(seed)

    def hook(_m: torch.nn.Module, _args: Any, output: Tensor) -> Tensor:
        eps = scale * torch.randn(output.shape[:-1], generator=g).to(output)
        return output + (1 + eps).unsqueeze(-1) * v.to(output)

    with gated_hooks() as hooks:
        hooks.forward(model.get_submodule(module), hook, prepend=True)
        yield


def writer_inputs(lm: LoadedModel, module: str, layer: int, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """The writer's input on every real token of `batches` ((input ids, attention mask) pairs), in float64, each
    pass stopped after the writer's layer. The writer is upstream of a one-site vector and of its own adapter, so it
    is read without either."""
    xs: list[Tensor] = []
    keep: list[Tensor] = []

    def on(_name: str, x: Tensor) -> None:
        xs.append(x[keep[-1]].double().cpu())

    with recording(lm.model, [module], on, what="input"):
        for ids, mask in batches:
            keep.append(mask.bool().to(lm.device))
            forward_until(lm.model, layer, input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
    return torch.cat(xs)


def calibration_batches(lm: LoadedModel, tokens: int) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in corpus.batches(lm.tokenizer, "calibration", tokens, max_doc_tokens=64, by_length=True):
        yield batch.input_ids, batch.attention_mask


def least_squares_floor(x: Tensor) -> float:
    """The smallest RMS(A·x − 1) any A reaches on these rows, A fitted to them in hindsight (exact least squares):
    no rank-1 LoRA on this writer adds v with a smaller per-token error on them."""
    ones = torch.ones(len(x), 1, dtype=torch.float64)
    a = torch.linalg.lstsq(x.double(), ones, driver="gelsd").solution
    return float(((x.double() @ a - ones) ** 2).mean() ** 0.5)


def budget(lm: LoadedModel, vector: SteeringVector, lambdas: list[float], args: argparse.Namespace) -> list[dict]:
    cal = calibrate(lm.model, lm.tokenizer, vector, tokens=args.calibration_tokens, writer="own")  # the site's writer
    if len(cal.fits) != 1 or cal.fits[0].target != "one":
        raise SystemExit("the error budget is defined for one pre-norm writer (target A·x = 1)")
    fit = cal.fits[0]
    point = vector.points[0]
    v = vector.directions[point].float()
    a, b = fit.A.float().to(lm.device), fit.B.float().to(lm.device)
    held = HeldOut(lm, vector, args.eval_tokens)
    # e = A·x·(B·v/|v|²) − 1 on held-out tokens: the error λ scales.
    x = writer_inputs(lm, fit.module, fit.writer[0], held.batches)
    e = x @ fit.A.double() * (float(fit.B.double() @ v.double()) / float(v.double() @ v.double())) - 1
    err, rms = float(e.abs().mean()), float((e**2).mean() ** 0.5)
    calibration = calibration_batches(lm, args.calibration_tokens)
    floor = least_squares_floor(writer_inputs(lm, fit.module, fit.writer[0], calibration))
    rows = []
    for lam in lambdas:
        t0 = time.perf_counter()
        rest = SteeringVector({point: v * (1 - lam)})

        @contextmanager
        def scaled(lam: float = lam, rest: SteeringVector = rest) -> Iterator[None]:
            with steering(lm.model, rest), lowrank_updates(lm.model, {fit.module: (a * lam, b)}):
                yield

        fitted = held.under(scaled)
        sigma = lam * err * (torch.pi / 2) ** 0.5  # E|N(0, σ²)| = σ·sqrt(2/π): same mean |ε| as λ·e
        noise = held.under(lambda s=sigma: noisy(lm.model, fit.module, v, s, args.seed))
        row = {
            "layer": point.layer,
            "strength": vector.provenance["k"],
            "lambda": lam,
            "mean_abs_error": lam * err,
            "rms_error": lam * rms,
            "least_squares_floor_rms": floor,
            "top1": fitted["top1"],
            "kl_ratio": fitted["kl_ratio"],
            "noise_top1": noise["top1"],
            "noise_kl_ratio": noise["kl_ratio"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--strengths", type=float, nargs="+", default=[1.0])
    p.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--out", default="artifacts/error-budget")
    args = p.parse_args()
    if any(not 0 <= lam <= 1 for lam in args.lambdas):
        p.error(f"every λ must be in [0, 1] (1 is the adapter, 0 the hook); got {args.lambdas}")
    keep_freed_memory()
    lm = load_model(args.model)
    if architecture_for(lm.model).post_norm:
        p.error(
            f"{args.model} is post-norm: its adapter's error is a vector per token, not a scalar along v; "
            "the error budget needs a pre-norm model (Llama, Mistral, Qwen, GPT-2, Gemma 1)"
        )
    rows = []
    for layer in args.layers:
        for k in args.strengths:
            vector = random_vector(lm, HookPoint(layer, "resid_post"), k, "resid", args.seed)
            rows += budget(lm, vector, args.lambdas, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error_budget.json").write_text(json.dumps(rows, indent=1))
    print(
        f"{'layer':>5} {'k':>4} {'λ':>5} {'mean|e|':>8} {'RMS e':>7} {'floor':>7} {'top-1':>7} {'KL ratio':>9} "
        f"{'noise top-1':>12} {'noise KL':>9}"
    )
    for r in rows:
        print(
            f"{r['layer']:>5} {r['strength']:>4g} {r['lambda']:>5g} {r['mean_abs_error']:>8.4f} {r['rms_error']:>7.4f} "
            f"{r['least_squares_floor_rms']:>7.4f} {r['top1']:>7.1%} {r['kl_ratio']:>9.4f} {r['noise_top1']:>12.1%} "
            f"{r['noise_kl_ratio']:>9.4f}"
        )


if __name__ == "__main__":
    main()
