"""Reference steering with forward hooks, safe for many concurrent requests on one model.

PyTorch hooks are global to a module, but Gradio serves many requests from one loaded model. So every hook here is
*gated*: it acts only in the execution context (thread + contextvars) that entered its context manager, and does
nothing for any other request running through the same module at the same time. Hooks exist only inside the
context managers and are removed on exit, on exceptions and on cancelled generations.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from steer_core.sites import HookPoint, architecture_for, blocks
from steer_core.vector import SteeringVector

_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("steer_core_active", default=frozenset())
_IDS = itertools.count(1)


def untuple(output: Any) -> Tensor:
    """HF blocks return a tensor or a tuple whose first element is the hidden states."""
    return output[0] if isinstance(output, tuple) else output


def _retuple(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def is_active(hook_id: int) -> bool:
    return hook_id in _ACTIVE.get()


@contextmanager
def _activated(hook_id: int) -> Iterator[None]:
    _ACTIVE.set(_ACTIVE.get() | {hook_id})
    try:
        yield
    finally:
        # Not a token reset: a generator may resume this in another context; a stale id is harmless once the
        # hooks are gone, and ids are never reused.
        _ACTIVE.set(_ACTIVE.get() - {hook_id})


class _BosMask:
    """Which positions of the current forward pass hold the leading BOS token (prefill only)."""

    def __init__(self, bos_token_id: int | None) -> None:
        self.bos_token_id = bos_token_id
        self.keep: Tensor | None = None

    def pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.keep = None
        if ids is None or self.bos_token_id is None:
            return
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[-1] != ids.shape[-1]:
            return  # a KV-cached decode step: its tokens are never the leading BOS
        mask = torch.ones_like(ids) if mask is None else mask
        first = mask.long().argmax(dim=-1)  # the first real token of each row (left padding allowed)
        rows = torch.arange(ids.shape[0], device=ids.device)
        is_bos = ids[rows, first] == self.bos_token_id
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[rows[is_bos], first[is_bos]] = False
        self.keep = keep

    def apply(self, hidden: Tensor, delta: Tensor) -> Tensor:
        if self.keep is not None and self.keep.shape == hidden.shape[:2]:
            return hidden + delta * self.keep.unsqueeze(-1).to(hidden.dtype)
        return hidden + delta


def _add_hooks(
    model: nn.Module, point: HookPoint, delta: Tensor, gate: int, bos: _BosMask
) -> list[torch.utils.hooks.RemovableHandle]:
    def add_to_output(_m: nn.Module, _args: Any, output: Any) -> Any:
        if not is_active(gate):
            return None
        hidden = untuple(output)
        return _retuple(output, bos.apply(hidden, delta.to(hidden.dtype)))

    def add_to_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not is_active(gate):
            return None
        if args:
            return (bos.apply(args[0], delta.to(args[0].dtype)), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": bos.apply(hidden, delta.to(hidden.dtype))}

    # prepend=True: transformers records output_hidden_states with its own forward hooks, which must see the
    # steered output, as every later module does.
    if point.site == "resid_pre" and point.layer == 0:
        return [blocks(model)[0].register_forward_pre_hook(add_to_input, with_kwargs=True)]
    if point.site in ("resid_pre", "resid_post"):
        layer = point.layer - 1 if point.site == "resid_pre" else point.layer
        return [blocks(model)[layer].register_forward_hook(add_to_output, prepend=True)]
    layer, kind = point.writer()
    module = model.get_submodule(architecture_for(model).adds_to_residual_name(layer, kind))
    return [module.register_forward_hook(add_to_output, prepend=True)]


@contextmanager
def steering(model: nn.Module, vector: SteeringVector, *, skip_bos: bool = False) -> Iterator[None]:
    """Add `vector` at its sites on every position of every forward pass in this context, decode steps included.

    skip_bos leaves the leading BOS token alone (it is an attention sink with massive activations). Only forward
    passes of the top-level model (`model(...)`, `model.generate(...)`) are recognised for that.
    """
    gate = next(_IDS)
    param = next(model.parameters())
    bos = _BosMask(getattr(model.config, "bos_token_id", None) if skip_bos else None)
    handles = []
    try:
        if skip_bos:
            handles.append(model.register_forward_pre_hook(_gated(gate, bos.pre_hook), with_kwargs=True))
        for point, v in vector.directions.items():
            handles += _add_hooks(model, point, v.to(param.device), gate, bos)
        with _activated(gate):
            yield
    finally:
        for h in handles:
            h.remove()


def _gated(gate: int, fn: Callable[..., Any]) -> Callable[..., Any]:
    def hook(*args: Any) -> Any:
        return fn(*args) if is_active(gate) else None

    return hook


def project_out(x: Tensor, unit: Tensor) -> Tensor:
    """x minus its component along the unit vector `unit` (last dimension)."""
    return x - (x @ unit).unsqueeze(-1) * unit


@contextmanager
def ablation(model: nn.Module, direction: Tensor, *, include_embedding: bool = False) -> Iterator[None]:
    """Remove `direction` from everything each block writes into the residual stream (the ablate reference)."""
    gate = next(_IDS)
    arch = architecture_for(model)
    unit = (direction / direction.norm()).to(next(model.parameters()))

    def remove(_m: nn.Module, _args: Any, output: Any) -> Any:
        if not is_active(gate):
            return None
        hidden = untuple(output)
        return _retuple(output, project_out(hidden, unit.to(hidden.dtype)))

    handles = []
    try:
        for layer in range(len(blocks(model))):
            for kind in ("attn", "mlp"):
                module = model.get_submodule(arch.adds_to_residual_name(layer, kind))  # type: ignore[arg-type]
                handles.append(module.register_forward_hook(remove, prepend=True))
        if include_embedding:
            handles.append(model.get_input_embeddings().register_forward_hook(remove, prepend=True))
        with _activated(gate):
            yield
    finally:
        for h in handles:
            h.remove()
