"""The one reader of adapter folders: every file read once, and a missing or damaged one named with what is valid."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import D_MODEL, tiny_lm
from steer_core.adapter.folder import MissingFileError, read_folder
from steer_core.adapter.served import read_adapter
from steer_core.check.verify import read_adapter_files
from steer_core.constants import (
    ADAPTER_CONFIG_FILENAME,
    ADAPTER_WEIGHTS_BIN_FILENAME,
    ADAPTER_WEIGHTS_FILENAME,
    STEERING_JSON_FILENAME,
    STEERING_VECTOR_FILENAME,
)
from steer_core.export import export
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3}, {"source": "test"})
    out = tmp_path_factory.mktemp("folder") / "a"
    return export(tiny_lm("llama"), vec, out, calibration_tokens=512, verify_tokens=256).folder


def _copy(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def test_an_export_reads_back_whole_and_checked(exported: Path) -> None:
    files = read_folder(exported, ours=True).checked("tiny-llama")
    assert files.config["r"] == 1 and files.weights_path == exported / ADAPTER_WEIGHTS_FILENAME
    assert files.tensors.keys() == load_file(str(exported / ADAPTER_WEIGHTS_FILENAME)).keys()
    record, vector = files.steering()
    assert record.mode == "portable" and list(vector.directions) == [HookPoint(1, "resid_post")]
    config, tensors = read_adapter_files(exported)  # the command line's name for the same read
    assert config == files.config and tensors.keys() == files.tensors.keys()


@pytest.mark.parametrize("name", [ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME])
def test_a_missing_peft_file_is_named_with_what_a_folder_holds(exported: Path, tmp_path: Path, name: str) -> None:
    folder = _copy(exported, tmp_path)
    (folder / name).unlink()
    with pytest.raises(
        MissingFileError, match=rf"{folder / name} is missing: not a PEFT LoRA adapter folder, which holds"
    ) as err:
        read_folder(folder)
    # both kinds: the command line catches OSError, the app and the preview ValueError
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match=rf"{name} is missing"):
        read_adapter(folder)


def test_steering_files_are_optional_unless_the_folder_must_be_ours(exported: Path, tmp_path: Path) -> None:
    folder = _copy(exported, tmp_path)
    (folder / STEERING_VECTOR_FILENAME).unlink()
    files = read_folder(folder)
    assert files.record is not None and files.vector is None
    with pytest.raises(MissingFileError, match=rf"{STEERING_VECTOR_FILENAME} is missing: an adapter exported by"):
        read_folder(folder, ours=True)
    (folder / STEERING_JSON_FILENAME).unlink()
    assert read_folder(folder).record is None  # any PEFT LoRA folder reads, for the served preview
    with pytest.raises(FileNotFoundError, match=f"has no {STEERING_JSON_FILENAME}"):
        read_folder(folder, ours=True)


def test_bad_json_and_bad_vectors_are_named(exported: Path, tmp_path: Path) -> None:
    folder = _copy(exported, tmp_path)
    (folder / ADAPTER_CONFIG_FILENAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{ADAPTER_CONFIG_FILENAME} is not a JSON object"):
        read_folder(folder)
    (folder / ADAPTER_CONFIG_FILENAME).write_text("{")
    with pytest.raises(ValueError, match=f"{ADAPTER_CONFIG_FILENAME} is not valid JSON"):
        read_folder(folder)
    shutil.copy(exported / ADAPTER_CONFIG_FILENAME, folder)
    (folder / STEERING_VECTOR_FILENAME).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"{STEERING_VECTOR_FILENAME} is not a steering vector"):
        read_folder(folder)


def test_peft_older_bin_weights_read_as_the_safetensors_do(exported: Path, tmp_path: Path) -> None:
    folder = _copy(exported, tmp_path)
    weights = load_file(str(folder / ADAPTER_WEIGHTS_FILENAME))
    torch.save(weights, folder / ADAPTER_WEIGHTS_BIN_FILENAME)
    (folder / ADAPTER_WEIGHTS_FILENAME).unlink()
    files = read_folder(folder)
    assert files.weights_path.name == ADAPTER_WEIGHTS_BIN_FILENAME
    assert all(torch.equal(files.tensors[k], v) for k, v in weights.items())
    served, original = read_adapter(folder), read_adapter(exported)
    assert served.scaling == original.scaling and served.params.keys() == original.params.keys()
