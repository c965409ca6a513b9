"""Build the PEFT LoRA (pure: config + tensors, no disk) and write its folder (thin).

Tensor names follow PEFT's saved format, `base_model.model.<module>.lora_A.weight` (1 × d_in) and
`...lora_B.weight` (d_out × 1), with lora_alpha = r = 1 so PEFT's scaling is exactly 1.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import Tensor, nn

from steer_core.constants import ADAPTER_WEIGHTS_FILENAME, STEERING_VECTOR_FILENAME
from steer_core.fit.calibrate import Calibration
from steer_core.fit.postnorm import norm_gain
from steer_core.sites import Architecture, Kind, architecture_for, num_layers, weight_of
from steer_core.vectors.vector import SteeringVector

Mode = Literal["portable", "exact", "ablate"]


@dataclass(frozen=True)
class BuiltAdapter:
    mode: Mode
    config: LoraConfig
    tensors: dict[str, Tensor]
    modules: list[str]
    notes: list[str] = field(default_factory=list)


def _key(module: str, part: str) -> str:
    return f"base_model.model.{module}.{part}"


def _target_name(arch: Architecture, kind: Kind) -> str:
    """The shortest name that picks this writer kind: the leaf ("down_proj") unless both writers share it."""
    path = arch.mlp_writer if kind == "mlp" else arch.attn_writer
    other = arch.attn_writer if kind == "mlp" else arch.mlp_writer
    leaf = path.rsplit(".", 1)[-1]
    return path if leaf == other.rsplit(".", 1)[-1] else leaf


def _config(
    arch: Architecture, base_model: str, kinds: set[Kind], layers: list[int] | None, **extra: Any
) -> LoraConfig:
    return LoraConfig(
        r=1,
        lora_alpha=1,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=True,
        base_model_name_or_path=base_model,
        target_modules=sorted(_target_name(arch, k) for k in kinds),
        layers_to_transform=layers,
        layers_pattern=arch.layers_path.rsplit(".", 1)[-1] if layers is not None else None,
        fan_in_fan_out=arch.fan_in_fan_out,
        **extra,
    )


def _writer_dims(model: nn.Module, name: str) -> tuple[int, int]:
    weight = weight_of(model.get_submodule(name))
    # Conv1D stores (in, out); nn.Linear stores (out, in).
    d_out, d_in = weight.shape
    if architecture_for(model).fan_in_fan_out:
        d_in, d_out = d_out, d_in
    return int(d_in), int(d_out)


def _complete(
    model: nn.Module, tensors: dict[str, Tensor], layers: list[int], kinds: set[Kind], bias: bool
) -> list[str]:
    """PEFT matches every (layer, kind) pair of the config; give the unused pairs explicit zero tensors."""
    arch = architecture_for(model)
    names = []
    for layer in layers:
        for kind in sorted(kinds):
            name = arch.writer_name(layer, kind)
            names.append(name)
            if _key(name, "lora_A.weight") in tensors:
                continue
            d_in, d_out = _writer_dims(model, name)
            tensors[_key(name, "lora_A.weight")] = torch.zeros(1, d_in)
            tensors[_key(name, "lora_B.weight")] = torch.zeros(d_out, 1)
            if bias:
                tensors[_key(name, "lora_B.bias")] = torch.zeros(d_out)
    return names


def build_portable(model: nn.Module, calibration: Calibration, base_model: str) -> BuiltAdapter:
    """Bias-free rank-1 LoRA from calibrated fits: loads in PEFT, vLLM and LoRA-upload services."""
    arch = architecture_for(model)
    tensors: dict[str, Tensor] = {}
    kinds: set[Kind] = set()
    layers: set[int] = set()
    for fit in calibration.fits:
        layer, kind = fit.writer
        kinds.add(kind)
        layers.add(layer)
        tensors[_key(fit.module, "lora_A.weight")] = fit.A.float().reshape(1, -1).contiguous()
        tensors[_key(fit.module, "lora_B.weight")] = fit.B.float().reshape(-1, 1).contiguous()
    modules = _complete(model, tensors, sorted(layers), kinds, bias=False)
    config = _config(arch, base_model, kinds, sorted(layers))
    notes = []
    if arch.post_norm:
        notes.append(
            "post-norm model: the writer's output passes through a norm before the residual stream, so no adapter "
            "on it adds the vector exactly; here A·x ≈ rms(Wx) and "
            + (
                "the layer's attention and MLP writers' B are fitted so that their summed additions come closest to "
                "the vector where later layers read the residual stream (steering.json: calibration.post_norm_shares)."
                if calibration.shares.get("used") == "fitted"
                else "B = share / g (the vector shared between the writers by their norms' gains, or all to one)."
            )
        )
    return BuiltAdapter("portable", config, tensors, modules, notes)


def build_exact(model: nn.Module, vector: SteeringVector, base_model: str) -> BuiltAdapter:
    """A = 0 and lora_B.bias = v: adds v to every token exactly (PEFT/transformers only; vLLM has no LoRA bias)."""
    arch = architecture_for(model)
    if arch.post_norm:
        raise ValueError(
            "mode 'exact' is not exact on post-norm models (Gemma 2/3): the norm after the writer rescales the "
            "bias. Use mode 'portable', whose fidelity report says how close it gets."
        )
    tensors: dict[str, Tensor] = {}
    kinds: set[Kind] = set()
    layers: set[int] = set()
    for point in vector.points:
        layer, kind = point.writer()
        kinds.add(kind)
        layers.add(layer)
        name = arch.writer_name(layer, kind)
        d_in, d_out = _writer_dims(model, name)
        tensors[_key(name, "lora_A.weight")] = torch.zeros(1, d_in)
        tensors[_key(name, "lora_B.weight")] = torch.zeros(d_out, 1)
        tensors[_key(name, "lora_B.bias")] = vector.directions[point].float().cpu().contiguous()
    modules = _complete(model, tensors, sorted(layers), kinds, bias=True)
    config = _config(arch, base_model, kinds, sorted(layers), lora_bias=True)
    notes = ["exact mode uses PEFT's lora_bias: it loads in PEFT/transformers, not in vLLM (LoRA bias was removed)."]
    return BuiltAdapter("exact", config, tensors, modules, notes)


def ablation_direction(model: nn.Module, layer: int, kind: Kind, unit: Tensor) -> Tensor:
    """The direction to project the writer's output against so that `unit` is absent from what reaches the residual.

    Pre-norm: `unit` itself. Post-norm: N(z) ⊥ r exactly when z ⊥ g ⊙ r (docs/math.md, "Ablation is exact").
    """
    arch = architecture_for(model)
    if not arch.post_norm:
        return unit
    q = norm_gain(model, arch, layer, kind).to(unit) * unit
    return q / q.norm()


def build_ablate(model: nn.Module, direction: Tensor, base_model: str) -> BuiltAdapter:
    """For every writer W: ΔW = -q (qᵀW), i.e. B = -q, A = qᵀW. Exact on pre-norm models without writer bias."""
    arch = architecture_for(model)
    if not direction.norm() > 0:
        raise ValueError("cannot ablate a zero direction")
    unit = (direction / direction.norm()).float().cpu()
    tensors: dict[str, Tensor] = {}
    n_layers = num_layers(model)
    kinds: set[Kind] = {"attn", "mlp"}
    notes = []
    for layer in range(n_layers):
        for kind in sorted(kinds):
            name = arch.writer_name(layer, kind)
            q = ablation_direction(model, layer, kind, unit)
            weight = weight_of(model.get_submodule(name)).detach().float().cpu()
            a = weight @ q if arch.fan_in_fan_out else q @ weight
            tensors[_key(name, "lora_A.weight")] = a.reshape(1, -1).contiguous()
            tensors[_key(name, "lora_B.weight")] = (-q).reshape(-1, 1).contiguous()
    if any(getattr(model.get_submodule(arch.writer_name(0, k)), "bias", None) is not None for k in kinds):
        notes.append("the writers have biases, which a bias-free LoRA cannot project: ablation is not exact here.")
    if arch.post_norm:
        notes.append("post-norm model: the direction is removed exactly, but the norm rescales what is left.")
    config = _config(arch, base_model, kinds, None)
    modules = [arch.writer_name(layer, k) for layer in range(n_layers) for k in sorted(kinds)]
    return BuiltAdapter("ablate", config, tensors, modules, notes)


def check_tensors(tensors: dict[str, Tensor]) -> None:
    """Refuse adapters that are empty, all-zero or non-finite."""
    if not tensors:
        raise ValueError("the adapter has no tensors")
    for name, t in tensors.items():
        if t.numel() == 0:
            raise ValueError(f"adapter tensor {name} is empty")
        if not torch.isfinite(t).all():
            raise ValueError(f"adapter tensor {name} has non-finite values")
    if all(not bool(t.any()) for t in tensors.values()):
        raise ValueError("every adapter tensor is zero: this adapter would change nothing")


def write_adapter(built: BuiltAdapter, vector: SteeringVector, folder: Path) -> None:
    """PEFT's two files plus the hook-steering vector that `verify` compares against."""
    check_tensors(built.tensors)
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that lora_bias cannot merge into bias-free layers; we know.
        built.config.save_pretrained(str(folder))
    save_file(built.tensors, str(folder / ADAPTER_WEIGHTS_FILENAME), metadata={"format": "pt"})
    vector.save(folder / STEERING_VECTOR_FILENAME)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
