"""The steering form: one ordered source for the app's inputs, and the recipe each source asks for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import app
from steer_core.ui.catalog import SAEChoice
from steer_core.ui.form import CONTRASTIVE, FIELDS, SAE_FEATURES, VECTOR_FILE, SteeringForm
from steer_core.ui.limits import SERVER_LIMITS
from steer_core.vectors.recipe import VectorRecipe

FOLDER = SAEChoice("folder: /x", path="/x")


def never() -> SAEChoice:
    raise AssertionError("only SAE features choose an SAE")


def test_the_page_passes_the_form_in_its_field_order() -> None:
    inputs = {fn.fn.__name__: fn.inputs for fn in app.page().fns.values() if fn.fn}  # type: ignore[union-attr]
    preview = [c.label for c in inputs["preview"][-len(FIELDS) :]]
    assert len(preview) == len(FIELDS) == len(dataclasses.fields(SteeringForm))
    assert preview[0] == "Steer with" and preview[-1].startswith("Vector file") and "Site" in preview
    assert {tuple(ids[-len(FIELDS) :]) for name, ids in inputs.items() if name in ("run_export", "run_map")} == {
        tuple(inputs["preview"][-len(FIELDS) :])
    }


def test_each_source_asks_for_its_recipe(tmp_path: Path) -> None:
    sae = SteeringForm(SAE_FEATURES, mix="3:2, 5", strength=0.5).recipe(lambda: FOLDER, SERVER_LIMITS)
    assert sae == VectorRecipe("sae", (2.0, 0.5), "resid", path="/x", features=(3, 5))
    form = SteeringForm(CONTRASTIVE, positive="good\n\n  \nfine", negative="bad", layer=2.0, site="attn_out")
    assert form.recipe(never, SERVER_LIMITS) == VectorRecipe(
        "contrastive", (1.0,), "resid", layer=2, site="attn_out", positive=("good", "fine"), negative=("bad",)
    )
    npy, gguf = tmp_path / "v.npy", tmp_path / "v.gguf"
    npy.write_bytes(b"x"), gguf.write_bytes(b"x")
    vector = SteeringForm(VECTOR_FILE, layer=3, vector_file=str(npy), unit="absolute (× decoder row)")
    assert vector.recipe(never, SERVER_LIMITS) == VectorRecipe("file", (1.0,), "abs", path=str(npy), layer=3)
    control = dataclasses.replace(vector, vector_file=str(gguf), unit="× residual norm")  # its layers from the file
    assert control.recipe(never, SERVER_LIMITS) == VectorRecipe("control_vector", (1.0,), "abs", path=str(gguf))


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"source": "Steering file"}, "'Steering file' is not one of SAE features, Contrastive prompts"),
        ({"source": CONTRASTIVE, "strength": float("inf")}, "finite"),
        ({"source": VECTOR_FILE}, "upload a vector file"),
        ({"source": SAE_FEATURES, "mix": ""}, "no feature chosen"),
        ({"source": CONTRASTIVE, "positive": "a", "negative": "b", "site": "resid_mid"}, "'resid_mid' is not one of"),
    ],
)
def test_a_bad_form_names_the_value(given: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SteeringForm(**given).recipe(lambda: FOLDER, SERVER_LIMITS)
