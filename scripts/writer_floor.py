"""Which module can serve a `resid_post L` vector, measured: each writer's floor, and what an adapter on it gives.

A rank-1 LoRA B(A·x) serves a constant vector only as well as A·x is constant. This script measures, on a pre-norm
model, for each candidate writer of a `resid_post L` vector v:

- the floor: the smallest held-out RMS(A·x − 1) of a ridge fit on the calibration text (calibration and held-out
  tokens kept apart), for `down_proj L` (today's writer), `o_proj L` and `o_proj L+1`;
- the heads that attend to position 0 (the sink) from every later position: their mean weight there and its spread,
  per layer: a head that puts all its weight on position 0 outputs position 0's value vector everywhere, which is
  what makes the attention writer's input nearly constant;
- the adapter each candidate makes, measured against the hook on verify's held-out text (top-1, KL ratio):
  `down_proj L` as exported today; `o_proj L+1` with B = v (attention L+1 then does not read v, which the hook lets
  it); `o_proj L+1` with B = v + the mean of attention L+1's response to v (a fitted correction); `o_proj L` with
  B = v (MLP L then reads v, which the hook does not let it); and both `down_proj L` and `o_proj L+1` with B = v and
  their A fitted jointly.

    .venv/bin/python -m scripts.writer_floor --layers 15 --vectors random:1 sae:676:0.5

A script that prints numbers (and writes them to --out), not a test.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scripts.benchmark import random_vector
from scripts.error_budget import calibration_batches, writer_inputs
from steer_core.activations import recording
from steer_core.check.servability import HeldOut
from steer_core.fit.calibrate import calibrate
from steer_core.fit.refine import cosine_decay, train
from steer_core.model import LoadedModel, keep_freed_memory, load_model
from steer_core.sites import HookPoint, architecture_for
from steer_core.steer import steering
from steer_core.vectors.recipe import VectorRecipe
from steer_core.vectors.vector import SteeringVector

RIDGES = (1e-6, 1e-4, 1e-2, 1.0, 1e2)


def ridge_fit(x: Tensor, ridges: Iterable[float] = RIDGES) -> tuple[Tensor, float, float]:
    """A with A·x ≈ 1 by ridge regression, the penalty chosen on alternate rows: (A on all rows, penalty, validation
    RMS of A·x − 1). Rows are standardised by their RMS norm so one penalty grid fits every writer."""
    x = x.double()
    scale = float(x.pow(2).mean() ** 0.5)
    xs = x / scale
    ones = torch.ones(len(xs), dtype=torch.float64)
    train, val = xs[0::2], xs[1::2]
    best = (float("inf"), 0.0)
    for r in ridges:
        a = torch.linalg.solve(train.T @ train + r * len(train) * torch.eye(xs.shape[1], dtype=torch.float64),
                               train.T @ ones[0::2])  # fmt: skip
        rms = float(((val @ a - 1) ** 2).mean() ** 0.5)
        best = min(best, (rms, r))
    rms, r = best
    a = torch.linalg.solve(xs.T @ xs + r * len(xs) * torch.eye(xs.shape[1], dtype=torch.float64), xs.T @ ones)
    return a / scale, r, rms


def heldout_rms(a: Tensor, x: Tensor) -> float:
    return float(((x.double() @ a - 1) ** 2).mean() ** 0.5)


def sink_heads(lm: LoadedModel, batches: list[tuple[Tensor, Tensor]], threshold: float = 0.9) -> dict[int, list]:
    """Per layer, the heads whose mean attention weight on position 0 (from positions ≥ 1) is above `threshold`:
    (head, mean weight, standard deviation over positions)."""
    lm.model.config._attn_implementation = "eager"  # the weights themselves, not a fused kernel's
    sums: dict[int, list[Tensor]] = {}
    with torch.no_grad():
        for ids, mask in batches:
            out = lm.model(input_ids=ids, attention_mask=mask, output_attentions=True)
            keep = mask.bool()[:, 1:]
            for layer, att in enumerate(out.attentions):
                w0 = att[:, :, 1:, 0].float()  # (batch, heads, positions ≥ 1)
                sums.setdefault(layer, []).append(w0.permute(0, 2, 1)[keep])  # (tokens, heads)
    found = {}
    for layer, parts in sums.items():
        w = torch.cat(parts)
        mean, std = w.mean(0), w.std(0)
        found[layer] = [(h, round(float(mean[h]), 3), round(float(std[h]), 3)) for h in range(len(mean))
                        if mean[h] > threshold]  # fmt: skip
    return found


def attention_response(
    lm: LoadedModel, vector: SteeringVector, module: str, batches: list, already: float = 0.0
) -> Tensor:
    """The mean over tokens of what an attention writer adds differently when v is in its input (the hook's case)
    than when `already` × v is (0: the unsteered model)."""
    diffs: list[Tensor] = []
    outs: dict[float, list[Tensor]] = {already: [], 1.0: []}
    for scale in outs:
        with torch.no_grad():
            for ids, mask in batches:
                got: list[Tensor] = []
                with (
                    recording(lm.model, [module], lambda _n, y, got=got: got.append(y), what="output"),
                    steering(lm.model, vector.scaled(scale)),
                ):
                    lm.model(input_ids=ids, attention_mask=mask)
                outs[scale].append(got[0][mask.bool()].double())
    for base, hook in zip(outs[already], outs[1.0], strict=True):
        diffs.append(hook - base)
    return torch.cat(diffs).mean(0)


def measure(lm: LoadedModel, vector: SteeringVector, args: argparse.Namespace) -> dict[str, Any]:
    point = vector.points[0]
    layer = point.layer
    v = vector.directions[point].float()
    arch = architecture_for(lm.model)
    down, o_here, o_next = (arch.writer_name(layer, "mlp"), arch.writer_name(layer, "attn"),
                            arch.writer_name(layer + 1, "attn"))  # fmt: skip
    cal = list(calibration_batches(lm, args.calibration_tokens))
    held = HeldOut(lm, vector, args.eval_tokens)
    x_down = writer_inputs(lm, down, layer, cal)
    z_here = writer_inputs(lm, o_here, layer, cal)
    z_next = writer_inputs(lm, o_next, layer + 1, cal)
    hx_down = writer_inputs(lm, down, layer, held.batches)
    hz_here = writer_inputs(lm, o_here, layer, held.batches)
    hz_next = writer_inputs(lm, o_next, layer + 1, held.batches)
    row: dict[str, Any] = {"layer": layer, "vector": vector.provenance.get("name")}
    fits = {}
    for name, (x, hx) in {"down_proj L": (x_down, hx_down), "o_proj L": (z_here, hz_here),
                          "o_proj L+1": (z_next, hz_next)}.items():  # fmt: skip
        a, _ridge, _val = ridge_fit(x)
        fits[name] = a
        row[f"floor {name}"] = round(heldout_rms(a, hx), 4)
    joint_a, _r, _val = ridge_fit(torch.cat([x_down, z_next], 1))
    row["floor down_proj L + o_proj L+1"] = round(heldout_rms(joint_a, torch.cat([hx_down, hz_next], 1)), 4)
    if args.floors_only:
        return row

    def lora(module: str, a: Tensor, b: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        return {module: (a.float().to(lm.device), b.float().to(lm.device))}

    exported = calibrate(lm.model, lm.tokenizer, vector, tokens=args.calibration_tokens, writer="own")
    row["adapter down_proj L (exported today)"] = held.measure(
        {f.module: (f.A.float().to(lm.device), f.B.float().to(lm.device)) for f in exported.fits}
    )
    row["adapter o_proj L+1, B = v"] = held.measure(lora(o_next, fits["o_proj L+1"], v))
    response = attention_response(lm, vector, o_next, cal[: max(1, len(cal) // 4)]).float()
    row["attention L+1 response to v, |mean| / |v|"] = round(float(response.norm() / v.norm()), 4)
    row["adapter o_proj L+1, B = v + mean response"] = held.measure(lora(o_next, fits["o_proj L+1"], v + response))
    row["adapter o_proj L, B = v"] = held.measure(lora(o_here, fits["o_proj L"], v))
    for share in args.split:  # down_proj L adds `share` × v as exported; o_proj L+1 the rest and what attention
        # L+1 would have answered to it
        rest = attention_response(lm, vector, o_next, cal[: max(1, len(cal) // 4)], already=share).float()
        split = {f.module: (f.A.float().to(lm.device), share * f.B.float().to(lm.device)) for f in exported.fits}
        row[f"adapter split {share:g} down_proj L / o_proj L+1 + response"] = held.measure(
            split | lora(o_next, fits["o_proj L+1"], (1 - share) * v + rest)
        )
    d = x_down.shape[1]
    row["adapter down_proj L + o_proj L+1, joint A"] = held.measure(
        lora(down, joint_a[:d], v) | lora(o_next, joint_a[d:], v)
    )
    if args.refine_steps:  # both trained end to end on KL(hook ‖ adapter), the same budget each (steer_core.fit.refine)
        starts = {
            "down_proj L": {f.module: (f.A.float(), f.B.float()) for f in exported.fits},
            "o_proj L+1 from B = v + mean response": lora(o_next, fits["o_proj L+1"], v + response),
        }
        for name, start in starts.items():
            params = {m: (a.clone().to(lm.device).requires_grad_(True), b.clone().to(lm.device).requires_grad_(True))
                      for m, (a, b) in start.items()}  # fmt: skip
            groups = [{"params": [t], "lr": args.lr * float(t.detach().abs().mean())} for pr in params.values()
                      for t in pr]  # fmt: skip
            optimizer = torch.optim.Adam(groups)
            schedule = cosine_decay(optimizer, args.refine_steps)
            train(lm.model, lm.tokenizer, vector, params, optimizer, steps=args.refine_steps,
                  on_step=lambda _s, _kl, schedule=schedule: schedule.step())  # fmt: skip
            trained = {m: (a.detach(), b.detach()) for m, (a, b) in params.items()}
            row[f"adapter {name}, refined {args.refine_steps} steps"] = held.measure(trained)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layers", type=int, nargs="+", default=[15])
    p.add_argument("--vectors", nargs="+", default=["random:1"], help="random:K (K × residual norm) or sae:F:S")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--sinks", action="store_true", help="also list the sink-attending heads of every layer")
    p.add_argument("--sink-threshold", type=float, default=0.5, help="mean attention on position 0 that makes a sink")
    p.add_argument("--split", type=float, nargs="*", default=[0.75, 0.5],
                   help="shares of v that down_proj L keeps in the split adapters")  # fmt: skip
    p.add_argument("--refine-steps", type=int, default=0, help="also train both starts end to end, this many steps")
    p.add_argument("--lr", type=float, default=0.01, help="refinement learning rate (the pre-norm one of fit.refine)")
    p.add_argument("--floors-only", action="store_true", help="only the floors (and --sinks): any model, Gemma too")
    p.add_argument("--out", default="artifacts/writer-floor.json")
    args = p.parse_args()
    keep_freed_memory()
    lm = load_model(args.model)
    if architecture_for(lm.model).post_norm and not args.floors_only:
        p.error(f"{args.model} is post-norm: a writer's addition passes its norm, so A·x = 1 is not the target there")
    rows = []
    for layer in args.layers:
        for spec in args.vectors:
            kind, *rest = spec.split(":")
            if kind == "random":
                vector = random_vector(lm, HookPoint(layer, "resid_post"), float(rest[0]), "resid", 0)
            else:
                vector = VectorRecipe("sae", (float(rest[1]),), "resid", features=(int(rest[0]),)).build(lm)
                if vector.points[0].layer != layer:
                    continue
            vector.provenance["name"] = spec
            row = measure(lm, vector, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out: dict[str, Any] = {"rows": rows}
    if args.sinks:
        held = HeldOut(lm, vector, args.eval_tokens)
        out["sink_heads"] = sink_heads(lm, held.batches, args.sink_threshold)
        for layer, heads in out["sink_heads"].items():
            if heads:
                print(f"layer {layer}: " + ", ".join(f"head {h} {m:.3f} ± {s:.3f}" for h, m, s in heads))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
