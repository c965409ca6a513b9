"""Measure an adapter folder against the hook steering it stands for, on held-out text. Never skipped."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor, nn

from steer_core import corpus
from steer_core.activations import recording, recording_block_calls
from steer_core.adapter.build import check_tensors
from steer_core.adapter.folder import AdapterFolder, read_folder
from steer_core.adapter.record import SteeringRecord
from steer_core.constants import (
    DEFAULT_GREEDY_PROMPTS,
    DEFAULT_GREEDY_TOKENS,
    DEFAULT_MAX_DOC_TOKENS,
    DEFAULT_VERIFY_TOKENS,
)
from steer_core.divergence import kl_per_token
from steer_core.fit import passes
from steer_core.fit.ridge import steered_positions, writer_target
from steer_core.generate import left_pad
from steer_core.sites import pretrained
from steer_core.steer import ablation, steering
from steer_core.vectors.vector import SteeringVector


@dataclass(frozen=True)
class FidelityReport:
    """How far the adapter is from hook steering. KLs are mean nats per token; top-1 is a fraction."""

    mode: str
    tokens: int
    top1_agreement: float
    kl_hook_adapter: float
    kl_hook_base: float
    kl_ratio: float  # kl_hook_adapter / kl_hook_base: 0 is perfect, 1 is no better than not steering
    top1_hook_vs_base: float  # how much the steering changes at all
    greedy_prefix_mean: float  # greedy tokens generated before the adapter first differs from the hook
    greedy_full_match: float  # fraction of prompts whose whole greedy continuation matched
    greedy_tokens: int
    greedy_prompts: int
    fit_abs_error: dict[str, float] = field(default_factory=dict)  # mean |A·x − target| / mean |target|, per module
    kl_by_position: list[float] = field(default_factory=list)
    max_abs_logit_diff: float = 0.0
    # The same figures per input format (chat, system, multiturn, plain) and per source of the held-out text: a
    # served adapter meets them all, and the overall mean hides the worst.
    by_format: dict[str, dict[str, float]] = field(default_factory=dict)
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    # Behaviour: of the log-probability the hook steering adds to the tokens it promotes most, the share the adapter
    # adds too (1 = all of the effect, 0 = none, above 1 = overshoot); see `_Effect`.
    effect_kept: float = float("nan")
    promoted_tokens: list[str] = field(default_factory=list)
    # The dtype the model ran in while measured. In bfloat16 (the app on a GPU) the hook and the adapter each round
    # differently, so agreement is measured against a noisier reference than in float32 (docs/space.md has the sizes).
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"worst_format": self.worst_format, **asdict(self)}  # the worst first, where a reader starts

    @property
    def worst_format(self) -> str | None:
        """The format with the lowest top-1 agreement (None when verified on one format only)."""
        if len(self.by_format) < 2:
            return None
        return min(self.by_format, key=lambda f: self.by_format[f]["top1_agreement"])

    def summary(self) -> str:
        overall = (
            f"top-1 agreement {self.top1_agreement:.1%}, KL(hook‖adapter) {self.kl_hook_adapter:.4g} vs "
            f"KL(hook‖base) {self.kl_hook_base:.4g} (ratio {self.kl_ratio:.3g}), greedy agreement "
            f"{self.greedy_prefix_mean:.1f}/{self.greedy_tokens} tokens, effect kept {self.effect_kept:.0%}, on "
            f"{self.tokens} held-out tokens"
        )
        worst = self.worst_format
        if worst is None:
            return overall
        w = self.by_format[worst]
        formats = ", ".join(f"{f} {g['top1_agreement']:.1%}" for f, g in self.by_format.items())
        return (
            f"worst format {worst}: top-1 agreement {w['top1_agreement']:.1%}, KL ratio {w['kl_ratio']:.3g}; "
            f"all formats: {overall}; top-1 by format: {formats}"
        )


class _Tally:
    """Token counts and sums per group (a format, a source), for the figures of FidelityReport."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, group: str, agree: Tensor, agree_base: Tensor, kl_a: Tensor, kl_b: Tensor) -> None:
        if len(kl_a) == 0:
            return  # a document cut off before its answer
        s = self.sums.setdefault(group, [0.0] * 5)
        for i, value in enumerate((len(kl_a), agree.sum(), agree_base.sum(), kl_a.sum(), kl_b.sum())):
            s[i] += float(value)  # type: ignore[arg-type]  # an int or a 0-d tensor

    def figures(self) -> dict[str, dict[str, float]]:
        out = {}
        for group, (n, agree, agree_base, kl_a, kl_b) in self.sums.items():
            out[group] = {
                "tokens": int(n),
                "top1_agreement": agree / n,
                "kl_hook_adapter": kl_a / n,
                "kl_hook_base": kl_b / n,
                "kl_ratio": kl_a / kl_b if kl_b > 0 else float("nan"),
                "top1_hook_vs_base": agree_base / n,
            }
        return out


class _Effect:
    """How much of the steering's effect on the output the adapter keeps, as a log-probability gain.

    The tokens the hook promotes most (its mean log-probability gain over the base model, at measured positions) are
    chosen on one half of the batches and measured on the other, and the other way round, so tokens that a few
    positions happen to favour do not inflate the hook's figure. effect_kept = the adapter's summed gain on them ÷
    the hook's. It is the steering's *behaviour*: a 97% top-1 adapter that misses the steered tokens scores low.
    """

    def __init__(self, k: int = 20) -> None:
        self.k = k
        self.hook: list[Tensor | float] = [0.0, 0.0]  # per half: summed gain per vocabulary entry
        self.adapter: list[Tensor | float] = [0.0, 0.0]
        self.batches = 0

    def add(self, base: Tensor, hook: Tensor, adapter: Tensor) -> None:
        half = self.batches % 2
        self.hook[half] = self.hook[half] + (hook - base).sum(0).double().cpu()
        self.adapter[half] = self.adapter[half] + (adapter - base).sum(0).double().cpu()
        self.batches += 1

    def kept(self) -> tuple[float, Tensor]:
        """(effect kept, the promoted tokens chosen on all the text)."""
        halves = [(0, 1), (1, 0)] if self.batches > 1 else [(0, 0)]
        hook_gain = adapter_gain = 0.0
        for pick, measure in halves:
            top = torch.as_tensor(self.hook[pick]).topk(self.k).indices
            hook_gain += float(torch.as_tensor(self.hook[measure])[top].sum())
            adapter_gain += float(torch.as_tensor(self.adapter[measure])[top].sum())
        everything = torch.as_tensor(self.hook[0]) + torch.as_tensor(self.hook[1])
        kept = adapter_gain / hook_gain if hook_gain > 0 else float("nan")
        return kept, everything.topk(self.k).indices


def reference(model: nn.Module, vector: SteeringVector, record: SteeringRecord) -> AbstractContextManager[None]:
    """The hook intervention an adapter folder stands for."""
    if record.mode == "ablate":
        return ablation(model, next(iter(vector.directions.values())), include_embedding=False)
    return steering(model, vector, skip_bos=record.skip_bos)


def read_adapter_files(folder: Path, base_model: str | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config.json, the weights) of an adapter folder, read and checked by `read_folder(...).checked()`: an
    error names the damaged file and why (missing, unreadable, truncated, non-finite, a rank its config does not
    declare, or, given `base_model`, made for another base model)."""
    files = read_folder(folder).checked(base_model)
    return files.config, files.tensors


def load_peft(model: nn.Module, folder: Path, base_model: str | None = None) -> nn.Module:
    """A PeftModel on a private copy of `model`, so requests using the base model never see the adapter."""
    return _peft_of(model, read_folder(folder).checked(base_model))


def _peft_of(model: nn.Module, files: AdapterFolder) -> nn.Module:
    """load_peft for a folder already read and checked."""
    base = copy.deepcopy(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(base, str(files.path))
    except RuntimeError as err:  # PEFT's size mismatch: the weights do not fit this model's modules
        first = str(err).strip().splitlines()[-1].strip()
        raise ValueError(f"{files.weights_path} does not fit this model: {first}") from err
    peft_model.eval()
    _check_loaded(peft_model, files.tensors)
    return peft_model


def _check_loaded(peft_model: nn.Module, saved: dict[str, Tensor]) -> None:
    """Every saved tensor must be in the PeftModel, unchanged: proves the files round-trip through PEFT."""
    check_tensors(saved)
    state = peft_model.state_dict()
    for key, tensor in saved.items():
        loaded_key = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        if loaded_key not in state:
            raise ValueError(f"PEFT did not load {key}: the adapter's config does not target that module")
        if not torch.equal(state[loaded_key].float().cpu(), tensor.float()):
            raise ValueError(f"PEFT loaded {key} with different values")


@contextmanager
def _fit_error(
    model: nn.Module, record: SteeringRecord, saved: dict[str, Tensor], out: dict[str, list[float]]
) -> Iterator[dict[str, Tensor]]:
    """Record |A·x − target| at each fitted writer during the hook-steered pass, or the unsteered one for a writer
    that replaces a hook upstream of it (composite; portable mode only)."""
    state: dict[str, Tensor] = {}
    fits = record.fits if record.mode == "portable" else ()
    if not fits:
        yield state
        return
    # The rank-1 update is the first rank (a rank-padded adapter's others are zero).
    a = {f.module: saved[f"base_model.model.{f.module}.lora_A.weight"][0] for f in fits}
    b_norm = {f.module: float(saved[f"base_model.model.{f.module}.lora_B.weight"][:, 0].norm()) for f in fits}
    v_norm = {f.module: f.b_unscaled_norm or b_norm[f.module] for f in fits}
    layer_kind = {f.module: (f.writer_layer, f.writer_kind) for f in fits}
    unsteered = {f.module for f in fits if not f.reads_steered}

    def on(name: str, x: Tensor) -> None:
        keep = state["base_mask" if name in unsteered else "mask"].to(x.device)
        xs = x[keep].float()
        # A was rescaled against B (balance); undo that to compare A·x with its target.
        ax = (xs @ a[name].to(xs)) * b_norm[name] / v_norm[name]
        target = writer_target(model, name, *layer_kind[name], xs, state["steered"].to(x.device)[keep])
        out.setdefault(name, [0.0, 0.0])
        out[name][0] += float((ax - target).abs().sum())
        out[name][1] += float(target.abs().sum())

    with recording(model, list(a), on, what="input"):
        yield state


def heldout_batches(model: nn.Module, tokenizer: Any, tokens: int) -> Iterator[corpus.Batch]:
    """The held-out text verification measures on, in batches whose vocabulary-wide logits stay near 150M floats."""
    vocab = int(pretrained(model).config.get_text_config().vocab_size)
    batch_size = max(1, min(8, int(1.5e8 // (vocab * DEFAULT_MAX_DOC_TOKENS))))
    return corpus.batches(
        tokenizer, "heldout", tokens, max_doc_tokens=DEFAULT_MAX_DOC_TOKENS, batch_size=batch_size, by_length=True
    )


class _Totals:
    """What verify adds up over the held-out batches: agreement and KL over every measured token, per format and
    source, per position, the behaviour figure and the largest logit difference."""

    def __init__(self) -> None:
        self.n = self.agree = self.agree_base = 0
        self.kl_ha = self.kl_hb = self.max_diff = 0.0
        self.pos_sum = torch.zeros(DEFAULT_MAX_DOC_TOKENS, dtype=torch.float64)
        self.pos_n = torch.zeros(DEFAULT_MAX_DOC_TOKENS, dtype=torch.float64)
        self.by_format, self.by_source = _Tally(), _Tally()
        self.effect = _Effect()

    def add(self, batch: corpus.Batch, keep: Tensor, base: Tensor, hook: Tensor, adapt: Tensor) -> None:
        """One batch's log-probabilities at its measured positions `keep`: unsteered, hook-steered, adapter."""
        self.effect.add(base, hook, adapt)
        hook_p = hook.exp()
        kl_a = kl_per_token(hook, adapt, hook_p)
        kl_b = kl_per_token(hook, base, hook_p)
        top_h = hook.argmax(-1)
        same_a, same_b = top_h == adapt.argmax(-1), top_h == base.argmax(-1)
        self.agree += int(same_a.sum())
        self.agree_base += int(same_b.sum())
        rows = keep.nonzero()[:, 0].cpu()
        for tally, tags in ((self.by_format, batch.formats), (self.by_source, batch.sources)):
            for tag in dict.fromkeys(tags):  # in order of appearance: a set's order changes with the hash seed
                sel = torch.isin(rows, torch.tensor([r for r, t in enumerate(tags) if t == tag])).to(kl_a.device)
                tally.add(tag, same_a[sel], same_b[sel], kl_a[sel], kl_b[sel])
        self.kl_ha += float(kl_a.sum())
        self.kl_hb += float(kl_b.sum())
        self.n += len(kl_a)
        positions = keep.nonzero()[:, 1].cpu()
        inside = positions < DEFAULT_MAX_DOC_TOKENS
        self.pos_sum.index_add_(0, positions[inside], kl_a.double().cpu()[inside])
        self.pos_n.index_add_(0, positions[inside], torch.ones(int(inside.sum()), dtype=torch.float64))
        self.max_diff = max(self.max_diff, float((hook - adapt).abs().max()))


def verify(
    model: nn.Module,
    tokenizer: Any,
    folder: str | Path,
    *,
    tokens: int = DEFAULT_VERIFY_TOKENS,
    greedy_prompts: int = DEFAULT_GREEDY_PROMPTS,
    greedy_tokens: int = DEFAULT_GREEDY_TOKENS,
    peft_model: nn.Module | None = None,
    base_model: str | None = None,
) -> FidelityReport:
    """Compare the adapter (reloaded with PeftModel.from_pretrained) with hook steering on held-out text.
    `base_model`: the loaded model's id, checked against the one the adapter's config names."""
    files = read_folder(folder, ours=True).checked(base_model)
    record, vector = files.steering()
    saved = files.tensors
    adapted = peft_model if peft_model is not None else _peft_of(model, files)
    totals = _Totals()
    fit_acc: dict[str, list[float]] = {}
    with torch.no_grad(), _fit_error(model, record, saved, fit_acc) as fit_state:
        for batch, keep, passes in _three_passes(model, adapted, tokenizer, vector, record, saved, tokens, fit_state):
            totals.add(batch, keep, *passes)
    if totals.n == 0:
        raise ValueError(
            f"{tokens} held-out tokens held no answer tokens to measure; raise the verification tokens "
            "(--verify-tokens on export, --tokens on verify)"
        )
    greedy = _greedy_agreement(model, adapted, tokenizer, vector, record, greedy_prompts, greedy_tokens)
    return _report(model, tokenizer, record, totals, fit_acc, greedy, greedy_prompts, greedy_tokens)


def _three_passes(
    model: nn.Module,
    adapted: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    record: SteeringRecord,
    saved: dict[str, Tensor],
    tokens: int,
    fit_state: dict[str, Tensor],
) -> Iterator[tuple[corpus.Batch, Tensor, tuple[Tensor, Tensor, Tensor]]]:
    """Each held-out batch, its measured positions, and the log-probabilities there unsteered, hook-steered and
    through the adapter. Where the adapter changes nothing before block `first`, the steered passes replay the
    unsteered one's inputs to that block instead of recomputing them. `fit_state` tells _fit_error which pass the
    writers' inputs come from."""
    device = next(model.parameters()).device
    bos_id = getattr(model.config, "bos_token_id", None)
    first = _first_changed_block(vector, record, saved) if isinstance(adapted, PeftModel) else None
    for batch in heldout_batches(model, tokenizer, tokens):
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        keep = batch.measured.to(device)  # generated positions: a chat's answers, all of a plain text
        if not keep.any():
            continue  # documents cut off before their answers
        fit_state["mask"] = torch.zeros_like(keep)
        fit_state["base_mask"] = mask.bool()  # the unsteered pass, for writers that read it
        fit_state["steered"] = steered_positions(ids, record.skip_bos, bos_id)
        # The LM head at measured tokens only (a fifth of a pass; prompts and padding need none). The three passes put
        # the same rows through the head in the same shape, so an exact adapter still matches the hook to float noise.
        if first is None:
            base_logits = passes.logits_at(model, keep, input_ids=ids, attention_mask=mask)
        else:
            with recording_block_calls(model, first) as calls:
                base_logits = passes.logits_at(model, keep, input_ids=ids, attention_mask=mask)
        base = F.log_softmax(base_logits.float(), -1)
        fit_state["mask"] = mask.bool()  # the fit: every real token, on the hook-steered pass only
        fit_state["base_mask"] = torch.zeros_like(keep)
        with reference(model, vector, record):
            hook_logits = (
                passes.logits_at(model, keep, input_ids=ids, attention_mask=mask)
                if first is None
                else passes.replayed_logits_at(model, first, calls, keep)
            )
        hook = F.log_softmax(hook_logits.float(), -1)
        fit_state["mask"] = torch.zeros_like(keep)
        adapt_logits = (
            passes.logits_at(adapted, keep, input_ids=ids, attention_mask=mask)
            if first is None
            else passes.replayed_logits_at(cast(PeftModel, adapted).get_base_model(), first, calls, keep)
        )
        yield batch, keep, (base, hook, F.log_softmax(adapt_logits.float(), -1))


def _report(
    model: nn.Module,
    tokenizer: Any,
    record: SteeringRecord,
    totals: _Totals,
    fit_acc: dict[str, list[float]],
    greedy: list[tuple[str, int]],
    greedy_prompts: int,
    greedy_tokens: int,
) -> FidelityReport:
    n = totals.n
    prefixes = [p for _fmt, p in greedy]
    prefix = sum(prefixes) / len(prefixes) if prefixes else float("nan")
    full = sum(p == greedy_tokens for p in prefixes) / len(prefixes) if prefixes else float("nan")
    formats = totals.by_format.figures()
    for fmt, figures in formats.items():
        mine = [p for f, p in greedy if f == fmt]
        figures["greedy_prefix_mean"] = sum(mine) / len(mine) if mine else float("nan")
        figures["greedy_prompts"] = len(mine)
    kept, promoted = totals.effect.kept()
    return FidelityReport(
        mode=record.mode,
        tokens=n,
        top1_agreement=totals.agree / n,
        kl_hook_adapter=totals.kl_ha / n,
        kl_hook_base=totals.kl_hb / n,
        kl_ratio=(totals.kl_ha / totals.kl_hb) if totals.kl_hb > 0 else float("nan"),
        top1_hook_vs_base=totals.agree_base / n,
        greedy_prefix_mean=prefix,
        greedy_full_match=full,
        greedy_tokens=greedy_tokens,
        greedy_prompts=greedy_prompts,
        fit_abs_error={k: v[0] / max(v[1], 1e-30) for k, v in fit_acc.items()},
        kl_by_position=(totals.pos_sum / totals.pos_n.clamp(min=1))[totals.pos_n > 0].tolist(),
        max_abs_logit_diff=totals.max_diff,
        by_format=formats,
        by_source=totals.by_source.figures(),
        effect_kept=kept,
        promoted_tokens=[tokenizer.decode([int(t)]) for t in promoted[:10]],
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def _first_changed_block(vector: SteeringVector, record: SteeringRecord, saved: dict[str, Tensor]) -> int | None:
    """The first block whose computation the steering or the adapter changes, when passes may share the blocks
    before it; None when they may not (ablation hooks every writer, skip_bos needs the model-level input ids)."""
    if record.mode == "ablate" or record.skip_bos:
        return None
    first = vector.first_block
    adapted_layers = {int(m.group(1)) for key in saved if (m := re.search(r"\.(\d+)\.", key))}
    if not adapted_layers or min(adapted_layers) < first:
        return None
    return first if first > 0 else None


def _greedy_agreement(
    model: nn.Module,
    adapted: nn.Module,
    tokenizer: Any,
    vector: SteeringVector,
    record: SteeringRecord,
    prompts: int,
    new_tokens: int,
) -> list[tuple[str, int]]:
    """(format, tokens before the adapter's greedy continuation first differs from the hook's) per held-out prompt.

    Until the first difference both continuations share their prefix, so the adapter's greedy choice at each step is
    its argmax on the hook's own continuation: one batched hook generation and one adapter forward pass measure it.
    """
    if prompts <= 0:
        return []
    device = next(model.parameters()).device
    pairs = corpus.prompts(tokenizer, prompts)
    # The last DEFAULT_MAX_DOC_TOKENS tokens of a long multi-turn prompt: the turns it answers, within verify's window.
    rows = [corpus.encode(tokenizer, text, 10**6, plain=fmt == "plain")[-DEFAULT_MAX_DOC_TOKENS:].tolist()
            for fmt, text in pairs]  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(rows, pad, device)
    width = ids.shape[1]
    with torch.no_grad():
        with reference(model, vector, record):
            seq = pretrained(model).generate(  # type: ignore[operator]  # transformers types it outside PreTrainedModel
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        full_mask = torch.cat([mask, torch.ones_like(seq[:, width:])], dim=1)
        logits = adapted(input_ids=seq, attention_mask=full_mask).logits[:, width - 1 : -1].float()
    # min_new_tokens kept the hook from ending early; hold the adapter to the same rule.
    eos = getattr(model.generation_config, "eos_token_id", None)
    for token in [eos] if isinstance(eos, int) else eos or []:
        logits[..., token] = float("-inf")
    same = (logits.argmax(-1) == seq[:, width:]).long()
    prefixes = same.cumprod(dim=1).sum(dim=1).tolist()
    return [(fmt, int(p)) for (fmt, _text), p in zip(pairs, prefixes, strict=True)]
