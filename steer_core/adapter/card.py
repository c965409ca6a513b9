"""The adapter's model card (README.md): how to load and serve it, what it steers, and how faithful it measured.

Written with huggingface_hub's ModelCard / ModelCardData, so the metadata is what the Hub's own parser reads back. Its
front matter carries what a search needs (`card_metadata`):

- `library_name: peft`, `base_model` (only when it is a Hub id: the Hub refuses a card whose base_model is not one)
  and `base_model_relation: adapter`, from which the Hub tags the repo `base_model:adapter:<base>`;
- the tags `steering`, `sparse-autoencoder`, `lora` and `steer-core` (TAG): `HfApi.list_models(filter=...)` matches
  tags, so "steer-core adapters of base X" is one list call (adapter.shared);
- one mapping, `steer_core:` (CARD_KEY), with the facts of steering.json a list shows and searches: the vector's
  source, SAE, features with their strengths and labels, site, strength, mode, rank, target, top-1 agreement and the
  servable engine scales. The Hub's list search matches repo ids only, so words in labels are matched on this
  mapping, which `list_models(expand=["cardData", ...])` returns.
"""

from __future__ import annotations

import math
from typing import Any

from steer_core.adapter.record import SteeringRecord
from steer_core.constants import SERVABLE_TOP1

TAG = "steer-core"  # every export's card carries it; adapter.shared lists by it
TAGS = ("steering", "sparse-autoencoder", "lora", TAG)
CARD_KEY = "steer_core"  # the card metadata's mapping of steer_core facts
LABEL_KEYS = ("label", "word", "description")  # where a feature's provenance may name what it means, first found wins
LABEL_MAX = 200  # characters of one label kept in the metadata
ENGINE_SCALE_MEANING = (
    "the LoRA scale a llama-server request sets; scale s stands for the hook at s × the exported strength"
)

MODE_WHERE = {
    "portable": "a plain rank-1 LoRA: loads in PEFT, vLLM and LoRA-upload services",
    "exact": "uses PEFT's lora_bias: exact, but loads only in PEFT/transformers (vLLM removed LoRA bias)",
    "ablate": "a rank-1 LoRA on every writer module that removes one direction: loads in PEFT and vLLM",
}


def _what(record: SteeringRecord) -> list[str]:
    prov = record.vector.provenance
    lines = []
    if prov.get("source") == "sae":
        sae = prov["sae"]
        folder = sae.get("folder") or sae.get("path")  # "path": adapters exported before sources were named by hash
        where = f"`{sae.get('release')}` / `{sae.get('sae_id')}`" if sae.get("release") else f"`{folder}`"
        lines.append(f"- SAE: {where} at `{sae['hook_name']}` (trained on `{sae.get('model_name')}`)")
        for f in prov.get("features", []):
            link = f" ([Neuronpedia]({f['url']}))" if f.get("url") else ""
            label = feature_label(f)
            named = f", labelled `{label.replace('`', chr(39))}`" if label else ""
            lines.append(f"- feature {f['index']}, strength {f['strength']:g}{link}{named}")
        if "sae_fvu_on_this_model" in prov:
            lines.append(f"- SAE fraction of variance unexplained on this model: {prov['sae_fvu_on_this_model']:.3f}")
    elif prov.get("source") == "file":
        lines.append(f"- vector file `{prov.get('file') or prov.get('path')}`, strength {prov.get('strength', 1):g}")
    elif prov.get("source") == "contrastive":
        n_pos, n_neg = len(prov["positive"]), len(prov["negative"])
        strength = f"{prov.get('strength', 1):g} ({prov.get('strength_unit', 'abs')})"
        lines.append(f"- contrastive vector, {prov['method']}, {n_pos} positive / {n_neg} negative prompts, {strength}")
    elif prov.get("source") == "control_vector":
        name = prov.get("file") or prov.get("path")
        lines.append(f"- llama.cpp control vector `{name}`, strength {prov.get('strength', 1):g}")
    elif prov:
        lines.append(f"- vector: {prov}")
    for point, norm in record.vector.norms.items():
        lines.append(f"- `{point}`: vector norm {norm:.4g}")
    return lines


def _effect_rows(rep: dict[str, Any]) -> list[str]:
    """The behaviour figure, in reports that have it (adapters exported before it existed do not)."""
    if "effect_kept" not in rep:
        return []
    promoted = ", ".join(f"`{t.strip() or repr(t)}`" for t in rep.get("promoted_tokens", [])[:8])
    return [f"| steering effect kept: the hook's log-probability gain on the tokens it promotes most ({promoted}) "
            f"that the adapter also gives | {rep['effect_kept']:.0%} |"]  # fmt: skip


def by_format_table(rep: dict[str, Any]) -> str:
    """Fidelity per input format, worst top-1 first: the format a user's traffic is in may be the worst one."""
    rows = sorted(rep["by_format"].items(), key=lambda item: item[1]["top1_agreement"])
    lines = [
        "By input format (held-out text of each; worst first):",
        "",
        "| format | top-1 agreement | KL ratio | greedy tokens before divergence | tokens |",
        "|---|---|---|---|---|",
    ]
    for fmt, g in rows:
        greedy = g.get("greedy_prefix_mean", float("nan"))
        lines.append(
            f"| {FORMAT_NAMES.get(fmt, fmt)} | {g['top1_agreement']:.2%} | {g['kl_ratio']:.3g} | "
            f"{greedy:.1f} | {g['tokens']} |"
        )
    return "\n".join(lines)


FORMAT_NAMES = {
    "chat": "chat (one user turn)",
    "system": "chat with a system prompt",
    "multiturn": "multi-turn chat",
    "plain": "plain text (no chat template)",
}


def _target_lines(record: SteeringRecord) -> str:
    """How to load what the export wrote for its target engine (adapter.targets), when it is not plain PEFT."""
    if not record.serve or record.target == "peft":
        return ""
    files = ", ".join(f"`{f}`" for f in record.target_files)
    return f"\nExported for **{record.target}**" + (f" ({files})" if files else "") + f": {record.serve}.\n"


def _writer_line(record: SteeringRecord) -> str:
    """Which writer calibration kept, and the KL on unseen calibration text it was chosen by (fit.composite)."""
    choice = (record.calibration and record.calibration.writer_choice) or {}
    if not choice:
        return ""
    if choice.get("asked"):
        return f"\n- writer: `{choice['used']}`, asked for (`--writer {choice['asked']}`)"
    kl = ", ".join(f"`{m}` {v:.3g}" for m, v in choice["unseen_kl"].items())
    return (
        f"\n- writer: `{choice['used']}`, chosen by KL(hook ‖ adapter) per token on calibration text no fit saw ({kl})"
    )


def _finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number (steering.json may come from anyone's repo), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _number(value: Any, digits: int = 4) -> float | None:
    """A finite number rounded for the metadata, or None (a NaN would not survive the Hub's JSON)."""
    x = _finite(value)
    return None if x is None else float(f"{x:.{digits}g}")


def _scale_key(key: Any) -> float | None:
    try:
        return _finite(float(key))
    except (TypeError, ValueError):
        return None


def feature_label(feature: dict[str, Any]) -> str | None:
    """What a feature of the vector's provenance is said to mean (LABEL_KEYS), on one line, or None."""
    for key in LABEL_KEYS:
        value = feature.get(key)
        if isinstance(value, str) and value.strip():
            return " ".join(value.split())[:LABEL_MAX]
    return None


def hub_base_model(base_model: str) -> str | None:
    """`base_model` when the Hub would take it as a model id in a card's metadata (a local folder is not one)."""
    from steer_core.hub import check_repo_id

    try:
        return check_repo_id(base_model)
    except ValueError:
        return None


def record_scales(record: SteeringRecord) -> dict[str, Any] | None:
    """steering.json's engine-scale check (check.scales.ScaleReport.to_dict()), from the record's field or, in a
    record read by a version without that field, its extra keys."""
    scales = getattr(record, "scales", None) or record.extra.get("scales")
    return scales if isinstance(scales, dict) else None


def servable_range(scales: dict[str, Any]) -> tuple[float, float] | None:
    """(lowest, highest) engine scale of `scales["servable"]`, or None when no scale is servable (or it is damaged)."""
    servable = scales.get("servable")
    values = [_finite(s) for s in servable] if isinstance(servable, (list, tuple)) else []
    kept = [v for v in values if v is not None]
    return (min(kept), max(kept)) if kept and len(kept) == len(values) else None


def _checked(scales: dict[str, Any]) -> list[float]:
    checked = scales.get("checked")
    return [x for x in map(_finite, checked) if x is not None] if isinstance(checked, list) else []


def _by_scale(scales: dict[str, Any]) -> dict[str, Any]:
    by_scale = scales.get("by_scale")
    return by_scale if isinstance(by_scale, dict) else {}


def _criterion(scales: dict[str, Any]) -> str:
    criterion = scales.get("criterion")
    if isinstance(criterion, str) and criterion.strip():
        return " ".join(criterion.split())[:100]
    return f"top-1 agreement >= {SERVABLE_TOP1:.0%}"


def scale_range_text(scales: dict[str, Any]) -> str:
    """One line on the engine scales an adapter serves faithfully, from steering.json's `scales`."""
    checked = ", ".join(f"{x:g}" for x in _checked(scales)) or "none"
    servable = servable_range(scales)
    if not servable:
        return f"Servable at no engine scale: no checked scale ({checked}) reached {_criterion(scales)}."
    lo, hi = servable
    where = f"scale {lo:g}" if lo == hi else f"scales {lo:g}–{hi:g}"
    line = f"Servable at engine {where} ({ENGINE_SCALE_MEANING}); {_criterion(scales)}, checked {checked}."
    if lo <= 1 <= hi:
        return line
    one = _finite((_by_scale(scales).get("1") or {}).get("top1_agreement"))
    at_one = f" ({one:.1%})" if one is not None else ""
    return line + f" Not at scale 1, the exported strength itself{at_one}: serve it at {where}."


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = _finite(row.get(key))
    return "n/a" if value is None else format(value, fmt)


def _scales_section(scales: dict[str, Any] | None) -> str:
    """The engine-scale check as a card section: the one line, then a row per scale checked."""
    if not scales:
        return ""
    servable = servable_range(scales)
    rows = [
        "| engine scale | top-1 agreement | KL ratio | greedy tokens before divergence | effect kept | tokens "
        "| servable |",
        "|---|---|---|---|---|---|---|",
    ]
    by_scale = _by_scale(scales)
    measured = sorted(
        (x, row) for key, row in by_scale.items() if (x := _scale_key(key)) is not None and isinstance(row, dict)
    )
    for x, row in measured:
        inside = servable is not None and servable[0] <= x <= servable[1]
        tokens = row.get("tokens")
        rows.append(
            f"| {x:g} | {_cell(row, 'top1_agreement', '.2%')} | {_cell(row, 'kl_ratio', '.3g')} | "
            f"{_cell(row, 'greedy_prefix_mean', '.1f')} | {_cell(row, 'effect_kept', '.0%')} | "
            f"{tokens if isinstance(tokens, int) else 'n/a'} | {'yes' if inside else 'no'} |"
        )
    return f"\n### Engine scales\n\n{scale_range_text(scales)}\n\n" + "\n".join(rows) + "\n"


def _fidelity_facts(rep: dict[str, Any]) -> dict[str, Any]:
    facts = {
        "top1_agreement": _number(rep.get("top1_agreement")),
        "kl_ratio": _number(rep.get("kl_ratio")),
        "effect_kept": _number(rep.get("effect_kept")),
        "tokens": rep.get("tokens"),
    }
    by_format = rep.get("by_format") or {}
    if by_format:
        worst = min(by_format, key=lambda f: by_format[f]["top1_agreement"])
        facts |= {"worst_format": worst, "worst_format_top1": _number(by_format[worst]["top1_agreement"])}
    return facts


def steer_core_facts(record: SteeringRecord) -> dict[str, Any]:
    """The card metadata's `steer_core:` mapping: steering.json's facts a list of shared adapters shows and searches.
    Keys without a value are left out; steering.json stays the full record."""
    prov = record.vector.provenance
    facts: dict[str, Any] = {
        "version": record.steer_core_version or None,
        "base_model": record.base_model,
        "mode": record.mode,
        "rank": record.rank,
        "target": record.target,
        "source": prov.get("source"),
        "site": list(record.vector.points),
    }
    if prov.get("source") == "sae":
        sae = prov.get("sae") or {}
        facts["sae"] = {k: sae[k] for k in ("release", "sae_id", "folder", "hook_name") if sae.get(k)}
        features = []
        for f in prov.get("features", []):
            entry = {"index": f.get("index"), "strength": _number(f.get("strength"))}
            label = feature_label(f)
            features.append(entry | ({"label": label} if label else {}))
        facts["features"] = features
    else:
        facts["label"] = feature_label(prov)  # a concept's word, where the vector's provenance names one
    given = prov.get("strength_given", [prov["strength"]] if "strength" in prov else [])
    facts["strength"] = [_number(s) for s in given] or None
    facts["strength_unit"] = prov.get("strength_unit")
    facts |= _fidelity_facts(record.fidelity or {})
    facts = {k: v for k, v in facts.items() if v is not None}
    scales = record_scales(record)
    if scales:
        facts["scales_checked"] = _checked(scales)
        servable = servable_range(scales)
        facts["servable_scales"] = list(servable) if servable else None  # null: checked, and none servable
    return facts


def card_metadata(record: SteeringRecord) -> Any:
    """The adapter card's ModelCardData (huggingface_hub), front matter of README.md."""
    from huggingface_hub import ModelCardData

    base = hub_base_model(record.base_model)
    data = ModelCardData(
        library_name="peft",
        base_model=base,
        # said, not left to the Hub to infer: list_models filters on the tag it makes, base_model:adapter:<base>
        base_model_relation="adapter" if base else None,
        pipeline_tag="text-generation",
        tags=list(TAGS),
    )
    data[CARD_KEY] = steer_core_facts(record)
    return data


def model_card(record: SteeringRecord, repo_id: str | None = None) -> str:
    from huggingface_hub import ModelCard

    base = record.base_model
    mode = record.mode
    rep = record.fidelity or {}
    secs = record.seconds
    name = repo_id or "path/to/this/adapter"
    # The writers' input statistics may come from an earlier export at the same site: say so beside the time.
    cal = record.calibration
    reused = (
        " (input statistics kept from an earlier export)"
        if cal and cal.reused_statistics
        else f" (input statistics of {cal.reused_tokens} of its {cal.tokens} tokens kept from a map)"
        if cal and cal.reused_tokens
        else ""
    )
    fidelity = (
        "\n".join(
            [
                "| measure | value |",
                "|---|---|",
                f"| top-1 next-token agreement with hook steering | {rep['top1_agreement']:.2%} |",
                f"| KL(hook ‖ adapter), nats/token | {rep['kl_hook_adapter']:.4g} |",
                f"| KL(hook ‖ unsteered base), nats/token | {rep['kl_hook_base']:.4g} |",
                f"| KL ratio (0 = identical to hook, 1 = no steering) | {rep['kl_ratio']:.3g} |",
                f"| greedy tokens before first divergence (of {rep['greedy_tokens']}) "
                f"| {rep['greedy_prefix_mean']:.1f} |",
                *_effect_rows(rep),
                f"| held-out tokens | {rep['tokens']} |",
                f"| model dtype while measured | {rep.get('dtype', 'float32')} |",
                *(
                    f"| mean abs error of A·x against its target, `{module}` (relative) | {err:.3g} |"
                    for module, err in rep.get("fit_abs_error", {}).items()
                ),
                *([f"| export time, calibration included{reused} (s) | {secs['total']:.1f} |"] if secs else []),
            ]
        )
        if rep
        else "Not verified."
    )
    if rep.get("by_format"):
        fidelity = by_format_table(rep) + "\n\nAll formats together:\n\n" + fidelity
    scales = _scales_section(record_scales(record))
    notes = "\n".join(f"- {n}" for n in record.notes)
    vllm_bias = (
        "\nThis adapter uses `lora_bias`, which vLLM does not load; serve it with PEFT/transformers.\n"
        if mode == "exact"
        else ""
    )
    body = f"""
# Steering adapter for `{base}`

A rank-{record.rank} LoRA exported by steer_core that reproduces activation steering, so it can be served
wherever LoRA adapters are served. Mode `{mode}`: {MODE_WHERE[mode]}.

## What it steers
{chr(10).join(_what(record))}
- target modules: {", ".join(f"`{m}`" for m in record.target_modules)}{_writer_line(record)}

## Measured fidelity (held-out text, adapter vs. hook steering)
{fidelity}
{scales}
{notes}

## Use it
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(model, "{name}")
```

Serve it with vLLM (any adapter rank up to `--max-lora-rank`; several adapters can share one server):
```
vllm serve {base} --enable-lora --max-lora-rank 8 --lora-modules steer={name}
```
{vllm_bias}{_target_lines(record)}
`steering.json` holds the provenance and the full fidelity report; `steering_vector.safetensors` holds the hook
vector, so `python -m steer_core verify --model {base} --adapter DIR` can re-measure it.
"""
    # ModelCard parses the front matter back (a mapping, or ValueError): what is written is what the Hub will read.
    return str(ModelCard(f"---\n{card_metadata(record).to_yaml()}\n---\n{body}"))
