"""The next block's attention writer as a second candidate for a one-site vector on a pre-norm model.

A `resid_post L` vector's exact writer is `down_proj L`, whose input no linear read-out holds constant to better than
10-25% per token. Block L+1's `o_proj` reads an input that is far more constant (sink-attending heads output position
0's value everywhere), but it adds after attention L+1 has read the residual, so the hook's effect on attention L+1 is
missing; adding attention L+1's mean response to `v` into B makes up for the mean of it. A third candidate splits
the vector: `down_proj L` adds SPLIT × v, and `o_proj L+1` the rest and attention L+1's mean response to it. Which
comes closest to the hook depends on the layer and the vector (SmolLM2: the attention writer alone at layer 6 for a
random direction at 1×, 59.4% top-1 against 52.5%; the split for feature #676 at 0.5×, 93.7% against 92.7%; the MLP
writer alone for random directions at 15 and 22), so calibrate fits all three and keeps the one with the lowest
held-in KL (docs/fidelity.md, "The attention writer").
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from steer_core import corpus
from steer_core.activations import BlockCall, forward_until, recording, recording_block_calls, run_blocks
from steer_core.constants import DEFAULT_MAX_DOC_TOKENS
from steer_core.fit import passes
from steer_core.fit.position0 import InputFit
from steer_core.sites import HookPoint, architecture_for, num_layers
from steer_core.steer import steering
from steer_core.vectors.vector import SteeringVector

RESPONSE_TOKENS = 2048  # the mean response: 3 passes to block L+1, a third of the calibration pass at 16k tokens
SPLIT = 0.75  # the share of v the MLP writer keeps in the split candidate (0.9 and 0.5 measured no better)


@dataclass(frozen=True)
class NextWriter:
    """The candidate: block `layer`'s attention writer `module` adds (A·x) B with B = v + attention's mean response."""

    point: HookPoint
    module: str
    layer: int
    a: InputFit
    b: Tensor
    b_split: Tensor  # the split candidate's B: (1 - SPLIT) v + the mean response to it
    response_ratio: float  # |mean response| / |v|
    tokens: int  # of the mean response


def next_writer_site(model: nn.Module, vector: SteeringVector) -> tuple[HookPoint, str, int] | None:
    """(the vector's site, block L+1's attention writer, L+1) where that is a candidate: one site, written by an MLP
    on a pre-norm model, with a block after it. Post-norm writers add through a norm, so this B would not be v there."""
    if architecture_for(model).post_norm or len(vector.points) != 1:
        return None
    point = vector.points[0]
    layer, kind = point.writer()
    if kind != "mlp" or layer + 1 >= num_layers(model):
        return None
    return point, architecture_for(model).writer_name(layer + 1, "attn"), layer + 1


def next_writer(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    site: tuple[HookPoint, str, int],
    a: InputFit,
    *,
    tokens: int,
    max_doc_tokens: int,
    skip_bos: bool,
) -> NextWriter:
    """The candidate at `site` (next_writer_site), with its A fitted on the calibration pass's
    statistics of the attention writer's unsteered input: A on the full calibration text, not a slice of it (on 4k
    tokens A overfitted: SmolLM2 L22, random 4×, held-out top-1 74.6% against 78.0% on 16k)."""
    point, module, layer = site
    v = vector.directions[point].float().cpu()
    budget = min(tokens // 2, RESPONSE_TOKENS)
    response = mean_responses(model, tokenizer, vector, module, layer, budget, skip_bos, max_doc_tokens)
    full, rest = response[0.0], response[SPLIT]
    return NextWriter(point, module, layer, a, v + full, (1 - SPLIT) * v + rest, float(full.norm() / v.norm()),
                      budget)  # fmt: skip


def mean_responses(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    module: str,
    layer: int,
    tokens: int,
    skip_bos: bool,
    max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS,
    already: tuple[float, ...] = (0.0, SPLIT),
) -> dict[float, Tensor]:
    """For each share s in `already`, the mean over every position after the first of what `module` outputs
    differently with the hook on than with s × v added in its place (s = 0: the unsteered model)."""
    device = next(model.parameters()).device
    total = {s: torch.zeros(vector.d_model, dtype=torch.float64) for s in already}
    n = 0
    first = vector.first_block
    # The blocks before the steering's first are the same at every share: run them once, in the unsteered pass, and
    # replay only blocks first .. layer for the others (skip_bos needs the model's own input ids: full passes).
    replay = not skip_bos and 0 < first <= layer
    # Documents as long as calibration's: attention's response to v changes along the sequence
    for batch in corpus.batches(tokenizer, "calibration", tokens, max_doc_tokens=max_doc_tokens, by_length=True):
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        keep = mask.bool()
        keep[:, 0] = False  # position 0 is a sink with massive norms; B is one vector for the rest
        outs: dict[float, Tensor] = {}
        calls: list[BlockCall] = []
        # The unsteered pass (and the blocks before the steering) is the same for every cell of a map at this layer.
        text = (module, layer, first, replay, *passes.text_key(model, ids, mask))
        unsteered = passes.recall("responses", text) if 0.0 in already else None
        if unsteered is not None:
            outs[0.0], calls = unsteered
        for share in (*already, 1.0):
            if share in outs:
                continue
            got: list[Tensor] = []
            with (
                recording(model, [module], lambda _n, y: got.append(y), what="output"),  # noqa: B023 (used at once)
                steering(model, vector.scaled(share), skip_bos=skip_bos),
            ):
                if replay and calls:
                    run_blocks(model, first, calls)
                else:
                    with recording_block_calls(model, first) if replay else nullcontext() as recorded:
                        forward_until(model, layer, input_ids=ids, attention_mask=mask)
                    calls = (recorded or [])[: layer - first + 1]
            outs[share] = got[0][keep].double().cpu()
            if share == 0.0:
                passes.keep("responses", text, (outs[0.0], calls))
        for s in already:
            total[s] += (outs[1.0] - outs[s]).sum(0)
        n += len(outs[1.0])
    return {s: (t / max(n, 1)).float() for s, t in total.items()}
