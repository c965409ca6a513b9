"""Reading activations: gated recording hooks, early stopping, and activation statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from steer_core import corpus
from steer_core.hooks import gated_hooks, untuple
from steer_core.sites import HookPoint, architecture_for, blocks

Capture = Callable[[str, Tensor], None]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the last needed layer has run."""


@contextmanager
def recording(model: nn.Module, names: list[str], on: Capture, *, what: Literal["input", "output"]) -> Iterator[None]:
    """Call on(name, tensor) with each named module's input (first positional) or output, in this context only.

    The hooks return None, so they never change what the model computes.
    """

    def make(name: str) -> Callable[..., None]:
        if what == "input":
            return lambda _m, args, kwargs: on(name, args[0] if args else kwargs["hidden_states"])
        return lambda _m, _args, output: on(name, untuple(output))

    with gated_hooks() as hooks:
        for name in names:
            module = model.get_submodule(name)
            if what == "input":
                hooks.pre(module, make(name))
            else:
                hooks.forward(module, make(name))
        yield


def forward_until(model: nn.Module, last_layer: int, **inputs: Tensor) -> None:
    """Run the model only up to block `last_layer`: calibration needs no later layers and no logits."""

    def stop(_m: nn.Module, _args: Any, _output: Any) -> None:
        raise _StopForward

    try:
        with gated_hooks() as hooks, torch.no_grad():
            hooks.forward(blocks(model)[last_layer], stop)
            model(**inputs, use_cache=False)
    except _StopForward:
        pass


def site_module_name(model: nn.Module, point: HookPoint, unit: Literal["resid", "writer"]) -> str:
    """The module whose output is the residual at `point` ("resid") or what its writer adds ("writer")."""
    arch = architecture_for(model)
    layer, kind = point.writer()
    if unit == "writer":
        return arch.adds_to_residual_name(layer, kind)
    return f"{arch.layers_path}.{layer}"


def site_activations(
    model: nn.Module,
    tokenizer: Any,
    point: HookPoint,
    unit: Literal["resid", "writer"],
    *,
    split: corpus.Split,
    tokens: int = 2048,
) -> Tensor:
    """Float[Tensor, "n d_model"]: the residual stream (or the writer's addition) at `point` on the shipped text.

    The first position of each text is left out: it is an attention sink with massive norms, not a typical token.
    """
    name = site_module_name(model, point, unit)
    rows: list[Tensor] = []
    keep: list[Tensor] = []

    def on(_name: str, out: Tensor) -> None:
        rows.append(out.float()[keep[-1].to(out.device)].cpu())

    device = next(model.parameters()).device
    with recording(model, [name], on, what="output"):
        for batch in corpus.batches(tokenizer, split, tokens):
            mask = batch.attention_mask.bool().clone()
            mask[:, 0] = False
            keep.append(mask)
            ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
            forward_until(model, point.writer()[0], input_ids=ids, attention_mask=attention)
    return torch.cat(rows)


def median_norm(
    model: nn.Module, tokenizer: Any, point: HookPoint, unit: Literal["resid", "writer"], *, tokens: int = 2048
) -> float:
    """Median per-token L2 norm of the residual stream (or of the writer's addition) at `point`, on held-in text."""
    acts = site_activations(model, tokenizer, point, unit, split="calibration", tokens=tokens)
    # quantile, not median(): the midpoint for an even count, as statistics.median gives
    return float(torch.quantile(acts.norm(dim=-1).double(), 0.5))
