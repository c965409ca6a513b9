"""Reading activations: gated recording hooks, early stopping, and activation statistics."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from steer_core import corpus
from steer_core.hooks import gated_hooks, untuple
from steer_core.sites import HookPoint, architecture_for, blocks, pretrained

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


BlockCall = tuple[tuple[Any, ...], dict[str, Any]]


@contextmanager
def recording_block_calls(model: nn.Module, first: int) -> Iterator[list[BlockCall]]:
    """Record the (args, kwargs) each block from `first` on is called with, during one forward pass in this context.

    With them, forward_from() reruns only the blocks a change at layer `first` can affect: the earlier blocks'
    output is the same for the unsteered, steered and adapted passes, so computing it once is enough.
    """
    calls: list[BlockCall] = []
    with gated_hooks() as hooks:
        for block in blocks(model)[first:]:
            hooks.pre(block, lambda _m, args, kwargs: calls.append((args, kwargs)))
        yield calls


def run_blocks(model: nn.Module, first: int, calls: list[BlockCall]) -> Tensor:
    """The hidden state after blocks `first` .. `first + len(calls) - 1`, replaying their recorded calls."""
    layers = blocks(model)[first : first + len(calls)]
    if not calls or len(calls) != len(layers):
        raise ValueError(f"recorded {len(calls)} block calls, but the model has {len(layers)} blocks from {first}")
    args, kwargs = calls[0]
    hidden = args[0] if args else kwargs["hidden_states"]
    for block, (recorded_args, recorded) in zip(layers, calls, strict=True):
        # A KV cache recorded with the call (as a keyword or, in GPT-2, positionally) would grow with every replay.
        args = tuple(None if isinstance(a, Cache) else a for a in recorded_args)
        kwargs = {k: None if isinstance(v, Cache) else v for k, v in recorded.items()}
        if args:
            hidden = untuple(block(hidden, *args[1:], **kwargs))
        else:
            hidden = untuple(block(**{**kwargs, "hidden_states": hidden}))
    return hidden


def forward_from(model: nn.Module, first: int, calls: list[BlockCall], positions: Tensor | None = None) -> Tensor:
    """Logits of `model` run from block `first` on, replaying recorded block calls (hooks and adapters on those
    blocks act as in a full pass). `model` may be another instance of the same architecture, e.g. a PEFT copy.
    `positions` (a mask over batch × sequence): the logits of those positions only, in order; the LM head is a fifth
    of a small model's compute, and a measurement reads only the answers."""
    if len(calls) != len(blocks(model)[first:]):
        raise ValueError(f"recorded {len(calls)} block calls, but the model has {len(blocks(model)[first:])} blocks "
                         f"from {first}")  # fmt: skip
    hidden = run_blocks(model, first, calls)
    hf = pretrained(model)
    if positions is not None:
        hidden = hidden[positions]
    logits = hf.get_output_embeddings()(model.get_submodule(architecture_for(model).final_norm)(hidden))
    cap = getattr(hf.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


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


# A token whose norm is this many times the median is an attention sink. Position 0 is one (~50x); plain text makes
# more where its first token is not a natural sink (position 1 on SmolLM2, up to 130x). No feature should have to
# explain one: labels that counted them showed such a token as the top context of 4,443 of 7,370 features.
SINK_NORM = 10.0


@torch.no_grad()
def not_sinks(acts: Tensor, limit: float) -> Tensor:
    """Bool[Tensor, "n"]: which rows have a norm of at most `limit` (SINK_NORM x a median norm)."""
    # in parts: 3M x 576 in float32 would be 7 GB
    return torch.cat([part.float().norm(dim=-1) for part in acts.split(1 << 18)]) <= limit


def text_activations(
    model: nn.Module,
    tokenizer: Any,
    point: HookPoint,
    unit: Literal["resid", "writer"],
    texts: Sequence[str],
    *,
    max_tokens_per_text: int = 128,
    batch_size: int = 8,
    drop_sinks: bool = False,
) -> tuple[Tensor, list[list[int]], list[tuple[int, int]]]:
    """Activations at `point` for every token of `texts` but position 0 (the attention sink), and with `drop_sinks`
    but any other sink: a norm over SINK_NORM x the site's median norm on the shipped text (`median_norm`), a fixed
    limit as in training, so a two-token prompt's sink is still one.

    Returns Float[Tensor, "n d_model"], each text's token ids, and (text index, position) for each row.
    """
    name = site_module_name(model, point, unit)
    ids = [tokenizer(t, add_special_tokens=True).input_ids[:max_tokens_per_text] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    rows: list[Tensor] = []
    where: list[tuple[int, int]] = []
    captured: list[Tensor] = []
    with recording(model, [name], lambda _n, out: captured.append(out.float().cpu()), what="output"):
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            batch = corpus.collate([(r, torch.tensor(seq, dtype=torch.long)) for r, seq in enumerate(chunk)], pad)
            forward_until(
                model,
                point.writer()[0],
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
            )
            out = captured.pop()
            for r, seq in enumerate(chunk):
                rows.append(out[r, 1 : len(seq)])
                where += [(start + r, pos) for pos in range(1, len(seq))]
    acts = torch.cat(rows)
    if drop_sinks and len(acts):
        keep = not_sinks(acts, SINK_NORM * median_norm(model, tokenizer, point, unit))
        acts, where = acts[keep], [w for w, k in zip(where, keep.tolist(), strict=True) if k]
    return acts, ids, where


# model -> (point, unit, tokens) -> median norm. Weak keys: a model that is dropped takes its norms with it.
_MEDIAN_NORMS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[HookPoint, str, int], float]] = (
    weakref.WeakKeyDictionary()
)


def median_norm(
    model: nn.Module, tokenizer: Any, point: HookPoint, unit: Literal["resid", "writer"], *, tokens: int = 2048
) -> float:
    """Median per-token L2 norm of the residual stream (or of the writer's addition) at `point`, on held-in text.

    Remembered per model: it depends only on the weights (never changed in place here) and the shipped text, and
    every strength in a resid or writer unit asks for it again (2 s on SmolLM2 at layer 15 on a CPU).
    """
    key = (point, unit, tokens)
    known = _MEDIAN_NORMS.setdefault(model, {})
    if key not in known:
        acts = site_activations(model, tokenizer, point, unit, split="calibration", tokens=tokens)
        # quantile, not median(): the midpoint for an even count, as statistics.median gives
        known[key] = float(torch.quantile(acts.norm(dim=-1).double(), 0.5))
    return known[key]
