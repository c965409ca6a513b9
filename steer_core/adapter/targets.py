"""Where the adapter will be served: what each engine loads, written the way that engine's own tools write it.

- `peft`: the PEFT folder as it is (PEFT, vLLM, SGLang, LoRAX, Together).
- `fireworks`: the same function at rank 4 (Fireworks accepts 4 <= r <= 64): extra rows of A and columns of B are
  zero and lora_alpha = r, so scaling alpha / r stays 1 and every output is unchanged.
- `llama.cpp`: `adapter.gguf`, a GGUF LoRA as llama.cpp's `convert_lora_to_gguf.py` writes it (see
  `write_gguf_lora`), and the exact control vector `control_vector.gguf` where the vector's sites allow one.
- `merged`: the base model with the adapter merged into its weights, in its own layout, in `merged/`
  (steer_core.adapter.merged): for engines that load no LoRA.
- `ollama`: that merged model as GGUF (llama.cpp's own `convert_hf_to_gguf.py`) and a `Modelfile` `FROM` it. Ollama
  has no control vectors, and v0.34.1 and later refuse `ADAPTER` in a Modelfile ("LoRA adapters are no longer
  supported": ollama#14969, `server/create.go`), so merged weights are the only way left to steer it.

A LoRA bias (the `exact` mode) loads in PEFT only: vLLM removed it, llama.cpp's converter rejects it, Fireworks'
format has no place for it; those targets refuse it before any work. `merged` takes it only where every targeted
module has a bias of its own to merge it into (merged.check_mergeable).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from steer_core.adapter.build import BuiltAdapter
from steer_core.constants import (
    CONTROL_VECTOR_FILENAME,
    GGUF_LORA_FILENAME,
    MERGED_DIRNAME,
    MERGED_GGUF_FILENAME,
    MODELFILE_FILENAME,
)
from steer_core.sites import pretrained

# model_type -> llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES), for the model families the GGUF target covers
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
              "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3"}  # fmt: skip


@dataclass(frozen=True)
class Target:
    name: str
    how: str  # one line: how to load what was written
    min_rank: int = 1
    lora_bias: bool = False  # can its loader take a LoRA bias (exact mode)?
    gguf: bool = False  # a GGUF of llama.cpp's architectures (checked before any work)
    merged: bool = False  # writes the merged model (steer_core.adapter.merged)


TARGETS = {
    t.name: t
    for t in (
        Target("peft", "PeftModel.from_pretrained(model, DIR); vLLM --enable-lora --lora-modules NAME=DIR (not exact "
               "mode); SGLang, LoRAX and Together take DIR as it is", lora_bias=True),
        Target("fireworks", "upload DIR as a Fireworks LoRA (rank 4: the rank-1 update plus three zero ranks)",
               min_rank=4),
        Target("llama.cpp", f"llama-server -m BASE.gguf --lora DIR/{GGUF_LORA_FILENAME} (or, exactly: "
               f"--control-vector DIR/{CONTROL_VECTOR_FILENAME})", gguf=True),
        Target("ollama", f"ollama create NAME -f DIR/{MODELFILE_FILENAME} (FROM ./{MERGED_GGUF_FILENAME}: the "
               "merged model, no ADAPTER), then ollama run NAME", gguf=True, merged=True),
        Target("merged", f"AutoModelForCausalLM.from_pretrained(DIR/{MERGED_DIRNAME}); TGI, SGLang, vLLM without "
               f"--enable-lora: serve DIR/{MERGED_DIRNAME} as a plain model", lora_bias=True, merged=True),
    )
}  # fmt: skip


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"target {name!r} is not one of {', '.join(TARGETS)}")
    return TARGETS[name]


def check_target(name: str, mode: str, model: nn.Module) -> Target:
    """The target, once it is known to load this mode on this model (checked before any calibration)."""
    t = target(name)
    if mode == "exact" and not t.lora_bias:
        raise ValueError(
            f"mode 'exact' writes a LoRA bias, which target {name!r} cannot load; use mode 'portable' (or target "
            "'peft', whose PEFT loader takes a bias; for llama.cpp the control vector is the exact form)"
        )
    if t.gguf:
        gguf_arch(model)
    if t.name == "ollama":
        from steer_core.adapter.merged import llama_cpp_converter

        llama_cpp_converter()  # the GGUF is llama.cpp's converter's: say how to get it before any work
    return t


def gguf_arch(model: nn.Module) -> str:
    model_type = str(getattr(model.config, "model_type", ""))
    if model_type not in GGUF_ARCHS:
        raise ValueError(
            f"a GGUF LoRA for model_type {model_type!r} is not written here (llama.cpp names its tensors per "
            f"architecture); supported: {', '.join(sorted(GGUF_ARCHS))}"
        )
    return GGUF_ARCHS[model_type]


def pad_rank(built: BuiltAdapter, rank: int) -> BuiltAdapter:
    """The same adapter at `rank`: zero rows of A, zero columns of B, lora_alpha = rank (scaling stays 1)."""
    if built.config.r >= rank:
        return built
    if built.config.r != 1 or built.config.lora_alpha != 1:
        raise ValueError(f"rank padding expects a rank-1 adapter at scaling 1, got r={built.config.r}")
    tensors = {}
    for key, t in built.tensors.items():
        if key.endswith("lora_A.weight"):
            t = torch.cat([t, torch.zeros(rank - 1, t.shape[1], dtype=t.dtype)])
        elif key.endswith("lora_B.weight"):
            t = torch.cat([t, torch.zeros(t.shape[0], rank - 1, dtype=t.dtype)], dim=1)
        tensors[key] = t.contiguous()
    config = replace(built.config, r=rank, lora_alpha=rank)
    return replace(built, config=config, tensors=tensors, notes=[*built.notes, f"rank padded to {rank} with zeros"])


def write_gguf_lora(folder: Path, model: nn.Module, out: Path) -> Path:
    """`folder`'s PEFT adapter as a GGUF LoRA, as llama.cpp's convert_lora_to_gguf.py (build b11434) writes it:

    - metadata (`LoraModel.set_type`, `set_gguf_parameters`): general.type "adapter", adapter.type "lora",
      adapter.lora.alpha (float32), general.architecture of the base model;
    - tensors (`get_tensors`, `modify_tensors`): each base weight's GGUF name (the gguf package's tensor name map, as
      the converter's `map_tensor_name`) + ".lora_a" / ".lora_b", A and B as PEFT stores them (llama.cpp's
      llama_adapter_lora_init checks a->ne[0] = n_in, b->ne[1] = n_out, a->ne[1] = b->ne[0] = r), float32.
    Our writers (o_proj, down_proj) are never permuted by the converter (it permutes q_proj and k_proj only).
    """
    import gguf

    from steer_core.adapter.served import read_adapter

    adapter = read_adapter(folder)
    if adapter.biases:
        raise ValueError(f"{folder}: a LoRA bias has no place in a GGUF LoRA; export in portable mode")
    arch = gguf_arch(model)
    names = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
        int(pretrained(model).config.get_text_config().num_hidden_layers),
    )
    # llama.cpp scales by adapter.lora.alpha / r, so alpha = PEFT's scaling × r reproduces it (rsLoRA included)
    alpha = {
        round(s * float(a.shape[0]), 6)
        for s, (a, _b) in zip(adapter.scaling.values(), adapter.params.values(), strict=True)
    }
    if len(alpha) != 1:
        raise ValueError(f"{folder}: modules with different lora_alpha cannot share one GGUF adapter.lora.alpha")
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha.pop()))
    for module in sorted(adapter.params):
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"{module}: no llama.cpp tensor of architecture {arch!r} corresponds to it")
        a, b = adapter.params[module]
        writer.add_tensor(f"{name}.lora_a", a.float().numpy().astype(np.float32))
        writer.add_tensor(f"{name}.lora_b", b.float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def write_modelfile(folder: Path, base_model: str, gguf_name: str = MERGED_GGUF_FILENAME) -> Path:
    """Ollama's Modelfile for the merged GGUF next to it. No ADAPTER line: Ollama v0.34.1 and later refuse it."""
    path = folder / MODELFILE_FILENAME
    path.write_text(
        f"# Ollama: {base_model} with the steering merged into its weights (no ADAPTER: Ollama v0.34.1 and later\n"
        "# refuse LoRA adapters). ollama create NAME -f Modelfile && ollama run NAME\n"
        f"FROM ./{gguf_name}\n",
        encoding="utf-8",
    )
    return path
