"""An adapter folder read back from disk, each file once: PEFT's config and weights, and, where steer_core wrote the
folder, steering.json and the hook vector the adapter stands for.

Every reader of a folder (verify, the served preview and the GGUF writer through it, publish) starts here, so a
missing or damaged file gets the same message wherever it is met: its path, what is wrong with it, and what a valid
folder holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from steer_core.adapter.build import check_tensors
from steer_core.adapter.record import SteeringRecord, read_json, read_record
from steer_core.constants import (
    ADAPTER_CONFIG_FILENAME,
    ADAPTER_WEIGHTS_BIN_FILENAME,
    ADAPTER_WEIGHTS_FILENAME,
    STEERING_JSON_FILENAME,
    STEERING_VECTOR_FILENAME,
)
from steer_core.vectors.vector import SteeringVector

_HOLDS = f"not a PEFT LoRA adapter folder, which holds {ADAPTER_CONFIG_FILENAME} and {ADAPTER_WEIGHTS_FILENAME}"
_OURS = f"an adapter exported by steer_core also holds {STEERING_JSON_FILENAME} and {STEERING_VECTOR_FILENAME}"


class MissingFileError(FileNotFoundError, ValueError):
    """A file an adapter folder needs is not there. Both kinds, so that the command line's handler (OSError) and the
    app's and the preview's (ValueError) each turn it into their one message."""


@dataclass(frozen=True)
class AdapterFolder:
    """What `read_folder` read; `checked` and `steering` are what verify asks of it beyond that."""

    path: Path
    config: dict[str, Any]  # adapter_config.json as written
    tensors: dict[str, Tensor]  # the LoRA weights, on the CPU, in the dtype they were saved in
    weights_path: Path  # adapter_model.safetensors, or PEFT's older adapter_model.bin where only that is there
    record: SteeringRecord | None = None  # None: the folder was not exported by steer_core
    vector: SteeringVector | None = None

    @property
    def config_path(self) -> Path:
        return self.path / ADAPTER_CONFIG_FILENAME

    def steering_record(self) -> SteeringRecord:
        if self.record is None:
            raise MissingFileError(f"{self.path / STEERING_JSON_FILENAME} is missing: {_OURS}")
        return self.record

    def steering(self) -> tuple[SteeringRecord, SteeringVector]:
        """steering.json and the hook vector, which verify compares the adapter with."""
        record = self.steering_record()
        if self.vector is None:
            raise MissingFileError(f"{self.path / STEERING_VECTOR_FILENAME} is missing: {_OURS}")
        return record, self.vector

    def checked(self, base_model: str | None = None) -> AdapterFolder:
        """This folder, once its weights are non-empty, finite, not all zero and of the rank its config declares, and
        (given `base_model`) it was made for that model; else an error naming the file and why. The served preview
        reads any PEFT LoRA unchecked; what is verified or loaded into PEFT is checked first."""
        try:
            check_tensors(self.tensors)
        except ValueError as err:
            raise ValueError(f"{self.weights_path}: {err}") from err
        rank, patterns = self.config.get("r"), self.config.get("rank_pattern") or {}
        for key, t in self.tensors.items():
            if key.endswith("lora_A.weight") and not patterns and t.shape[0] != rank:
                raise ValueError(
                    f"{self.weights_path}: {key} has rank {t.shape[0]}, but {ADAPTER_CONFIG_FILENAME} says r={rank}"
                )
        named = self.config.get("base_model_name_or_path")
        if base_model and named and named != base_model:
            raise ValueError(
                f"{self.config_path} names base model {named!r}, but the model loaded is {base_model!r}: load the "
                "adapter on the model it was made for (--model)"
            )
        return self


def read_folder(folder: str | Path, *, ours: bool = False) -> AdapterFolder:
    """Every file of the adapter folder, read once, or an error naming the file that is missing, unreadable or
    truncated. steering.json and the hook vector are read where they are there; with `ours` they must be (a folder
    steer_core exported), and are read first, so that a folder from elsewhere is named as such before its weights."""
    path = Path(folder)
    record = read_record(path) if ours or (path / STEERING_JSON_FILENAME).is_file() else None
    vector = _read_vector(path / STEERING_VECTOR_FILENAME, required=ours)
    config_path = path / ADAPTER_CONFIG_FILENAME
    if not config_path.is_file():
        raise MissingFileError(f"{config_path} is missing: {_HOLDS}")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object of LoRA settings (r, lora_alpha, target_modules, ...)")
    weights_path, tensors = _read_weights(path)
    return AdapterFolder(path, config, tensors, weights_path, record, vector)


def _read_weights(folder: Path) -> tuple[Path, dict[str, Tensor]]:
    path = folder / ADAPTER_WEIGHTS_FILENAME
    if not path.is_file() and (folder / ADAPTER_WEIGHTS_BIN_FILENAME).is_file():
        path = folder / ADAPTER_WEIGHTS_BIN_FILENAME  # PEFT still loads its older format, so the preview reads it too
    if not path.is_file():
        raise MissingFileError(f"{folder / ADAPTER_WEIGHTS_FILENAME} is missing: {_HOLDS}")
    try:
        if path.name == ADAPTER_WEIGHTS_FILENAME:
            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise their own error types for truncated or corrupt files
        raise ValueError(f"{path} is damaged or truncated ({err}); export the adapter again") from err
    if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise ValueError(f"{path} holds no PEFT state dict (names to tensors)")
    return path, tensors


def _read_vector(path: Path, *, required: bool) -> SteeringVector | None:
    if not path.is_file():
        if required:
            raise MissingFileError(f"{path} is missing: {_OURS}")
        return None
    try:
        return SteeringVector.load(path)
    except Exception as err:  # safetensors' own error type, or a key that names no hook point
        raise ValueError(f"{path} is not a steering vector steer_core reads ({err}); export the adapter again") from err
