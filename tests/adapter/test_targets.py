"""Export targets: the rank-padded Fireworks adapter computes the same function; the GGUF LoRA is what llama.cpp's
own converter makes of our PEFT folder; targets that cannot load a mode refuse it before any work."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import D_MODEL, run_llama_cpp_script, tiny_lm
from steer_core.check.verify import load_peft
from steer_core.export import export
from steer_core.model import LoadedModel
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[2]


def _vec() -> SteeringVector:
    g = torch.Generator().manual_seed(5)
    return SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL, generator=g) * 3}, {"source": "test"})


def _export(lm: LoadedModel, out: Path, target: str, mode: str = "portable", **kwargs: Any):
    return export(lm, _vec(), out, mode=mode, calibration_tokens=512, verify_tokens=256, target=target, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_lm("llama")


def _logits(lm: LoadedModel, folder: Path) -> torch.Tensor:
    ids = lm.tokenizer("hello there, how are you", return_tensors="pt").input_ids
    with torch.no_grad():
        return load_peft(lm.model, folder)(input_ids=ids).logits


def test_fireworks_pads_the_rank_and_keeps_the_function(lm: LoadedModel, tmp_path: Path) -> None:
    rank1 = _export(lm, tmp_path / "peft", "peft")
    rank4 = _export(lm, tmp_path / "fw", "fireworks")
    config = json.loads((rank4.folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 4) and rank4.meta["rank"] == 4
    torch.testing.assert_close(_logits(lm, rank4.folder), _logits(lm, rank1.folder), rtol=0, atol=1e-6)
    assert rank4.report.top1_agreement == rank1.report.top1_agreement
    assert "Fireworks" in (rank4.folder / "README.md").read_text()


@pytest.mark.parametrize("target", ["fireworks", "llama.cpp", "ollama"])
def test_targets_that_cannot_load_a_bias_refuse_exact_mode(lm: LoadedModel, tmp_path: Path, target: str) -> None:
    with pytest.raises(ValueError, match=f"mode 'exact' writes a LoRA bias, which target '{target}' cannot load"):
        _export(lm, tmp_path / "a", target, mode="exact")
    assert not (tmp_path / "a").exists()


def test_the_cli_and_app_offer_every_target() -> None:
    from steer_core.adapter.targets import TARGETS
    from steer_core.constants import TARGET_NAMES

    assert tuple(TARGETS) == TARGET_NAMES


def test_gguf_targets_name_unsupported_architectures(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_type 'gpt2' is not written here"):
        _export(tiny_lm("gpt2"), tmp_path / "a", "llama.cpp")
    with pytest.raises(ValueError, match="target 'vllm' is not one of peft, fireworks, llama.cpp, ollama, merged"):
        _export(tiny_lm("llama"), tmp_path / "a", "vllm")


def _read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


@pytest.mark.parametrize("writer", ["mlp", "attn"])
def test_the_gguf_lora_is_what_llama_cpps_converter_writes(lm: LoadedModel, tmp_path: Path, writer: str) -> None:
    # block 2's attention writer, as where it comes closer to the hook (steer_core.fit.composite)
    result = _export(lm, tmp_path / "a", "llama.cpp", writer={"mlp": "own", "attn": "next"}[writer])
    assert result.meta["target_files"] == ["adapter.gguf", "control_vector.gguf"]
    ours_meta, ours = _read_gguf(result.folder / "adapter.gguf")
    assert ours_meta["general.type"] == "adapter" and ours_meta["adapter.type"] == "lora"
    assert ours_meta["general.architecture"] == "llama" and ours_meta["adapter.lora.alpha"] == 1.0
    # llama.cpp's converter (from the upstream source tree) on our PEFT folder, with the tiny base model's config
    src = Path(subprocess.run(["bash", str(ROOT / "scripts/llama_cpp.sh"), "--source"], check=True,
                              capture_output=True, text=True).stdout.strip()) / "src"  # fmt: skip
    base = tmp_path / "base"
    lm.model.save_pretrained(base)
    lm.tokenizer.save_pretrained(base)
    theirs_path = tmp_path / "theirs.gguf"
    run_llama_cpp_script(src, "convert_lora_to_gguf.py", "--base", str(base), "--outtype", "f32", "--outfile",
                         str(theirs_path), str(result.folder))  # fmt: skip
    theirs_meta, theirs = _read_gguf(theirs_path)
    tensor = {"mlp": "blk.1.ffn_down", "attn": "blk.2.attn_output"}[writer]
    assert sorted(ours) == sorted(theirs) == [f"{tensor}.weight.lora_a", f"{tensor}.weight.lora_b"]
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    for key in ("general.type", "general.architecture", "adapter.type", "adapter.lora.alpha"):
        assert ours_meta[key] == theirs_meta[key], key


# ollama now writes the merged model as GGUF and a Modelfile FROM it (no ADAPTER): tests/adapter/test_merged.py
