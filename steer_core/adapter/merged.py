"""Merged weights, for engines that load no LoRA: the base model with the adapter baked into the writers' weights.

- `merged` (`--target merged`): `W + scaling·B·A` in every module the adapter targets, made by PEFT's own
  `merge_and_unload()` on a private copy of the model, saved with `save_pretrained` in the base model's own layout
  (config, safetensors, tokenizer, generation config) and a full model's card. TGI, SGLang, vLLM without
  `--enable-lora`, LM Studio (after conversion) and any transformers code load it as a plain model.
- `ollama`: that model converted to GGUF by llama.cpp's own `convert_hf_to_gguf.py`, with a Modelfile `FROM` it.
  Ollama v0.34.1 and later refuse `ADAPTER` ("LoRA adapters are no longer supported", ollama#14969), so a merged
  model is the only way left to steer it.

Why a copy: the app serves concurrent users from one loaded model. Merging in place and unmerging afterwards would
not give back the same weights (W + BA - BA is not W in floating point), and would steer every request in between.
The copy costs one model's parameters (135M float32: 0.54 GB; 7B bfloat16: 14 GB) for the seconds the merge and
save take.

Verified the way PEFT is: the merged model, read back from the files written, gives PEFT's logits within float
tolerance on a few held-out texts (`merge_fidelity`).

A LoRA bias (`exact` mode) merges only into a module that has a bias (PEFT's merge adds `lora_B.bias · scaling` to
it). Llama- and Gemma-family writers have none, and giving them one would change the model's layout (its config has
no switch for the writers alone), so there `exact` is refused before any work; `portable` mode merges anywhere.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steer_core.constants import MERGED_DIRNAME, MODEL_CARD_FILENAME, cache_dir

# The texts the merged model is held to PEFT on: none is calibration or verification text, and together they cover
# a chat turn, a system prompt and plain text, as the served traffic does.
HELD_OUT_TEXTS = (
    "The lighthouse keeper climbed the stairs every evening, counting the steps out loud.",
    "Q: What is the boiling point of water at the top of a mountain? A:",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
)
HELD_OUT_CHATS = ("Write a short note to a friend.", "What should I cook tonight?")

# float32: W + s·B·A rounded once per weight, then ~30 layers of float32 arithmetic in a different order from PEFT's
# x·Wᵀ + s·(x·Aᵀ)·Bᵀ. Relative error ~1e-7 per operation grows to ~1e-5 of the logits' scale on the embedded models
# (measured: tests/adapter/test_merged.py); 1e-4 of the largest |logit| leaves 10x room and is still far below any
# steering effect (the adapter moves logits by whole units). Half precision rounds each weight to ~4e-3 relative,
# so a model loaded in bfloat16/float16 gets the tolerance of its own epsilon.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
GGUF_OUTTYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class MergeFidelity:
    """The merged model against PEFT on HELD_OUT texts: logits within `tolerance` (absolute, = relative × the
    largest |logit|) and the greedy next token at every position."""

    max_abs_logit_diff: float
    max_abs_logit: float
    tolerance: float
    top1_agreement: float
    tokens: int
    dtype: str

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check_mergeable(model: nn.Module, modules: Iterable[str], has_bias: bool) -> None:
    """A LoRA bias merges into a module's own bias, or nowhere: refuse before any work where a module has none."""
    if not has_bias:
        return
    named = dict(model.named_modules())
    missing = [m for m in modules if getattr(named.get(m), "bias", None) is None]
    if missing:
        raise ValueError(
            f"mode 'exact' writes a LoRA bias, and {', '.join(missing)} has no bias to merge it into (a new bias "
            "would change the model's layout); use mode 'portable' for merged weights, or target 'peft'"
        )


def merge(model: nn.Module, folder: Path, base_model: str | None = None) -> nn.Module:
    """The model with `folder`'s adapter merged in by PEFT (`merge_and_unload`), on a private copy: `model` itself is
    never touched (load_peft deep-copies it)."""
    from steer_core.check.verify import load_peft

    peft_model: Any = load_peft(model, folder, base_model)  # a PeftModel (typed as nn.Module there)
    merged: nn.Module = peft_model.merge_and_unload()
    return merged


def _held_out_ids(tokenizer: Any) -> list[torch.Tensor]:
    rows = [tokenizer(t, return_tensors="pt").input_ids for t in HELD_OUT_TEXTS]
    if getattr(tokenizer, "chat_template", None):
        for prompt in HELD_OUT_CHATS:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            rows.append(tokenizer(text + "Sure, here is", add_special_tokens=False, return_tensors="pt").input_ids)
    return rows


@torch.no_grad()
def merge_fidelity(peft_model: nn.Module, merged: nn.Module, tokenizer: Any) -> MergeFidelity:
    """How far the merged model's logits are from PEFT's on the held-out texts."""
    diff = top = 0.0
    agree = tokens = 0
    device = next(merged.parameters()).device
    for ids in _held_out_ids(tokenizer):
        ids = ids.to(device)
        ref = peft_model(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
        diff = max(diff, float((got - ref).abs().max()))
        top = max(top, float(ref.abs().max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        tokens += ids.shape[1]
    dtype = next(merged.parameters()).dtype
    tolerance = RELATIVE_TOLERANCE.get(dtype, 1e-2) * max(top, 1.0)
    return MergeFidelity(diff, top, tolerance, agree / max(tokens, 1), tokens, str(dtype).removeprefix("torch."))


def write_merged(model: nn.Module, tokenizer: Any, adapter: Path, out: Path, base_model: str) -> MergeFidelity:
    """The merged model saved at `out` (safetensors, the base model's layout, its tokenizer and generation config),
    read back from those files and held to PEFT's logits. Raises if it is not within tolerance."""
    from transformers import AutoModelForCausalLM

    from steer_core.check.verify import load_peft

    merged: Any = merge(model, adapter, base_model)  # a transformers PreTrainedModel
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    dtype = next(merged.parameters()).dtype
    del merged  # one extra copy at a time: the copy read back below replaces it
    gc.collect()
    # Read back what was written, so the check covers the files (tied embeddings, the config, the dtype) and not
    # only the merge in memory.
    written = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    peft_model = load_peft(model, adapter, base_model)
    try:
        fidelity = merge_fidelity(peft_model, written, tokenizer)
    finally:
        del peft_model, written
        gc.collect()
    if not fidelity.ok:
        raise ValueError(
            f"the merged model's logits differ from PEFT's by {fidelity.max_abs_logit_diff:.3g}, more than the "
            f"tolerance {fidelity.tolerance:.3g} ({fidelity.dtype}); the merged weights were not written"
        )
    return fidelity


def llama_cpp_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py: from STEER_CORE_LLAMA_CPP (a llama.cpp source tree), or the tree
    scripts/llama_cpp.sh fetched into the cache (the newest build there)."""
    given = os.environ.get("STEER_CORE_LLAMA_CPP")
    candidates = (
        [Path(given), Path(given) / "src"]
        if given
        else sorted((cache_dir() / "llama.cpp").glob("b*/src"), key=lambda p: int(p.parent.name[1:] or 0))[::-1]
    )
    for src in candidates:
        if (src / "convert_hf_to_gguf.py").is_file() and (src / "gguf-py").is_dir():
            return src / "convert_hf_to_gguf.py"
    where = f"STEER_CORE_LLAMA_CPP={given}" if given else str(cache_dir() / "llama.cpp")
    raise FileNotFoundError(
        f"the ollama target converts the merged model with llama.cpp's convert_hf_to_gguf.py, which is not in {where}; "
        "fetch llama.cpp's source with `bash scripts/llama_cpp.sh --source` (no build needed), or set "
        "STEER_CORE_LLAMA_CPP to a llama.cpp source tree"
    )


def write_gguf(merged_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """`merged_dir` converted to GGUF by llama.cpp's own converter (with the gguf-py of its own tree, not ours)."""
    if outtype not in GGUF_OUTTYPES:
        raise ValueError(f"GGUF outtype {outtype!r} is not one of {', '.join(GGUF_OUTTYPES)}")
    converter = llama_cpp_converter()
    tmp = out.with_name(f".{out.name}.tmp")
    env = {"PYTHONPATH": str(converter.parent / "gguf-py"), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HF_HUB_OFFLINE": "1", "HOME": os.environ.get("HOME", "/tmp")}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(converter), "--outtype", outtype, "--outfile", str(tmp), str(merged_dir)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on the merged model: {proc.stderr[-2000:]}")
    tmp.replace(out)
    return out


def merged_card(record: Any, fidelity: MergeFidelity, repo_id: str | None = None) -> str:
    """The merged model's card: a full model's (transformers), whose base is the base model, fine-tuned by a merge
    of the steering adapter. `record` is the export's SteeringRecord."""
    from huggingface_hub import ModelCard, ModelCardData

    from steer_core.adapter.card import CARD_KEY, TAG, _what, hub_base_model, steer_core_facts

    base = hub_base_model(record.base_model)
    data = ModelCardData(
        base_model=base,
        # The Hub's relations are adapter, merge, quantized and finetune. "merge" is what the Hub infers for a card
        # that names several base models (mergekit's merges of models); this is one model with its own rank-1 LoRA
        # folded into its weights, which is a fine-tune of that one model. It also keeps the Hub's tag
        # base_model:finetune:<base> apart from the adapters' base_model:adapter:<base> that adapter.shared lists.
        base_model_relation="finetune" if base else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[TAG, "steering", "merged-lora"]
        + (["sparse-autoencoder"] if record.vector.provenance.get("source") == "sae" else []),
    )
    data[CARD_KEY] = steer_core_facts(record)
    rep = record.fidelity or {}
    modules = ", ".join(f"`{m}`" for m in record.target_modules)
    name = repo_id or f"path/to/this/{MERGED_DIRNAME}"
    hook = (
        f"- the adapter against hook steering (held-out text): top-1 agreement {rep['top1_agreement']:.2%}, "
        f"KL ratio {rep['kl_ratio']:.3g}\n"
        if rep
        else ""
    )
    text = f"""---
{data.to_yaml()}
---

# `{record.base_model}`, steered (merged weights)

`{record.base_model}` with steer_core's rank-{record.rank} steering adapter (mode `{record.mode}`) merged into its
weights: `W + scaling·B·A` in {modules}, by PEFT's `merge_and_unload()`. Every other weight is the base model's. It
loads wherever the base model loads, with no LoRA support needed (transformers, TGI, SGLang, vLLM, or GGUF engines
after llama.cpp's `convert_hf_to_gguf.py`).

## What was merged
{chr(10).join(_what(record))}

## Measured fidelity
- the merged model against the PEFT adapter, {fidelity.tokens} held-out tokens: max |logit difference|
  {fidelity.max_abs_logit_diff:.3g} (tolerance {fidelity.tolerance:.3g}, {fidelity.dtype}), greedy next token equal
  at {fidelity.top1_agreement:.2%} of positions
{hook}
## Use it
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```
"""
    return str(ModelCard(text))


def write_merged_card(folder: Path, record: Any, fidelity: MergeFidelity) -> Path:
    path = folder / MODEL_CARD_FILENAME
    path.write_text(merged_card(record, fidelity), encoding="utf-8")
    return path
