"""Reading activations: gated recording hooks, early stopping, and activation statistics."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from steer_core import corpus
from steer_core.sites import HookPoint, architecture_for, blocks
from steer_core.steer import _IDS, _activated, is_active, untuple

Capture = Callable[[str, Tensor], None]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the last needed layer has run."""


@contextmanager
def recording(model: nn.Module, names: list[str], on: Capture, *, what: Literal["input", "output"]) -> Iterator[None]:
    """Call on(name, tensor) with each named module's input (first positional) or output, in this context only.

    The hooks return None, so they never change what the model computes.
    """
    gate = next(_IDS)
    handles = []

    def make(name: str) -> Callable[..., None]:
        if what == "input":

            def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if is_active(gate):
                    on(name, args[0] if args else kwargs["hidden_states"])

            return pre

        def post(_m: nn.Module, _args: Any, output: Any) -> None:
            if is_active(gate):
                on(name, untuple(output))

        return post

    try:
        for name in names:
            module = model.get_submodule(name)
            if what == "input":
                handles.append(module.register_forward_pre_hook(make(name), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(make(name)))
        with _activated(gate):
            yield
    finally:
        for h in handles:
            h.remove()


def forward_until(model: nn.Module, last_layer: int, **inputs: Tensor) -> None:
    """Run the model only up to block `last_layer`: calibration needs no later layers and no logits."""
    gate = next(_IDS)

    def stop(_m: nn.Module, _args: Any, _output: Any) -> None:
        if is_active(gate):
            raise _StopForward

    handle = blocks(model)[last_layer].register_forward_hook(stop)
    try:
        with _activated(gate), torch.no_grad():
            model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()


def site_module_name(model: nn.Module, point: HookPoint, unit: Literal["resid", "writer"]) -> str:
    """The module whose output is the residual at `point` ("resid") or what its writer adds ("writer")."""
    arch = architecture_for(model)
    layer, kind = point.writer()
    if unit == "writer":
        return arch.adds_to_residual_name(layer, kind)
    return f"{arch.layers_path}.{layer}"


def median_norm(
    model: nn.Module, tokenizer: Any, point: HookPoint, unit: Literal["resid", "writer"], *, tokens: int = 2048
) -> float:
    """Median per-token L2 norm of the residual stream (or of the writer's addition) at `point`, on held-in text.

    The first position is excluded: it is an attention sink with massive norms, not a typical token.
    """
    name = site_module_name(model, point, unit)
    norms: list[float] = []
    keep: list[Tensor] = []

    def on(_name: str, out: Tensor) -> None:
        norms.extend(out.float().norm(dim=-1)[keep[-1]].tolist())

    device = next(model.parameters()).device
    with recording(model, [name], on, what="output"):
        for batch in corpus.batches(tokenizer, "calibration", tokens):
            mask = batch.attention_mask.bool().clone()
            mask[:, 0] = False
            keep.append(mask.to(device))
            forward_until(
                model,
                point.writer()[0],
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
            )
    return statistics.median(norms)
