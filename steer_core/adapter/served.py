"""An exported adapter as an endpoint serves it: its LoRA weights beside the base model's, one batch row at a time.

LoRA servers (vLLM, llama.cpp, TGI, PEFT itself) keep the base weights and add scaling·B(A·x) at every targeted
module, per request. `steer.lowrank_updates` with a row mask does exactly that inside one batched generate call,
so a preview can show the unsteered, hook-steered and served text side by side without a second copy of the model
(PEFT's own `PeftModel` needs one: it rewrites the modules of the model it wraps). PEFT reads the files here (config
and weights) and tests hold the result to PeftModel's output, token for token.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import LoraConfig
from torch import Tensor, nn

from steer_core.adapter.folder import read_folder
from steer_core.adapter.record import SteeringRecord
from steer_core.constants import (
    ADAPTER_CONFIG_FILENAME,
    ADAPTER_WEIGHTS_BIN_FILENAME,
    ADAPTER_WEIGHTS_FILENAME,
    STEERING_JSON_FILENAME,
    STEERING_VECTOR_FILENAME,
)
from steer_core.steer import LowRank, RowSteering, lowrank_updates
from steer_core.vectors.vector import SteeringVector

# LoRA variants whose forward pass is not scaling·B(A·x) on a plain module; a served preview refuses them.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "target_parameters": "LoRA on parameters (target_parameters)",
}
# What a module-name key of alpha_pattern and rank_pattern may hold: PEFT reads the keys as regular expressions, and a
# visitor's adapter could make one that backtracks for hours; this server matches them as names, exactly.
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.")
_PEFT_PREFIX = "base_model.model."


MAX_ENGINE_SCALE = 4.0  # past it a steering vector is far outside what any export checked (constants.ENGINE_SCALES)


def check_engine_scale(value: Any) -> float:
    """An engine's per-request LoRA scale as a float, or an error naming the bad value and the range."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_ENGINE_SCALE:
        raise ValueError(f"the engine scale must be a number from 0 to {MAX_ENGINE_SCALE:g}, got {value!r}")
    return float(value)


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

    def at(self, scale: float) -> ServedAdapter:
        """The adapter at an engine's per-request scale: every module's scaling (and LoRA bias) times `scale`, as
        llama-server applies `"lora": [{"id": i, "scale": scale}]`."""
        if scale == 1:
            return self
        return dataclasses.replace(
            self,
            scaling={k: v * scale for k, v in self.scaling.items()},
            biases={k: b * scale for k, b in self.biases.items()},
        )

    @contextmanager
    def applied(self, model: nn.Module, rows: Sequence[int] | None = None) -> Iterator[None]:
        """The adapter on `model` in this context (on these batch rows only, when given)."""
        self.check_modules(model)
        with lowrank_updates(model, self.params, scaling=self.scaling, biases=self.biases, rows=rows):
            yield

    def row(self, model: nn.Module) -> RowSteering:
        """The adapter as one row of `steer.batch_steering` on `model` (one object per adapter: rows holding the
        same one share its computation)."""
        self.check_modules(model)
        return RowSteering(lowrank=LowRank(self.params, self.scaling, self.biases))

    def check_modules(self, model: nn.Module) -> None:
        missing = [name for name in self.params if not _has_module(model, name)]
        if missing:
            raise ValueError(
                f"{self.source} targets {missing[0]}, which this model ({type(model).__name__}) does not have: "
                f"the adapter was made for {self.base_model or 'another model'}"
            )


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def read_adapter(source: str | Path, *, token: str | bool | None = None, cache_dir: str | None = None) -> ServedAdapter:
    """Read an adapter (PEFT format, LoRA): a local folder with `read_folder`, or a Hub repo with `read_hub_adapter`
    (`token` and `cache_dir` for the Hub's requests: steer_core.hub.Access), within steer_core.hub's default caps."""
    where = str(source)
    if Path(where).is_dir():
        files = read_folder(where)
        return _served(where, _lora_config(where, files.config), files.tensors, files.record, files.vector)
    return read_hub_adapter(where, token=token, cache_dir=cache_dir)


def read_hub_adapter(
    repo_id: str,
    *,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    weights_bytes: int | None = None,
    limits: Any = None,
) -> ServedAdapter:
    """A Hub adapter read as a folder is (`read_folder`: steering.json and the hook vector come along where the
    repo has them), from exactly the files it needs at one commit: the repo's listing is read first, with each file's
    size, and each file is refused over its cap (`weights_bytes` for the weights, None: no cap;
    steer_core.hub.HubLimits for the others) before anything downloads. They download into a temporary folder of this
    read's, removed once read, so none of them stays in a cache (`cache_dir`, a visitor's own, is where
    huggingface_hub keeps its bookkeeping)."""
    from huggingface_hub import hf_hub_download

    from steer_core.hardware import format_bytes
    from steer_core.hub import HUB_LIMITS, check_files, check_repo_id, hub_api

    limits = limits or HUB_LIMITS
    check_repo_id(repo_id, "a Hub adapter repo")
    info = hub_api(token).model_info(repo_id, files_metadata=True)
    sha = str(info.sha)
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    if ADAPTER_CONFIG_FILENAME not in sizes:
        raise ValueError(f"{repo_id}: not a PEFT LoRA adapter (a Hub repo with {ADAPTER_CONFIG_FILENAME}): it has none")
    weights = next((f for f in (ADAPTER_WEIGHTS_FILENAME, ADAPTER_WEIGHTS_BIN_FILENAME) if f in sizes), None)
    if weights is None:
        raise ValueError(f"{repo_id} has no {ADAPTER_WEIGHTS_FILENAME} or {ADAPTER_WEIGHTS_BIN_FILENAME}: not a PEFT "
                         "adapter repo")  # fmt: skip
    if weights_bytes is not None and sizes[weights] > weights_bytes:
        raise ValueError(f"{repo_id}'s weights are {format_bytes(sizes[weights])}: this server previews adapters up "
                         f"to {format_bytes(weights_bytes)}")  # fmt: skip
    small = {f: sizes[f] for f in (ADAPTER_CONFIG_FILENAME, STEERING_JSON_FILENAME) if f in sizes}
    check_files(repo_id, small, limits, configs=tuple(small))
    if sizes.get(STEERING_VECTOR_FILENAME, 0) > limits.vector_bytes:
        raise ValueError(
            f"{repo_id}'s {STEERING_VECTOR_FILENAME} is {format_bytes(sizes[STEERING_VECTOR_FILENAME])}: this server "
            f"reads hook vectors up to {format_bytes(limits.vector_bytes)}"
        )
    wanted = [*small, weights, *([STEERING_VECTOR_FILENAME] if STEERING_VECTOR_FILENAME in sizes else [])]
    # Into a folder of this read's own: the repo's snapshot folder in a shared cache may hold other files of the same
    # commit that an earlier read downloaded, and read_folder reads what the folder holds.
    with tempfile.TemporaryDirectory(prefix="steer-adapter-") as tmp:
        for file in wanted:
            hf_hub_download(repo_id, file, revision=sha, token=token, cache_dir=cache_dir, local_dir=tmp)
        try:
            files = read_folder(tmp)
        except ValueError as err:  # its messages name this server's temp folder; the visitor knows the repo
            raise ValueError(str(err).replace(tmp, repo_id)) from err
        return _served(repo_id, _lora_config(repo_id, files.config), files.tensors, files.record, files.vector)


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
    _check_patterns(where, config)
    params: dict[str, tuple[Tensor, Tensor]] = {}
    scaling: dict[str, float] = {}
    biases: dict[str, Tensor] = {}
    for key, a in sorted(weights.items()):
        parsed = _lora_a_key(key)
        if parsed is None:
            continue
        name, partner = parsed
        b = weights.get(partner)
        if b is None:
            raise ValueError(f"{where}: {key} has no lora_B partner")
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: {name} has lora_A rank {a.shape[0]} but lora_B rank {b.shape[1]}")
        params[name] = (a.float(), b.float())
        if (bias := weights.get(partner.removesuffix(".weight") + ".bias")) is not None:
            biases[name] = bias.float()
        scaling[name] = _scaling(config, name, a.shape[0])
    return ServedAdapter(where, params, scaling, biases, str(config.base_model_name_or_path or ""), record, vector)


def _lora_a_key(key: str) -> tuple[str, str] | None:
    """(module name, its lora_B weight's key) of a PEFT lora_A weight key ([base_model.model.]NAME.lora_A[.ADAPTER]
    .weight), else None. String operations, not a regex: the keys are the adapter's, of any length."""
    if not key.endswith(".weight"):
        return None
    head, found, tail = key.rpartition(".lora_A")
    adapter = tail.removesuffix(".weight")
    if not found or not head or not (adapter == "" or (adapter[:1] == "." and _is_word(adapter[1:]))):
        return None
    name = head.removeprefix(_PEFT_PREFIX) or head
    return name, f"{head}.lora_B{tail}"


def _is_word(text: str) -> bool:
    return bool(text) and all(c.isascii() and (c.isalnum() or c == "_") for c in text)


def _check_patterns(where: str, config: LoraConfig) -> None:
    """alpha_pattern and rank_pattern keys must be module names (or dot-separated suffixes of them): PEFT would run
    them as regular expressions, which a visitor's adapter could make backtrack for hours."""
    for field_name in ("alpha_pattern", "rank_pattern"):
        for key in getattr(config, field_name, None) or {}:
            if not (isinstance(key, str) and key and len(key) <= 1000 and _NAME_CHARS.issuperset(key)):
                shown = key[:60] + "..." if isinstance(key, str) and len(key) > 60 else key
                raise ValueError(
                    f"{where}: {ADAPTER_CONFIG_FILENAME}'s {field_name} key {shown!r} uses a regex pattern (or is not "
                    "a module name); this server matches module names exactly: keys may hold letters, digits, '_' "
                    "and '.' only, such as 'q_proj' or 'model.layers.3.mlp.down_proj'"
                )


def _matches(key: str, name: str) -> bool:
    """PEFT's get_pattern_key for a key that is a plain name: the module itself, or a dot-separated suffix of it."""
    return name == key or name.endswith("." + key)


def _scaling(config: LoraConfig, name: str, rank: int) -> float:
    """PEFT's: lora_alpha / r (or / sqrt(r) with rsLoRA), with the per-module alpha pattern, whose first key that
    matches the module wins, as in PEFT (get_pattern_key). The keys are names (_check_patterns), matched exactly."""
    alpha = float(config.lora_alpha)
    for key, value in (config.alpha_pattern or {}).items():
        if _matches(key, name):
            alpha = float(value)
            break
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
