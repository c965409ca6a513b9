"""Optional end-to-end refinement: train the rank-1 A and B on KL(hook ‖ adapter), starting from the closed form.

The closed form makes A·x match a per-token target at one writer; it cannot see what the rest of the model does with
the error. Training A and B on the model's own next-token distributions can (docs/math.md, "Post-norm models"; what
it bought is in docs/fidelity.md). The model stays frozen.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steer_core import corpus
from steer_core.divergence import kl_per_token
from steer_core.fit.calibrate import Calibration, Progress, WriterFit, balance
from steer_core.sites import architecture_for
from steer_core.steer import lowrank_updates, steering
from steer_core.vectors.vector import SteeringVector


def cosine_decay(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate from its start to 0 over `steps` (half a cosine); step it once per optimizer step."""
    steps = max(steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    params: dict[str, tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    skip_bos: bool = False,
    batch_size: int = 2,
    max_doc_tokens: int = 64,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """`steps` optimizer steps on mean KL(hook ‖ adapter) over held-in text, training `params` (module name ->
    (A, B), see `lowrank_updates`) in place; returns the KL of each step. Passes over the held-in text again when
    `steps` outlast it (121k tokens on SmolLM2 at 64 per text)."""
    device = next(model.parameters()).device
    losses: list[float] = []
    while len(losses) < steps:
        tokens = (steps - len(losses)) * batch_size * max_doc_tokens
        before = len(losses)
        for batch in corpus.batches(
            tokenizer, "calibration", tokens, max_doc_tokens=max_doc_tokens, batch_size=batch_size
        ):
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            keep = mask.bool()  # prompt positions too: their keys and values shape the answers
            with torch.no_grad(), steering(model, vector, skip_bos=skip_bos):
                target = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[keep].float(), -1)
            with lowrank_updates(model, params):
                pred = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[keep].float(), -1)
            kl = kl_per_token(target, pred).mean()
            optimizer.zero_grad(set_to_none=True)
            kl.backward()
            optimizer.step()
            losses.append(float(kl.detach()))
            if on_step:
                on_step(len(losses), losses[-1])
            if len(losses) >= steps:
                break
        if len(losses) == before:
            raise ValueError("the held-in text yielded no batch to train on")
    return losses


# Relative learning rates (Adam's step over each tensor's mean |coordinate|): pre-norm, the closed form is near the
# optimum and small steps keep it; post-norm, B must move far from v to get past the norm (docs/fidelity.md, "What
# each idea bought").
LR_PRE_NORM = 0.01
LR_POST_NORM = 0.1


# What the CLI and the app refine by default, by where the model runs: on a CPU, post-norm models only (4 minutes buy
# Gemma most; pre-norm gains are 2-6 points, which a 60-second export cannot pay); on a GPU, every architecture, to
# where the curves flatten (docs/fidelity.md, "What each idea bought"; docs/refine-curve-gpu*.jsonl).
DEFAULT_STEPS_POST_NORM = 60
DEFAULT_STEPS_GPU = 300
DEFAULT_BATCH_CPU = 2
DEFAULT_BATCH_GPU = 8


@dataclass(frozen=True)
class RefineDefaults:
    steps: int
    batch_size: int  # texts of up to 64 tokens per step


def defaults_for(device_type: str, post_norm: bool) -> RefineDefaults:
    """DEFAULT_STEPS_GPU steps of DEFAULT_BATCH_GPU texts on CUDA (where they were measured); elsewhere, CPU and
    Apple's MPS included, DEFAULT_STEPS_POST_NORM steps of DEFAULT_BATCH_CPU texts on post-norm models, else none."""
    if device_type == "cuda":
        return RefineDefaults(DEFAULT_STEPS_GPU, DEFAULT_BATCH_GPU)
    return RefineDefaults(DEFAULT_STEPS_POST_NORM if post_norm else 0, DEFAULT_BATCH_CPU)


def defaults(model: nn.Module) -> RefineDefaults:
    """The refinement an export gets unless told, for where `model` runs (defaults_for)."""
    return defaults_for(next(model.parameters()).device.type, architecture_for(model).post_norm)


def default_steps(model: nn.Module) -> int:
    return defaults(model).steps


def default_lr(calibration: Calibration) -> float:
    """LR_POST_NORM where any writer passes through a post-norm (its target is rms(Wx)), else LR_PRE_NORM."""
    return LR_POST_NORM if any(f.target != "one" for f in calibration.fits) else LR_PRE_NORM


def refine(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    calibration: Calibration,
    *,
    steps: int,
    lr: float | None = None,
    batch_size: int | None = None,
    max_doc_tokens: int = 64,
    progress: Progress | None = None,
) -> Calibration:
    """`steps` Adam steps on mean KL(hook ‖ adapter) over held-in text, the learning rate decayed to 0 on a cosine;
    returns the calibration with new A and B. `lr` and `batch_size` default to default_lr and `defaults`."""
    if steps <= 0:
        return calibration
    if lr is None:
        lr = default_lr(calibration)
    if batch_size is None:
        batch_size = defaults(model).batch_size
    device = next(model.parameters()).device
    params = {
        f.module: (
            f.A.clone().float().to(device).requires_grad_(True),
            f.B.clone().float().to(device).requires_grad_(True),
        )
        for f in calibration.fits
    }
    # Adam moves each coordinate by about lr per step, so scale lr to each tensor's typical coordinate.
    groups = [{"params": [t], "lr": lr * float(t.detach().abs().mean())} for pair in params.values() for t in pair]
    start = time.perf_counter()

    optimizer = torch.optim.Adam(groups)
    schedule = cosine_decay(optimizer, steps)

    def report(step: int, kl: float) -> None:
        schedule.step()
        if progress:
            progress(step / steps, f"refining A and B: step {step}/{steps}, KL {kl:.4g}")

    losses = train(
        model,
        tokenizer,
        vector,
        params,
        optimizer,
        steps=steps,
        skip_bos=calibration.skip_bos,
        batch_size=batch_size,
        max_doc_tokens=max_doc_tokens,
        on_step=report,
    )
    fits: list[WriterFit] = []
    for f in calibration.fits:
        a, b = (t.detach().cpu() for t in params[f.module])
        a, b = balance(a, b)
        fits.append(dataclasses.replace(f, A=a, B=b, refined_steps=steps))
    return dataclasses.replace(
        calibration,
        fits=fits,
        seconds=calibration.seconds + time.perf_counter() - start,
        refine={
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "kl_first": losses[0],
            "kl_last": sum(losses[-10:]) / len(losses[-10:]),
        },
    )
