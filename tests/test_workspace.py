import os
import threading
from pathlib import Path

import pytest

from helpers import build_sae, tiny_lm
from steer_core.catalog import SAEChoice, folder_choice
from steer_core.recipe import VectorRecipe
from steer_core.workspace import Workspace, prune_work_folders


def test_each_model_loads_once_even_when_asked_concurrently() -> None:
    calls: list[str] = []

    def loader(name: str):
        calls.append(name)
        return tiny_lm("llama")

    ws = Workspace(loader)
    threads = [threading.Thread(target=ws.model, args=("m",)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["m"] and ws.model(" m ") is ws.models["m"]
    with pytest.raises(ValueError, match="no model chosen"):
        ws.model(" ")


def test_vectors_and_labels_are_built_once_and_forgotten_with_their_model(tmp_path: Path) -> None:
    ws = Workspace(lambda _n: tiny_lm("llama"))
    lm = ws.model("m")
    sae = folder_choice(str(build_sae(tmp_path / "sae", d_sae=8)))
    recipe = VectorRecipe("sae", (2.0,), "resid", path=sae.path, features=(1,))
    assert ws.vector(lm, recipe) is ws.vector(lm, recipe)
    labels = ws.labels(sae, lm)
    assert set(labels.labels) == set(range(8)) and ws.labels(sae, lm) is labels
    ws.forget_model("m")
    assert ws.models == {} and ws.vector(ws.model("m"), recipe) is not None


def test_sae_must_fit_the_model_and_missing_embedded_sae_is_named(tmp_path: Path) -> None:
    ws = Workspace(lambda _n: tiny_lm("llama"))
    wide = folder_choice(str(build_sae(tmp_path / "wide", d_in=48)))
    with pytest.raises(ValueError, match="d_in=48"):
        ws.sae(wide, ws.model("m"))
    missing = SAEChoice("embedded: x (offline)", path=str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="embedded SAE is not in this install"):
        ws.sae(missing)


def test_old_export_and_control_vector_folders_are_pruned_and_recent_ones_stay(tmp_path: Path) -> None:
    now = 1_000_000.0
    ages = {"steer-export-old": 7200, "steer-cv-old": 3601, "steer-export-new": 600, "steer-cv-new": 0,
            "other-old": 7200}  # fmt: skip
    for name, age in ages.items():
        (tmp_path / name / "adapter").mkdir(parents=True)
        (tmp_path / name / "adapter" / "w.bin").write_bytes(b"x")
        os.utime(tmp_path / name, (now - age, now - age))
    old_file = tmp_path / "steer-export-file"  # not a folder the app made: left alone
    old_file.write_text("x")
    os.utime(old_file, (now - 7200, now - 7200))
    removed = prune_work_folders(tmp_path, now=now)
    assert sorted(p.name for p in removed) == ["steer-cv-old", "steer-export-old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-old", "steer-cv-new", "steer-export-file",
                                                          "steer-export-new"]  # fmt: skip
    assert prune_work_folders(tmp_path, now=now) == []
    assert len(prune_work_folders(tmp_path, now=now + 3601)) == 2  # an hour later the recent ones go too
