"""The servability map: each cell a miniature export, measured as verify measures, and what it recommends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import D_MODEL, tiny_lm
from steer_core.check.servability import MapCell, ServabilityMap, map_cells, servability_map
from steer_core.cli import main
from steer_core.export import export
from steer_core.vectors.recipe import VectorRecipe


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vec") / "v.safetensors"
    save_file({"v": torch.randn(D_MODEL, generator=torch.Generator().manual_seed(3)) * 4}, str(path))
    return path


def test_a_cell_predicts_what_the_export_of_that_cell_measures(vector_file: Path, tmp_path: Path) -> None:
    """Same calibration, same held-out tokens: the map's hook-applied update and verify's PEFT-loaded adapter agree."""
    lm = tiny_lm("llama")
    recipe = VectorRecipe("file", (1.0,), "abs", path=str(vector_file), layer=1)
    result = servability_map(lm, recipe, layers=[0, 2], calibration_tokens=512, eval_tokens=512)
    assert [c.layer for c in result.cells] == [0, 1, 2] and result.varies == "layer" and result.chosen == (1, 1.0)
    cell = result.cells[1]
    report = export(lm, recipe.build(lm), tmp_path / "a", calibration_tokens=512, verify_tokens=512).report
    assert cell.tokens == report.tokens
    assert abs(cell.top1 - report.top1_agreement) <= 1 / report.tokens, (cell, report.summary())
    assert cell.kl_ratio == pytest.approx(report.kl_ratio, rel=1e-3)
    assert "predicted top-1" in result.recommendation() and "control vector" in result.recommendation()


def test_map_cells_move_layers_or_strengths(vector_file: Path) -> None:
    lm = tiny_lm("llama")
    layered = map_cells(VectorRecipe("file", (2.0,), "abs", path=str(vector_file), layer=1), lm)
    assert [r.layer for r in layered] == [0, 1, 2] and {r.strengths for r in layered} == {(2.0,)}
    strengths = map_cells(VectorRecipe("sae", (0.5, -1.0), "resid", features=(1, 2)), lm)
    assert [r.strengths for r in strengths] == [(0.125, -0.25), (0.25, -0.5), (0.5, -1.0), (1.0, -2.0), (2.0, -4.0)]
    with pytest.raises(ValueError, match=r"layers \[7\] are out of range: this model has layers 0..2"):
        map_cells(VectorRecipe("file", (1.0,), "abs", path=str(vector_file), layer=1), lm, layers=[7])


def test_map_cells_add_the_sites_asked_for(vector_file: Path) -> None:
    lm = tiny_lm("llama")
    recipe = VectorRecipe("file", (2.0,), "abs", path=str(vector_file), layer=1)
    cells = map_cells(recipe, lm, layers=[2], sites=["attn_out", "resid_post"])
    expected = [(1, "resid_post"), (2, "resid_post"), (1, "attn_out"), (2, "attn_out")]
    assert [(r.layer, r.site) for r in cells] == expected
    with pytest.raises(ValueError, match=r"sites \['mid'\] are not steering sites; choose from resid_pre"):
        map_cells(recipe, lm, sites=["mid"])
    with pytest.raises(ValueError, match="an sae vector's sites are fixed by its source"):
        map_cells(VectorRecipe("sae", (0.5,), "resid", features=(1,)), lm, sites=["attn_out"])


def test_a_map_over_sites_measures_each_site_where_its_writer_adds(vector_file: Path) -> None:
    """The attn_out cells are calibrated on o_proj (the site's exact writer) and say so in the recommendation."""
    lm = tiny_lm("llama")
    recipe = VectorRecipe("file", (1.0,), "abs", path=str(vector_file), layer=1)
    result = servability_map(lm, recipe, layers=[1], sites=["attn_out"], calibration_tokens=512, eval_tokens=512)
    assert [(c.layer, c.site) for c in result.cells] == [(1, "resid_post"), (1, "attn_out")]
    assert result.site == "resid_post" and result.cells[0].kl_ratio != result.cells[1].kl_ratio
    text = result.recommendation()
    assert text.startswith("Layer 1 (resid_post) at 1: predicted top-1")
    served_there = ServabilityMap(
        [MapCell(1, 1.0, 0.80, 0.05, 500), MapCell(1, 1.0, 0.98, 0.001, 500, "attn_out")], (1, 1.0), "layer", "abs", 1
    )
    assert "At attn_out 1, the same vector is predicted 98.0%: there the vector is added between block L's " in (
        served_there.recommendation()
    )


def _map(cells: list[tuple[int, float, float]], chosen: tuple[int, float], varies: str) -> ServabilityMap:
    return ServabilityMap([MapCell(la, s, t, 0.01, 500) for la, s, t in cells], chosen, varies, "resid", 1.0)


def test_recommendations() -> None:
    layers = _map([(2, 1, 0.70), (6, 1, 0.90), (9, 1, 0.97), (15, 1, 0.96), (22, 1, 0.99)], (6, 1), "layer")
    assert "Nearest servable layer: 9 " in layers.recommendation()
    strengths = _map([(15, 0.25, 0.99), (15, 0.5, 0.96), (15, 1, 0.90), (15, 2, 0.8)], (15, 1), "strength")
    assert "Strongest servable strength: 0.5 × resid norm" in strengths.recommendation()
    fine = _map([(15, 0.25, 0.99), (15, 0.5, 0.96), (15, 1, 0.90)], (15, 0.25), "strength")
    assert "servable." in fine.recommendation() and "Servable up to 0.5 × resid norm" in fine.recommendation()
    near = _map([(15, 0.5, 0.952), (15, 1, 0.87)], (15, 0.5), "strength")
    assert "Near the line" in near.recommendation() and "Near the line" not in fine.recommendation()
    none = _map([(2, 1, 0.70), (6, 1, 0.90)], (6, 1), "layer")
    assert "No layer on this map reaches 95%" in none.recommendation()
    assert none.to_dict()["cells"][0]["servable"] is False


def test_cli_map(tmp_path: Path, vector_file: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "tiny-llama"
    lm = tiny_lm("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    argv = ["map", "--model", str(folder), "--vector", str(vector_file), "--layer", "1", "--layers", "0",
            "--calibration-tokens", "256", "--eval-tokens", "512"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(chosen)" in out and "predicted top-1" in out and len(out.splitlines()) == 5
    with pytest.raises(SystemExit):
        main(["map", "--feature", "3", "--layers", "1", "--model", str(folder), "--sae-path", "x"])
    assert "--layers and --sites apply to --vector and --contrastive" in capsys.readouterr().err
    assert main([*argv[:-4], "--sites", "attn_out", "--calibration-tokens", "256", "--eval-tokens", "512"]) == 0
    out = capsys.readouterr().out
    assert out.count(" attn_out ") == 2 and out.count(" resid_post ") == 2, out
