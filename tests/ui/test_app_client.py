"""The launched app through its public API (gradio_client), as a script or another Space would call it."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator

import pytest
from gradio_client import Client

import app
from helpers import build_sae, tiny_lm
from steer_core.ui.form import SteeringForm


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, str]]:
    app.workspace.forget_model("tiny")
    app._models["tiny"] = tiny_lm("llama")
    sae = build_sae(tmp_path_factory.mktemp("sae") / "sae", d_sae=16, model_name="tiny-llama")
    app.serve(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)  # as main does: its queue and gate
    try:
        yield Client(app.demo.local_url, verbose=False), str(sae)
    finally:
        app.demo.close()


def _vector(sae: str, mix: str) -> list:
    return SteeringForm(sae_pick=None, sae_folder=sae, mix=mix, layer=1).values()


def test_preview_and_export_through_the_public_api(client: tuple[Client, str]) -> None:
    c, sae = client
    base, steered, _, info = c.predict("tiny", "hello", 8, 0, 0, "", 1, *_vector(sae, "3:8"), api_name="/preview")
    assert base and steered and base != steered and "vector norm" in info
    job = c.submit("tiny", "exact", 1024, 0, "peft", *_vector(sae, "3:8, 5:-2"), api_name="/run_export")
    summary, _plot, download, card, repo = job.result(timeout=300)  # the adapter folder is per-session state
    assert "Verified on" in summary and "library_name: peft" in card and repo.endswith("-f3-5-exact")
    assert {"adapter_config.json", "adapter_model.safetensors", "steering.json"} <= set(
        zipfile.ZipFile(download["value"] if isinstance(download, dict) else download).namelist()
    )


def test_bad_input_is_an_error_message_and_the_app_keeps_working(client: tuple[Client, str]) -> None:
    c, sae = client
    with pytest.raises(Exception, match="out of range"):
        c.predict("tiny", "hello", 8, 0, 0, "", 1, *_vector(sae, "99:8"), api_name="/preview")
    base, _, _, _ = c.predict("tiny", "hello", 8, 0, 0, "", 1, *_vector(sae, "3:8"), api_name="/preview")
    assert base
