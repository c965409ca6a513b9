"""Choosing among candidate adapters by how close each comes to the hook on held-in text, KL(hook ‖ adapter).

The closed form fits A·x to a per-token target at one writer; it cannot see what the rest of the model does with the
error. Where calibration has several candidates (position 0's weight, the post-norm writers' split or fitted shares),
the model's own next-token distributions on a few held-in tokens decide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steer_core import corpus
from steer_core.activations import recording_block_calls
from steer_core.divergence import kl_per_token
from steer_core.fit import passes
from steer_core.fit.position0 import choose_first_weight
from steer_core.steer import lowrank_updates, steering
from steer_core.vectors.vector import SteeringVector

SELECT_TOKENS = 384  # 6 texts of 64 tokens: the candidates' KL differ 3-8×; this costs ~3 s at SmolLM2 L15
# ~700 answer tokens: enough to order the writers as held-out text does on the four vectors measured (composite)
UNSEEN_TOKENS = 1024
Params = dict[str, tuple[Tensor, Tensor]]  # module name -> (A, B), as lowrank_updates takes them
K = TypeVar("K")


@dataclass(frozen=True)
class Selection:
    first_weight: float
    first_weight_kl: dict[float, float]  # first weight -> held-in KL, split shares; empty when there was no choice
    shares: str | None  # "split" or "fitted"; None where no shares were fitted
    shares_kl: dict[str, float]  # "split" / "fitted" -> held-in KL at the chosen first weight


def select(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    split: dict[float, Params],
    fitted: dict[float, Params],
    *,
    first_layer: int,
    skip_bos: bool,
    tokens: int = SELECT_TOKENS,
) -> Selection:
    """The first weight (position0.choose_first_weight) among the `split` candidates, then whether the `fitted`
    shares (if any) beat the split ones at that weight. `first_layer`: the first block the candidates adapt."""
    kl = held_in_kl(model, tokenizer, vector, split, first_layer, skip_bos, tokens) if len(split) > 1 or fitted else {}
    chosen = choose_first_weight(kl) if len(split) > 1 else next(iter(split))
    if not fitted:
        return Selection(chosen, kl, None, {})
    # fit_shares' metric is a first-order, per-dimension stand-in for what the later layers do with the error, and it
    # ignores that the attention share also passes through the layer's MLP: on Gemma-3-270M it helps at layers 1
    # and 9 and hurts at 5. So the fitted shares are used only where the model agrees.
    shares_kl = {
        "split": kl[chosen],
        "fitted": held_in_kl(model, tokenizer, vector, {chosen: fitted[chosen]}, first_layer, skip_bos, tokens)[chosen],
    }
    use = "fitted" if shares_kl["fitted"] < shares_kl["split"] else "split"
    return Selection(chosen, kl, use, shares_kl)


def held_in_kl(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    candidates: dict[K, Params],
    first_layer: int,
    skip_bos: bool,
    tokens: int = SELECT_TOKENS,
) -> dict[K, float]:
    """Mean KL(hook ‖ adapter) of each candidate on the first `tokens` calibration tokens.

    The candidates differ only from the first adapted block on, so the blocks before it run once (as in verify);
    skip_bos needs the model-level input ids, so it runs full passes instead.
    """
    # Every real token, prompt positions too: scoring 64-token windows on answers alone left a chat a handful of
    # tokens, too few to choose by.
    batches = corpus.batches(tokenizer, "calibration", tokens, max_doc_tokens=64, by_length=True)
    return _mean_kl(model, vector, candidates, first_layer, skip_bos, batches, lambda b: b.attention_mask.bool())


def unseen_kl(
    model: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    candidates: dict[K, Params],
    first_layer: int,
    skip_bos: bool,
    *,
    after: int,
    max_doc_tokens: int,
    tokens: int = UNSEEN_TOKENS,
) -> dict[K, float]:
    """Mean KL(hook ‖ adapter) of each candidate on the answers of calibration documents that the fits, made on the
    first `after` calibration tokens, did not see: for candidates with different fitted parts (composite), whose
    held-in KL favours the one that fits its own text best (SmolLM2 L22, random 4×: block 23's attention writer
    0.0117 against the MLP writer's 0.0188 held in, 0.0700 against 0.0447 here, 0.0050 against 0.0041 held out)."""
    batches = corpus.batches_after(tokenizer, "calibration", after, tokens, max_doc_tokens=max_doc_tokens)
    return _mean_kl(model, vector, candidates, first_layer, skip_bos, batches, lambda b: b.measured.clone())


def _mean_kl(
    model: nn.Module,
    vector: SteeringVector,
    candidates: dict[K, Params],
    first_layer: int,
    skip_bos: bool,
    batches: Iterable[corpus.Batch],
    positions: Callable[[corpus.Batch], Tensor],
) -> dict[K, float]:
    device = next(model.parameters()).device
    replay = not skip_bos and first_layer > 0
    # The blocks before the first adapted one are the same for the hook and every candidate, and (where the steering
    # changes nothing before it either) for every cell of a map at this layer: passes.shared_across_cells.
    shared = replay and vector.first_block >= first_layer
    total = dict.fromkeys(candidates, 0.0)
    n = 0
    with torch.no_grad():
        for batch in batches:
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            keep = positions(batch).to(device)
            if not keep.any():
                continue
            text = (first_layer, *passes.text_key(model, ids, mask))
            calls = passes.recall("prefixes", text) if shared else None
            with steering(model, vector, skip_bos=skip_bos):
                if calls is not None:
                    hook_logits = passes.replayed_logits_at(model, first_layer, calls, keep)
                else:
                    with recording_block_calls(model, first_layer) as calls:
                        hook_logits = passes.logits_at(model, keep, input_ids=ids, attention_mask=mask)
                    if shared:
                        passes.keep("prefixes", text, passes.first_input_only(calls))
            hook = F.log_softmax(hook_logits.float(), -1)
            hook_p = hook.exp()
            for key, params in candidates.items():
                on_device = {m: (a.to(device), b.to(device)) for m, (a, b) in params.items()}
                with lowrank_updates(model, on_device):
                    logits = (
                        passes.replayed_logits_at(model, first_layer, calls, keep)
                        if replay
                        else passes.logits_at(model, keep, input_ids=ids, attention_mask=mask)
                    )
                adapted = F.log_softmax(logits.float(), -1)
                total[key] += float(kl_per_token(hook, adapted, hook_p).sum())
            n += int(keep.sum())
    return {k: t / max(n, 1) for k, t in total.items()}
