"""Reference steering with forward hooks: add a vector at its sites, or remove a direction everywhere; and the
portable adapter's low-rank updates as hooks, for fitting it without building a PEFT model.

Hooks are gated per request (steer_core.hooks), so concurrent requests on one model never see each other's
steering, and they exist only inside these context managers.

`steering` and `lowrank_updates` steer one batch row set each, with hooks of their own; `batch_steering` gives every
row of a batch its own steering (a continuous batch of many requests) with one hook per module, however many rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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


def _site(model: nn.Module, point: HookPoint) -> tuple[str, nn.Module]:
    """Where a vector at `point` is added: ("pre", block 0) for the embedding output, else ("forward", the module
    whose output is the site)."""
    if point.site == "resid_pre" and point.layer == 0:
        return "pre", blocks(model)[0]
    if point.site in ("resid_pre", "resid_post"):
        # resid_pre L is resid_post L-1: hooking the block output keeps output_hidden_states consistent.
        return "forward", blocks(model)[point.layer - 1 if point.site == "resid_pre" else point.layer]
    layer, kind = point.writer()
    return "forward", model.get_submodule(architecture_for(model).adds_to_residual_name(layer, kind))


def _add_at(hooks: HookSet, model: nn.Module, point: HookPoint, delta: Tensor, bos: _SteeredPositions) -> None:
    def add_to_output(_m: nn.Module, _args: Any, output: Any) -> Any:
        hidden = untuple(output)
        return retuple(output, bos.apply(hidden, delta.to(hidden.device, hidden.dtype)))

    def add_to_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (bos.apply(args[0], delta.to(args[0].device, args[0].dtype)), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": bos.apply(hidden, delta.to(hidden.device, hidden.dtype))}

    kind, module = _site(model, point)
    if kind == "pre":
        hooks.pre(module, add_to_input)
    else:
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


# Per-row steering of a whole batch, one hook per module


@dataclass(frozen=True, eq=False)
class LowRank:
    """One adapter's low-rank updates, as `lowrank_updates` takes them: {module name: (A, B)}, scaling, biases."""

    params: dict[str, tuple[Tensor, Tensor]]
    scaling: dict[str, float] = field(default_factory=dict)
    biases: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class RowSteering:
    """One batch row's steering in `batch_steering`: a vector (skip_bos as in `steering`), low-rank updates, or both
    (at a module they share, the vector is added first)."""

    vector: SteeringVector | None = None
    skip_bos: bool = False
    lowrank: LowRank | None = None


_Key = tuple[str, int]  # ("pre" | "forward", id(module))
_Update = tuple[Tensor, Tensor, float, Tensor | None]  # A (rank, d_in), B (d_out, rank), scaling, bias


@dataclass
class _Resolved:
    """A row's steering resolved on a model: its deltas per site, in the order its own hooks would add them, and its
    low-rank update per module."""

    modules: dict[_Key, nn.Module] = field(default_factory=dict)
    adds: dict[_Key, list[Tensor]] = field(default_factory=dict)
    updates: dict[_Key, _Update] = field(default_factory=dict)


class _Site:
    """The one hook of a module for the whole batch: additive deltas as [batch, d] tables (slot k holds each row's
    k-th delta at this module, and -0.0, which adds nothing to any float, where a row has none), and low-rank updates,
    rows that share an adapter together."""

    def __init__(self, owner: BatchSteering, kind: str) -> None:
        self.owner = owner
        self.kind = kind
        self.slots: list[list[Tensor | None]] = []  # slot -> row -> delta
        self.groups: list[tuple[list[int], _Update]] = []  # rows sharing one update
        self._tables: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        self._masks: dict[tuple[torch.device, torch.dtype], list[Tensor | None]] = {}  # [batch, 1.., 1] per group

    def set(self, slots: list[list[Tensor | None]], groups: list[tuple[list[int], _Update]]) -> None:
        self.slots, self.groups = slots, groups
        self._tables.clear()
        self._masks.clear()

    def tables(self, like: Tensor) -> list[Tensor]:
        key = (like.device, like.dtype)
        if key not in self._tables:
            tables = []
            for slot in self.slots:
                table = torch.full((len(slot), like.shape[-1]), -0.0, device=like.device, dtype=like.dtype)
                for row, delta in enumerate(slot):
                    if delta is not None:
                        table[row] = delta.to(like.device, like.dtype)
                tables.append(table)
            self._tables[key] = tables
        return self._tables[key]

    def add(self, hidden: Tensor) -> Tensor:
        """hidden + each row's deltas; at a skipped BOS, delta · 0 as `_SteeredPositions.apply` adds it."""
        self.owner.check_batch(hidden)
        weight = self.owner.weight(hidden)
        for table in self.tables(hidden):
            delta = table.unsqueeze(1)  # [batch, 1, d]
            hidden = hidden + delta if weight is None else hidden + delta * weight
        return hidden

    def update(self, x: Tensor, output: Tensor) -> Tensor:
        """output + scaling·B(A·x) on each group's rows, with today's arithmetic: the update computed over the whole
        batch, as `lowrank_updates` computes it (a matmul's last bits can depend on how many rows it has), then added
        times a 0/1 row mask, as `_SteeredPositions.apply` adds it. Rank-1 updates are small next to the block."""
        self.owner.check_batch(output)
        key = (output.device, output.dtype)
        if key not in self._masks:
            masks: list[Tensor | None] = []
            for rows, _ in self.groups:
                row_mask = torch.zeros(
                    output.shape[0], *[1] * (output.dim() - 1), device=output.device, dtype=output.dtype
                )
                row_mask[rows] = 1
                masks.append(None if len(rows) == output.shape[0] else row_mask)
            self._masks[key] = masks
        for (_, (a, b, scale, bias)), mask in zip(self.groups, self._masks[key], strict=True):
            # PEFT's order of operations (lora_B(lora_A(x)) * scaling), as in lowrank_updates
            delta = (x @ a.to(x.dtype).T) @ b.to(output.dtype).T
            if bias is not None:
                delta = delta + bias.to(output.dtype)
            delta = delta * scale if scale != 1 else delta
            output = output + delta if mask is None else output + delta * mask
        return output

    def forward_hook(self, _m: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not (self.slots or self.groups):
            return None
        hidden = untuple(output)
        if self.slots:
            hidden = self.add(hidden)
        if self.groups:
            hidden = self.update(args[0], hidden)
        return retuple(output, hidden)

    def pre_hook(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.slots:
            return None
        if args:
            return (self.add(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.add(kwargs["hidden_states"])}


class BatchSteering:
    """Every row of a batch with its own steering, one hook per module whatever the number of rows: the hooks of
    `steering` and `lowrank_updates`, with a row's delta, or an exact zero, in every row. `assign` changes the rows'
    steering in place (rows joining or leaving a continuous batch); a module's hook, once there, stays until the
    context exits and does nothing while no row steers at it. Only made by `batch_steering`."""

    def __init__(self, model: nn.Module, hooks: HookSet) -> None:
        self.model = model
        self._hooks = hooks
        self._device = next(model.parameters()).device
        self._bos_id: int | None = getattr(model.config, "bos_token_id", None)
        self._sites: dict[_Key, _Site] = {}
        self._resolved: dict[int, tuple[RowSteering, _Resolved]] = {}
        self._skip: Tensor | None = None  # [batch] bool: the rows whose vector skips the leading BOS
        self._keep: Tensor | None = None  # [batch, seq] of the current forward pass, when some row skips a BOS
        self.rows: tuple[RowSteering | None, ...] = ()
        hooks.pre(model, self._model_pre_hook)

    def check(self, row: RowSteering | None) -> None:
        """Raise what `assign` would raise for this row (a module or layer the model does not have)."""
        if row is not None:
            self._resolve(row)

    def assign(self, rows: Sequence[RowSteering | None]) -> None:
        """Row i of every later forward pass gets rows[i]'s steering (None: none); the batch must have len(rows)
        rows."""
        resolved = [None if r is None else self._resolve(r) for r in rows]
        n = len(rows)
        modules: dict[_Key, nn.Module] = {}
        slots: dict[_Key, list[list[Tensor | None]]] = {}
        groups: dict[_Key, dict[tuple[int, int, float, int], tuple[list[int], _Update]]] = {}
        for i, res in enumerate(resolved):
            if res is None:
                continue
            modules.update(res.modules)
            for key, deltas in res.adds.items():
                table = slots.setdefault(key, [])
                table.extend([None] * n for _ in range(len(deltas) - len(table)))
                for k, delta in enumerate(deltas):
                    table[k][i] = delta
            for key, update in res.updates.items():
                a, b, scale, bias = update
                same = (id(a), id(b), scale, id(bias))  # rows of one adapter share its tensors
                groups.setdefault(key, {}).setdefault(same, ([], update))[0].append(i)
        for key, site in self._sites.items():
            if key not in modules:
                site.set([], [])
        for key, module in modules.items():
            if key not in self._sites:
                site = self._sites[key] = _Site(self, key[0])
                if key[0] == "pre":
                    self._hooks.pre(module, site.pre_hook)
                else:
                    self._hooks.forward(module, site.forward_hook, prepend=True)
            self._sites[key].set(slots.get(key, []), list(groups.get(key, {}).values()))
        keep = {id(r): self._resolved[id(r)] for r in rows if r is not None}
        self._resolved = keep
        self.rows = tuple(rows)
        skips = [r is not None and r.skip_bos and r.vector is not None for r in rows]
        self._skip = torch.tensor(skips, device=self._device) if any(skips) and self._bos_id is not None else None

    def _resolve(self, row: RowSteering) -> _Resolved:
        cached = self._resolved.get(id(row))
        if cached is not None and cached[0] is row:
            return cached[1]
        res = _Resolved()
        if row.vector is not None:
            for point, v in row.vector.directions.items():
                kind, module = _site(self.model, point)
                key = (kind, id(module))
                res.modules[key] = module
                res.adds.setdefault(key, []).append(v.to(self._device))
            for key, deltas in res.adds.items():
                if key[0] == "forward":
                    deltas.reverse()  # steering() prepends each hook: the last point's runs first
        if row.lowrank is not None:
            lr = row.lowrank
            for name, (a, b) in lr.params.items():
                module = self.model.get_submodule(name)
                key = ("forward", id(module))
                res.modules[key] = module
                a2 = a if a.dim() == 2 else a.unsqueeze(0)
                b2 = b if b.dim() == 2 else b.unsqueeze(1)
                res.updates[key] = (a2, b2, lr.scaling.get(name, 1.0), lr.biases.get(name))
        self._resolved[id(row)] = (row, res)
        return res

    def check_batch(self, hidden: Tensor) -> None:
        if hidden.shape[0] != len(self.rows):
            raise ValueError(f"the batch steering holds {len(self.rows)} rows but the batch has {hidden.shape[0]}")

    def weight(self, hidden: Tensor) -> Tensor | None:
        """[batch, seq, 1]: 0 at a skipped BOS, 1 elsewhere; None when no position of this pass is skipped."""
        keep = self._keep
        if keep is None or keep.shape != hidden.shape[:2]:
            return None
        return keep.unsqueeze(-1).to(hidden.device, hidden.dtype)

    def _model_pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """As `_SteeredPositions.pre_hook`, for the rows that skip the BOS only."""
        self._keep = None
        ids = kwargs.get("input_ids", args[0] if args else None)
        skip = self._skip
        if ids is None or skip is None or ids.shape[0] != skip.shape[0]:
            return
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[-1] != ids.shape[-1]:
            return  # a KV-cached decode step: its tokens are never the leading BOS
        mask = torch.ones_like(ids) if mask is None else mask
        first = mask.long().argmax(dim=-1)
        rows = torch.arange(ids.shape[0], device=ids.device)
        skipped = (ids[rows, first] == self._bos_id) & skip.to(ids.device)
        if not bool(skipped.any()):
            return
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[rows[skipped], first[skipped]] = False
        self._keep = keep


@contextmanager
def batch_steering(model: nn.Module, rows: Sequence[RowSteering | None] = ()) -> Iterator[BatchSteering]:
    """Row i of each forward pass in this context steered by rows[i] (None: not steered), with one hook per module
    that any row steers at; `assign` on the yielded object changes the rows. Each row gets the bits that `steering`
    or `lowrank_updates` with rows=[i] would give it."""
    with gated_hooks() as hooks:
        batch = BatchSteering(model, hooks)
        batch.assign(rows)
        yield batch
