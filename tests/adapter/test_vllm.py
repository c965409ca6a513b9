"""vLLM's own LoRA loader (PEFTHelper + LoRAModel, in vLLM's environment: scripts/vllm_venv.sh) on our exports: the
peft and fireworks targets and the ablate mode load with their rank and modules and the very weights we wrote; the
exact mode's LoRA bias is refused by vLLM itself, as the targets say."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core.export import export
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector

pytestmark = pytest.mark.e2e  # vLLM's environment is large; made once per machine by test.sh
ROOT = Path(__file__).resolve().parents[2]


def test_vllms_loader_takes_our_adapters(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3}, {"source": "test"})
    kinds = {"peft": ("portable", "peft"), "fireworks": ("portable", "fireworks"), "ablate": ("ablate", "peft"),
             "exact": ("exact", "peft")}  # fmt: skip
    folders = {}
    for name, (mode, target) in kinds.items():
        folders[name] = export(lm, vec, tmp_path / name, mode=mode, target=target, calibration_tokens=512,
                               verify_tokens=256).folder  # type: ignore[arg-type]  # fmt: skip
    # The attention writer: an attn_out vector's exact writer, and a resid_post vector's next-block candidate
    attn = SteeringVector({HookPoint(1, "attn_out"): torch.randn(D_MODEL) * 3}, {"source": "test"})
    folders["attn_out"] = export(lm, attn, tmp_path / "attn_out", calibration_tokens=512, verify_tokens=256).folder
    folders["next"] = export(
        lm, vec, tmp_path / "next", calibration_tokens=512, verify_tokens=256, writer="next"
    ).folder
    folders["split"] = export(
        lm, vec, tmp_path / "split", calibration_tokens=512, verify_tokens=256, writer="split"
    ).folder
    venv = subprocess.run(["bash", str(ROOT / "scripts/vllm_venv.sh")], check=True, capture_output=True, text=True)
    out = subprocess.run(
        [f"{venv.stdout.strip()}/bin/python", str(ROOT / "scripts/vllm_load.py"), *map(str, folders.values())],
        check=True, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    results = dict(zip(folders, json.loads(out.stdout.strip().splitlines()[-1]), strict=True))
    print(json.dumps(results, indent=1))
    for name, rank in (("peft", 1), ("fireworks", 4), ("ablate", 1)):
        r = results[name]
        assert r["loaded"] and r["rank"] == rank and r["scaling"] == 1.0, r
        written = json.loads((folders[name] / "steering.json").read_text())["target_modules"]
        assert list(r["modules"]) == written or name == "ablate", r
        assert all(m["rank"] == rank and m["a_equal"] and m["b_equal"] for m in r["modules"].values()), r
    own, attn = "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj"
    # PEFT's config names module kinds and layers, so the split adapter also holds zero updates at their crossings
    for name, modules in (("attn_out", ["model.layers.1.self_attn.o_proj"]), ("next", [attn]), ("split", [own, attn])):
        r = results[name]
        assert r["loaded"] and set(modules) <= set(r["modules"]), r
        assert name == "split" or len(r["modules"]) == 1, r
        assert all(m["rank"] == 1 and m["a_equal"] and m["b_equal"] for m in r["modules"].values()), r
    assert not results["exact"]["loaded"] and "LoRA bias" in results["exact"]["error"], results["exact"]
