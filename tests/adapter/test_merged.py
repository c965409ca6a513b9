"""Merged weights (`--target merged`, `--target ollama`): the base model with the adapter merged in gives PEFT's
logits, the shared model is never touched, and the card is a full model's. End to end: the embedded SmolLM2 merged
and converted by llama.cpp's own convert_hf_to_gguf.py answers in llama-server as PEFT does."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard
from test_llama_cpp import NEW_TOKENS, PROMPTS, _llama_tokens, _ours, _prefix, _prompt_ids, llama_cpp, server
from transformers import AutoModelForCausalLM

import steer_core.export as export_module
from helpers import D_MODEL, tiny_lm
from steer_core.adapter.record import SteeringRecord, read_record
from steer_core.check.verify import load_peft
from steer_core.export import export
from steer_core.model import LoadedModel
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector

__all__ = ["llama_cpp"]  # the fixture, shared with test_llama_cpp


def _vec() -> SteeringVector:
    g = torch.Generator().manual_seed(5)
    return SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL, generator=g) * 3}, {"source": "test"})


def _export(lm: LoadedModel, out: Path, target: str, mode: str = "portable", **kwargs: Any):
    return export(lm, _vec(), out, mode=mode, calibration_tokens=512, verify_tokens=256, target=target, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # pre-norm, and Gemma's post-norm writers
def test_the_merged_model_gives_pefts_logits_and_leaves_the_shared_model_alone(family: str, tmp_path: Path) -> None:
    lm = tiny_lm(family)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = _export(lm, tmp_path / "a", "merged")
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items()), "the shared model changed"
    merged_dir = result.folder / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= {
        p.name for p in merged_dir.iterdir()
    }
    # the PEFT folder beside it stays as every export writes it
    assert (result.folder / "adapter_model.safetensors").is_file() and result.report.top1_agreement > 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    peft = load_peft(lm.model, result.folder)
    ids = lm.tokenizer("a text that no check saw before, to be sure", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs, base = (m(input_ids=ids).logits for m in (merged, peft, lm.model))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (ours - base).abs().max() > 1e-3, "the merge must change the model for this test to mean much"
    # only the targeted modules' weights differ from the base model's
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed == {f"{m}.weight" for m in result.meta["target_modules"]}


def test_steering_json_and_the_card_say_what_was_merged(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    result = _export(lm, tmp_path / "a", "merged")
    record = read_record(result.folder)
    assert record.target == "merged" and record.target_files == ("merged",)
    assert record.merged is not None and record.merged["path"] == "merged" and record.merged["merged_by"] == "peft"
    check = record.merged["against_peft"]
    assert check["ok"] and check["max_abs_logit_diff"] <= check["tolerance"] and check["top1_agreement"] == 1.0
    assert check["dtype"] == "float32" and check["tokens"] > 100
    card = ModelCard.load(result.folder / "merged" / "README.md")
    assert card.data.base_model == "tiny-llama" and card.data.base_model_relation == "finetune"
    assert card.data.library_name == "transformers" and "steer-core" in card.data.tags
    for module in record.target_modules:
        assert f"`{module}`" in card.text
    assert "max |logit difference|" in card.text and "merge_and_unload" in card.text
    # the adapter's own card points at the merged model
    assert "Exported for **merged** (`merged`)" in (result.folder / "README.md").read_text()


def test_older_steering_json_reads_without_a_merged_entry() -> None:
    old = {"mode": "portable", "base_model": "b", "vector": {"points": [], "norms": {}}, "target": "ollama"}
    record = SteeringRecord.from_dict(old)
    assert record.merged is None and "merged" not in record.to_dict()
    assert SteeringRecord.from_dict(record.replace(merged={"path": "merged"}).to_dict()).merged == {"path": "merged"}


def test_exact_mode_merges_only_into_a_bias(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no bias to merge it into .* use mode 'portable' for merged weights"):
        _export(tiny_lm("llama"), tmp_path / "a", "merged", mode="exact")
    assert not (tmp_path / "a").exists()


def test_ollama_gets_the_merged_gguf_and_a_modelfile_without_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring, on a tiny model whose byte tokenizer llama.cpp's converter does not know: the converter is
    stubbed here and run for real on SmolLM2 in the e2e test below."""
    converted = []

    def fake_gguf(merged_dir: Path, out: Path, outtype: str) -> Path:
        converted.append((sorted(p.name for p in merged_dir.iterdir()), outtype))
        out.write_bytes(b"GGUF")
        return out

    monkeypatch.setattr(export_module, "write_gguf", fake_gguf)
    result = _export(tiny_lm("llama"), tmp_path / "a", "ollama")
    assert converted and "model.safetensors" in converted[0][0] and converted[0][1] == "f16"
    assert result.meta["target_files"] == ["model.gguf", "Modelfile"]
    assert not (result.folder / "merged").exists() and not (result.folder / "adapter.gguf").exists()
    modelfile = (result.folder / "Modelfile").read_text()
    instructions = [line.split()[0].upper() for line in modelfile.splitlines() if line and not line.startswith("#")]
    assert "FROM ./model.gguf\n" in modelfile and instructions == ["FROM"]
    assert result.meta["merged"]["gguf_outtype"] == "f16" and result.meta["merged"]["against_peft"]["ok"]


def test_ollama_says_how_to_get_llama_cpp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEER_CORE_LLAMA_CPP", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"bash scripts/llama_cpp.sh --source"):
        _export(tiny_lm("llama"), tmp_path / "a", "ollama")
    assert not (tmp_path / "a").exists()


@pytest.mark.e2e
def test_ollamas_gguf_answers_in_llama_server_as_peft(smollm2: LoadedModel, llama_cpp: Path, tmp_path: Path) -> None:
    """The embedded SAE's default feature, exported with --target ollama (small calibration: this compares the
    merged GGUF with PEFT, not the adapter with the hook), served by llama-server as Ollama would load it."""
    from steer_core.sae.feature import EMBEDDED_SAES
    from steer_core.vectors.recipe import VectorRecipe

    start = time.perf_counter()
    spec = EMBEDDED_SAES["smollm2-135m-instruct-res-L15"]
    recipe = VectorRecipe("sae", (spec.default_strength,), "resid", features=(spec.default_feature,))
    vector = recipe.build(smollm2)
    result = export(smollm2, vector, tmp_path / "ollama", target="ollama", calibration_tokens=2048, engine_scales=(),
                    verify_tokens=256, writer="own")  # fmt: skip
    folder = result.folder
    modelfile = (folder / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in modelfile and not any(line.startswith("ADAPTER") for line in modelfile.split("\n"))
    merged = result.meta["merged"]
    size = (folder / "model.gguf").stat().st_size
    prompts = _prompt_ids(smollm2)
    pad = smollm2.tokenizer.pad_token_id or 0
    peft = load_peft(smollm2.model, folder)
    ours = [_ours(peft, p, pad) for p in prompts]
    unsteered = [_ours(smollm2.model, p, pad) for p in prompts]
    with server(llama_cpp, folder / "model.gguf") as url:
        got = [_llama_tokens(url, p) for p in prompts]
    prefixes = [_prefix(g, r) for g, r in zip(got, ours, strict=True)]
    print(json.dumps({"against_peft": merged["against_peft"], "gguf_outtype": merged["gguf_outtype"],
                      "gguf_mb": round(size / 1e6), "greedy_prefix": prefixes, "of": NEW_TOKENS,
                      "seconds": round(time.perf_counter() - start, 1)}))  # fmt: skip
    assert ours != unsteered, "the feature must change the answers for this test to mean much"
    assert sum(prefixes) >= 0.95 * NEW_TOKENS * len(PROMPTS), prefixes
    assert size < 0.6 * 4 * 135e6, "f16: about half the size of float32"
