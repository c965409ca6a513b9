"""Handler-level tests of app.py on a tiny model (the UI is thin wiring; the logic is tested in steer_core)."""

import zipfile
from pathlib import Path

import gradio as gr
import pytest

import app
from helpers import tiny_lm

POS, NEG = "I love it\nso good", "I hate it\nso bad"


@pytest.fixture(autouse=True)
def tiny_model() -> None:
    app._models["tiny"] = tiny_lm("llama")


def _vector_args(strength: float = 1.0, source: str = "Contrastive prompts") -> list:
    return [source, POS, NEG, 1, "resid_post", "", "", "", "", None, strength, "× residual norm"]


def test_preview_streams_both_sides() -> None:
    outputs = list(app.preview("tiny", "hello", 8, 0, 0, *_vector_args(3.0)))
    base, steered = outputs[-1]
    assert base and steered
    assert outputs[0][1] == ""  # the unsteered side streams first


def test_export_gives_report_zip_and_card(tmp_path: Path) -> None:
    summary, plot, archive, card, folder = app.run_export(
        "tiny", "exact", 1024, 0, *_vector_args(), progress=lambda *a, **k: None
    )
    assert "top-1 next-token agreement: **100.0%**" in summary
    assert len(plot) > 0 and "library_name: peft" in card
    names = zipfile.ZipFile(archive).namelist()
    assert {"adapter_config.json", "adapter_model.safetensors", "steering.json", "README.md"} <= set(names)
    assert Path(folder, "steering.json").exists()


def test_control_vector_download() -> None:
    path = app.run_control_vector("tiny", *_vector_args())
    assert path.endswith(".gguf") and Path(path).stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["tiny", " ", 8, 0, 0, *_vector_args()], "prompt is empty"),
        (["tiny", "hi", 8, 0, 0, *_vector_args(float("nan"))], "finite"),
        (["tiny", "hi", 8, 0, 0, *_vector_args(source="SAE feature")], "SAE"),
        (["", "hi", 8, 0, 0, *_vector_args()], "Pick or type a model"),
    ],
)
def test_bad_inputs_become_clear_ui_errors(args: list, match: str) -> None:
    with pytest.raises(gr.Error, match=match):
        list(app.preview(*args))


def test_push_refuses_without_an_export() -> None:
    with pytest.raises(gr.Error, match="Export an adapter first"):
        app.run_push("", "me/x", True, "")


def test_compare_with_sae_features(tmp_path: Path) -> None:
    from helpers import build_sae

    sae = build_sae(tmp_path / "sae", hook_name="blocks.1.hook_resid_post")
    args = _vector_args()
    args[5] = str(sae)
    text = app.run_compare("tiny", *args)
    assert "× median residual norm" in text and text.count("- feature") == 10
    with pytest.raises(gr.Error, match="SAE folder"):
        app.run_compare("tiny", *_vector_args())
