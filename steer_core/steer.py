"""Reference steering with forward hooks: add a vector at its sites, or remove a direction everywhere; and the
portable adapter's low-rank updates as hooks, for fitting it without building a PEFT model.

Hooks are gated per request (steer_core.hooks), so concurrent requests on one model never see each other's
steering, and they exist only inside these context managers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from steer_core.hooks import HookSet, gated_hooks, retuple, untuple
from steer_core.sites import HookPoint, architecture_for, blocks, pretrained
from steer_core.vectors.vector import SteeringVector


class _SteeredPositions:
    """Which positions of the current forward pass are steered: not the leading BOS token (prefill only, when
    skipped), and only the batch rows asked for (`rows`), so one generate call can hold steered and unsteered rows."""

    def __init__(self, bos_token_id: int | None, rows: Sequence[int] | None = None) -> None:
        self.bos_token_id = bos_token_id
        self.rows = None if rows is None else sorted(set(rows))
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
        weight = self.weight(hidden)
        return hidden + delta if weight is None else hidden + delta * weight

    def weight(self, hidden: Tensor) -> Tensor | None:
        """[batch, seq, 1] with 1 where steered and 0 elsewhere, or None when every position is steered."""
        keep = self.keep if self.keep is not None and self.keep.shape == hidden.shape[:2] else None
        if self.rows is not None:
            if self.rows and self.rows[-1] >= hidden.shape[0]:
                raise ValueError(f"steered rows {self.rows} but the batch has {hidden.shape[0]} rows")
            in_rows = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            in_rows[self.rows] = True
            keep = in_rows if keep is None else keep.to(hidden.device) & in_rows
        return None if keep is None else keep.unsqueeze(-1).to(hidden.device, hidden.dtype)


def _add_at(hooks: HookSet, model: nn.Module, point: HookPoint, delta: Tensor, bos: _SteeredPositions) -> None:
    def add_to_output(_m: nn.Module, _args: Any, output: Any) -> Any:
        hidden = untuple(output)
        return retuple(output, bos.apply(hidden, delta.to(hidden.device, hidden.dtype)))

    def add_to_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (bos.apply(args[0], delta.to(args[0].device, args[0].dtype)), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": bos.apply(hidden, delta.to(hidden.device, hidden.dtype))}

    if point.site == "resid_pre" and point.layer == 0:
        hooks.pre(blocks(model)[0], add_to_input)
    elif point.site in ("resid_pre", "resid_post"):
        # resid_pre L is resid_post L-1: hooking the block output keeps output_hidden_states consistent.
        layer = point.layer - 1 if point.site == "resid_pre" else point.layer
        hooks.forward(blocks(model)[layer], add_to_output, prepend=True)
    else:
        layer, kind = point.writer()
        module = model.get_submodule(architecture_for(model).adds_to_residual_name(layer, kind))
        hooks.forward(module, add_to_output, prepend=True)


@contextmanager
def steering(
    model: nn.Module, vector: SteeringVector, *, skip_bos: bool = False, rows: Sequence[int] | None = None
) -> Iterator[None]:
    """Add `vector` at its sites on every position of every forward pass in this context, decode steps included.

    skip_bos leaves the leading BOS token alone (it is an attention sink with massive activations). Only forward
    passes of the top-level model (`model(...)`, `model.generate(...)`) are recognised for that.
    rows steers only those rows of each batch (all when None): a batched preview's steered side.
    """
    bos = _SteeredPositions(getattr(model.config, "bos_token_id", None) if skip_bos else None, rows)
    with gated_hooks() as hooks:
        if skip_bos:
            hooks.pre(model, bos.pre_hook)
        device = next(model.parameters()).device
        for point, v in vector.directions.items():
            _add_at(hooks, model, point, v.to(device), bos)
        yield


def project_out(x: Tensor, unit: Tensor) -> Tensor:
    """x minus its component along the unit vector `unit` (last dimension)."""
    return x - (x @ unit).unsqueeze(-1) * unit


@contextmanager
def ablation(model: nn.Module, direction: Tensor, *, include_embedding: bool = False) -> Iterator[None]:
    """Remove `direction` from everything each block writes into the residual stream (the ablate reference)."""
    arch = architecture_for(model)
    unit = (direction / direction.norm()).float()

    def remove(_m: nn.Module, _args: Any, output: Any) -> Any:
        hidden = untuple(output)
        return retuple(output, project_out(hidden, unit.to(hidden.device, hidden.dtype)))

    with gated_hooks() as hooks:
        for layer in range(len(blocks(model))):
            for kind in ("attn", "mlp"):
                hooks.forward(model.get_submodule(arch.adds_to_residual_name(layer, kind)), remove, prepend=True)
        if include_embedding:
            hooks.forward(pretrained(model).get_input_embeddings(), remove, prepend=True)
        yield


@contextmanager
def lowrank_updates(
    model: nn.Module,
    params: dict[str, tuple[Tensor, Tensor]],
    *,
    scaling: dict[str, float] | None = None,
    biases: dict[str, Tensor] | None = None,
    rows: Sequence[int] | None = None,
) -> Iterator[None]:
    """Add scaling·B(A·x) to each named writer's output, differentiably: a LoRA adapter applied as a server applies
    it (unmerged, beside the base weights), without PEFT.

    A is (d_in,) or (rank, d_in), B is (d_out,) or (d_out, rank): PEFT's lora_A and lora_B; scaling is
    lora_alpha / r (1 when not given); biases are lora_B's (PEFT's lora_bias). rows applies them to those batch rows
    only (all when None).
    """
    only = _SteeredPositions(None, rows)

    def make(a: Tensor, b: Tensor, scale: float, bias: Tensor | None) -> Any:
        a2 = a if a.dim() == 2 else a.unsqueeze(0)
        b2 = b if b.dim() == 2 else b.unsqueeze(1)

        def hook(_m: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x = args[0]
            # PEFT's order of operations (lora_B(lora_A(x)) * scaling), so a served row matches PEFT's output
            delta = (x @ a2.to(x.dtype).T) @ b2.to(output.dtype).T
            if bias is not None:
                delta = delta + bias.to(output.dtype)
            return only.apply(output, delta * scale if scale != 1 else delta)

        return hook

    with gated_hooks() as hooks:
        for name, (a, b) in params.items():
            scale, bias = (scaling or {}).get(name, 1.0), (biases or {}).get(name)
            hooks.forward(model.get_submodule(name), make(a, b, scale, bias), prepend=True)
        yield
