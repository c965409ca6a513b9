"""Damaged adapter folders and oversized requests: one clear message naming the file or the limit, nothing half-run."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import pytest
import torch
from safetensors.torch import load_file, save_file

import app
from helpers import D_MODEL, tiny_lm
from steer_core.cli import main
from steer_core.export import export
from steer_core.generate import GenerationConfig, complete
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the tiny model's folder, a good adapter exported on it)."""
    root = tmp_path_factory.mktemp("faults")
    lm = tiny_lm("llama")
    lm.model.save_pretrained(root / "base")
    lm.tokenizer.save_pretrained(root / "base")
    from steer_core.model import load_model

    on_disk = load_model(str(root / "base"))  # base_model_id is the folder, as a user's --model gives it
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3}, {"source": "test"})
    good = export(on_disk, vec, root / "good", calibration_tokens=512, verify_tokens=256).folder
    return root / "base", good


def _truncated(f: Path) -> None:
    data = (f / WEIGHTS).read_bytes()
    (f / WEIGHTS).write_bytes(data[: len(data) // 2])


def _other_base(f: Path) -> None:
    config = json.loads((f / "adapter_config.json").read_text())
    (f / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-3.1-8B"}))


def _rank(f: Path) -> None:
    tensors = load_file(str(f / WEIGHTS))
    save_file({k: torch.cat([v, v]) if "lora_A" in k else v for k, v in tensors.items()}, str(f / WEIGHTS))


def _nan(f: Path) -> None:
    tensors = load_file(str(f / WEIGHTS))
    save_file({k: v * float("nan") if "lora_B" in k else v for k, v in tensors.items()}, str(f / WEIGHTS))


def _shape(f: Path) -> None:
    tensors = load_file(str(f / WEIGHTS))
    save_file({k: v[:, :-1].contiguous() if "lora_A" in k else v for k, v in tensors.items()}, str(f / WEIGHTS))


DAMAGE: list[tuple[Callable[[Path], None], str]] = [
    (_truncated, rf"{WEIGHTS} is damaged or truncated"),
    (_other_base, "adapter_config.json names base model 'meta-llama/Llama-3.1-8B', but the model loaded is"),
    (_rank, rf"{WEIGHTS}: .*lora_A.weight has rank 2, but adapter_config.json says r=1"),
    (_nan, rf"{WEIGHTS}: adapter tensor .*lora_B.weight has non-finite values"),
    (_shape, rf"{WEIGHTS} does not fit this model: .*size mismatch"),
]


@pytest.mark.parametrize(("damage", "message"), DAMAGE, ids=[d.__name__.strip("_") for d, _ in DAMAGE])
@pytest.mark.parametrize("command", ["verify", "generate"])
def test_a_damaged_adapter_folder_gets_one_message_naming_the_file(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, damage, message: str, command: str
) -> None:
    base, good = folders
    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    damage(folder)
    args = ["--adapter", str(folder), "--tokens", "256"] if command == "verify" else \
        ["--adapter", str(folder), "--prompt", "hi", "--max-new-tokens", "4"]  # fmt: skip
    assert main([command, "--model", str(base), *args]) == 1
    out = capsys.readouterr()
    assert out.out == "", "nothing generated or reported before the error"
    errors = [line for line in out.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(folder) in errors[0], out.err  # one message (no traceback), naming the file
    assert re.search(message, errors[0]), errors[0]


def test_the_good_folder_passes(folders: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    base, good = folders
    assert main(["verify", "--model", str(base), "--adapter", str(good), "--tokens", "256"]) == 0
    assert "top-1 agreement" in capsys.readouterr().out


def test_a_prompt_past_the_context_is_refused_with_the_limit() -> None:
    lm = tiny_lm("llama")  # max_position_embeddings 512
    with pytest.raises(ValueError, match=r"past this model's context of 512 tokens; .*ask for at most \d+ new"):
        complete(lm, "hello " * 600, config=GenerationConfig(8))
    with pytest.raises(ValueError, match=r"and 512 new tokens were asked for: \d+ in all, past this model's context"):
        complete(lm, "x", config=GenerationConfig(512))
    assert complete(lm, "hello", config=GenerationConfig(8))  # and the model keeps working


def test_the_app_names_the_limit_too() -> None:
    app.workspace.forget_model("tiny")
    app._models["tiny"] = tiny_lm("llama")
    contrastive = ["Contrastive prompts", "", "", "", 1.0, "× residual norm", "I love it\nso good",
                   "I hate it\nso bad", 1, "resid_post", None]  # fmt: skip
    with pytest.raises(gr.Error, match="context of 512 tokens"):  # within the server's prompt limit, past the model's
        list(app.preview("tiny", "hello " * 100, 8, 0, 0, "", 1, *contrastive))
    with pytest.raises(gr.Error, match="max new tokens must be between 1 and 256 on this server, got 5000"):
        list(app.preview("tiny", "hello", 5000, 0, 0, "", 1, *contrastive))


def test_a_full_disk_leaves_nothing_under_out(folders: tuple[Path, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    """The weights' write fails half way (ENOSPC): one message, no folder at --out, no temp folder beside it."""
    import errno

    from safetensors.torch import save_file as real_save

    def full_disk(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # what a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr("steer_core.adapter.build.save_file", full_disk)
    base, _ = folders
    vector = tmp_path / "v.safetensors"
    real_save({"v": torch.randn(D_MODEL)}, str(vector))
    out = tmp_path / "out" / "adapter"
    argv = ["export", "--model", str(base), "--out", str(out), "--vector", str(vector), "--layer", "1",
            "--calibration-tokens", "512", "--verify-tokens", "256"]  # fmt: skip
    assert main(argv) == 1
    assert "error: [Errno 28] No space left on device" in capsys.readouterr().err
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.undo()
    assert main(argv) == 0 and (out / WEIGHTS).is_file()  # and the next export works


def test_an_export_stopped_midway_leaves_no_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping an export (the progress callback raises, as a cancelled job does) removes its temp folder."""
    import asyncio
    import tempfile

    app.workspace.forget_model("tiny")
    app._models["tiny"] = tiny_lm("llama")
    contrastive = ["Contrastive prompts", "", "", "", 1.0, "× residual norm", "I love it\nso good",
                   "I hate it\nso bad", 1, "resid_post", None]  # fmt: skip
    before = set(Path(tempfile.gettempdir()).glob("steer-export-*"))

    def cancel(fraction: float, desc: str = "") -> None:
        if "verifying" in desc:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        app.run_export("tiny", "portable", 1024, 0, "peft", *contrastive, progress=cancel)
    assert not set(Path(tempfile.gettempdir()).glob("steer-export-*")) - before  # (older ones may be pruned meanwhile)
    *_, folder, _ = app.run_export("tiny", "portable", 1024, 0, "peft", *contrastive, progress=lambda *a, **k: None)
    assert Path(folder, WEIGHTS).is_file()
