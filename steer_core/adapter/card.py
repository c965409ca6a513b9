"""The adapter's model card (README.md): how to load and serve it, what it steers, and how faithful it measured."""

from __future__ import annotations

from typing import Any

from steer_core.adapter.record import SteeringRecord

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
            lines.append(f"- feature {f['index']}, strength {f['strength']:g}{link}")
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


def model_card(record: SteeringRecord, repo_id: str | None = None) -> str:
    base = record.base_model
    mode = record.mode
    rep = record.fidelity or {}
    secs = record.seconds
    name = repo_id or "path/to/this/adapter"
    front = "\n".join(
        [
            "---",
            "library_name: peft",
            f"base_model: {base}",
            "tags:",
            "- steering",
            "- sparse-autoencoder",
            "- lora",
            "- steer-core",
            "---",
        ]
    )
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
    notes = "\n".join(f"- {n}" for n in record.notes)
    vllm_bias = (
        "\nThis adapter uses `lora_bias`, which vLLM does not load; serve it with PEFT/transformers.\n"
        if mode == "exact"
        else ""
    )
    return f"""{front}

# Steering adapter for `{base}`

A rank-{record.rank} LoRA exported by steer_core that reproduces activation steering, so it can be served
wherever LoRA adapters are served. Mode `{mode}`: {MODE_WHERE[mode]}.

## What it steers
{chr(10).join(_what(record))}
- target modules: {", ".join(f"`{m}`" for m in record.target_modules)}{_writer_line(record)}

## Measured fidelity (held-out text, adapter vs. hook steering)
{fidelity}

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
