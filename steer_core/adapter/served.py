"""An exported adapter as an endpoint serves it: its LoRA weights beside the base model's, one batch row at a time.

LoRA servers (vLLM, llama.cpp, TGI, PEFT itself) keep the base weights and add scaling·B(A·x) at every targeted
module, per request. `steer.lowrank_updates` with a row mask does exactly that inside one batched generate call,
so a preview can show the unsteered, hook-steered and served text side by side without a second copy of the model
(PEFT's own `PeftModel` needs one: it rewrites the modules of the model it wraps). PEFT reads the files here (config
and weights) and tests hold the result to PeftModel's output, token for token.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import LoraConfig
from peft.utils import load_peft_weights
from torch import Tensor, nn

from steer_core.adapter.folder import read_folder
from steer_core.adapter.record import SteeringRecord
from steer_core.constants import ADAPTER_CONFIG_FILENAME
from steer_core.steer import lowrank_updates
from steer_core.vectors.vector import SteeringVector

# LoRA variants whose forward pass is not scaling·B(A·x) on a plain module; a served preview refuses them.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


@dataclass(frozen=True)
class ServedAdapter:
    """The LoRA updates of one adapter: {module name in the base model: (A, B)} and each module's scaling."""

    source: str  # the folder or Hub repo it was read from
    params: dict[str, tuple[Tensor, Tensor]]
    scaling: dict[str, float]
    biases: dict[str, Tensor] = field(default_factory=dict)  # lora_B's bias (PEFT's lora_bias: exact mode)
    base_model: str = ""
    record: SteeringRecord | None = None  # steering.json, when the adapter is one of ours
    vector: SteeringVector | None = None  # the hook vector it stands for, when the adapter is one of ours

    def __post_init__(self) -> None:
        if not self.params:
            raise ValueError(f"{self.source}: the adapter holds no LoRA weights")

    @contextmanager
    def applied(self, model: nn.Module, rows: Sequence[int] | None = None) -> Iterator[None]:
        """The adapter on `model` in this context (on these batch rows only, when given)."""
        missing = [name for name in self.params if not _has_module(model, name)]
        if missing:
            raise ValueError(
                f"{self.source} targets {missing[0]}, which this model ({type(model).__name__}) does not have: "
                f"the adapter was made for {self.base_model or 'another model'}"
            )
        with lowrank_updates(model, self.params, scaling=self.scaling, biases=self.biases, rows=rows):
            yield


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def read_adapter(source: str | Path, *, token: str | bool | None = None, cache_dir: str | None = None) -> ServedAdapter:
    """Read an adapter (PEFT format, LoRA): a local folder with `read_folder`, a Hub repo through PEFT's own loaders
    (`token` and `cache_dir` for the Hub's requests: steer_core.hub.Access)."""
    where = str(source)
    if Path(where).is_dir():
        files = read_folder(where)
        return _served(where, _lora_config(where, files.config), files.tensors, files.record, files.vector)
    hub: dict[str, Any] = {"token": token, **({"cache_dir": cache_dir} if cache_dir else {})}
    try:
        config = LoraConfig.from_pretrained(where, **hub)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"{where}: not a PEFT LoRA adapter (a folder or Hub repo with {ADAPTER_CONFIG_FILENAME}): {err}"
        ) from err
    try:
        weights = load_peft_weights(where, device="cpu", **hub)
    except Exception as err:  # safetensors and the Hub raise many kinds; the message names the file
        raise ValueError(f"{where}: could not read the adapter weights: {err}") from err
    return _served(where, config, weights)


def _lora_config(where: str, config: dict[str, Any]) -> LoraConfig:
    """adapter_config.json's settings as PEFT's LoraConfig.from_pretrained reads them (it drops runtime_config)."""
    settings = {k: v for k, v in config.items() if k != "runtime_config"}
    try:
        lora = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**settings))
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(
            f"{where}: not a PEFT LoRA adapter ({ADAPTER_CONFIG_FILENAME} does not read as one): {err}"
        ) from err
    if not isinstance(lora, LoraConfig):
        raise ValueError(f"{where}: a {config.get('peft_type')} adapter; a served preview reads LoRA adapters only")
    return lora


def _served(
    where: str,
    config: LoraConfig,
    weights: dict[str, Tensor],
    record: SteeringRecord | None = None,
    vector: SteeringVector | None = None,
) -> ServedAdapter:
    for key, what in _UNSUPPORTED.items():
        if getattr(config, key, None):
            raise ValueError(f"{where}: the adapter uses {what}; a served preview supports plain LoRA only")
    params: dict[str, tuple[Tensor, Tensor]] = {}
    scaling: dict[str, float] = {}
    biases: dict[str, Tensor] = {}
    for key, a in sorted(weights.items()):
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_A(?:\.\w+)?\.weight", key)
        if not match:
            continue
        name = match.group(1)
        b = weights.get(key.replace(".lora_A", ".lora_B"))
        if b is None:
            raise ValueError(f"{where}: {key} has no lora_B partner")
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: {name} has lora_A rank {a.shape[0]} but lora_B rank {b.shape[1]}")
        params[name] = (a.float(), b.float())
        if (bias := weights.get(key.replace(".lora_A", ".lora_B").replace(".weight", ".bias"))) is not None:
            biases[name] = bias.float()
        scaling[name] = _scaling(config, name, a.shape[0])
    return ServedAdapter(where, params, scaling, biases, str(config.base_model_name_or_path or ""), record, vector)


def _scaling(config: LoraConfig, name: str, rank: int) -> float:
    """PEFT's: lora_alpha / r (or / sqrt(r) with rsLoRA), with the per-module rank and alpha patterns."""
    alpha = float(config.lora_alpha)
    for pattern, value in (config.alpha_pattern or {}).items():
        if re.search(rf"(^|\.){pattern}$", name):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
