import json
from pathlib import Path

import pytest
import torch

from helpers import D_MODEL, build_sae, tiny_lm
from steer_core.sae.feature import load_sae_from_disk, reconstruction_fvu, same_model, top_features_by_cosine
from steer_core.sites import HookPoint
from steer_core.vectors.contrastive import contrastive_vector, read_pairs
from steer_core.vectors.recipe import VectorRecipe

POS = ["I love it", "so happy today", "great work"]
NEG = ["I hate it", "so sad today", "awful work"]


def _resid(lm, prompt: str, layer: int, position: str = "last") -> torch.Tensor:
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    h = lm.model(ids, output_hidden_states=True).hidden_states[layer + 1][0]
    return h[-1] if position == "last" else h.mean(0)


@pytest.mark.parametrize("position", ["last", "mean"])
def test_mean_difference_equals_hand_computation(position: str) -> None:
    lm = tiny_lm("llama")
    vec = contrastive_vector(lm, POS, NEG, HookPoint(1, "resid_post"), position=position)  # type: ignore[arg-type]
    pos = torch.stack([_resid(lm, p, 1, position) for p in POS]).mean(0)
    neg = torch.stack([_resid(lm, n, 1, position) for n in NEG]).mean(0)
    torch.testing.assert_close(vec.directions[HookPoint(1, "resid_post")], pos - neg, atol=1e-5, rtol=1e-5)


def test_pca_is_the_first_component_of_pair_differences() -> None:
    lm = tiny_lm("llama")
    point = HookPoint(1, "resid_post")
    vec = contrastive_vector(lm, POS, NEG, point, method="pca")
    diffs = torch.stack([_resid(lm, p, 1) - _resid(lm, n, 1) for p, n in zip(POS, NEG, strict=True)])
    centered = diffs - diffs.mean(0)
    pc = torch.linalg.svd(centered.double())[2][0].float()
    v = vec.directions[point]
    assert abs(float(v @ pc) / float(v.norm())) == pytest.approx(1.0, abs=1e-4)
    assert float(v @ diffs.mean(0)) > 0
    assert float(v.norm()) == pytest.approx(float(diffs.mean(0).norm()), rel=1e-4)
    again = contrastive_vector(lm, POS, NEG, point, method="pca")
    assert torch.equal(again.directions[point], v)


def test_contrastive_errors(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    with pytest.raises(ValueError, match="at least one non-empty"):
        contrastive_vector(lm, ["  "], NEG, HookPoint(1, "resid_post"))
    with pytest.raises(ValueError, match="pca needs pairs"):
        contrastive_vector(lm, POS, NEG[:2], HookPoint(1, "resid_post"), method="pca")
    (tmp_path / "bad.json").write_text('{"pos": []}')
    with pytest.raises(ValueError, match="expected"):
        read_pairs(tmp_path / "bad.json")


def test_read_pairs_both_layouts(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"positive": POS, "negative": NEG}))
    (tmp_path / "b.json").write_text(
        json.dumps([{"positive": p, "negative": n} for p, n in zip(POS, NEG, strict=True)])
    )
    assert read_pairs(tmp_path / "a.json") == read_pairs(tmp_path / "b.json") == (POS, NEG)


def test_relative_strength_sets_the_norm() -> None:
    from steer_core.activations import median_norm

    lm = tiny_lm("llama")
    recipe = VectorRecipe("contrastive", (0.5,), "resid", layer=1, positive=tuple(POS), negative=tuple(NEG))
    vec = recipe.build(lm)
    ref = median_norm(lm.model, lm.tokenizer, HookPoint(1, "resid_post"), "resid")
    assert float(vec.directions[HookPoint(1, "resid_post")].norm()) == pytest.approx(0.5 * ref, rel=1e-4)
    assert vec.provenance["strength_unit"] == "resid"


def test_compare_with_sae_features(tmp_path: Path) -> None:
    sae = load_sae_from_disk(build_sae(tmp_path / "sae"))
    v = 3 * sae.decoder[7].float() + 0.01 * torch.randn(D_MODEL)
    top = top_features_by_cosine(sae, v, k=3)
    assert top[0][0] == 7 and top[0][1] > 0.99
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]


def test_sae_on_another_model_is_flagged_with_its_fvu(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    sae = load_sae_from_disk(build_sae(tmp_path / "sae", model_name="some-base-model"))
    fvu = reconstruction_fvu(sae, lm.model, lm.tokenizer)
    assert fvu > 0.5  # a random SAE explains little of this model's activations
    recipe = VectorRecipe("sae", (2.0,), path=str(tmp_path / "sae"), features=(1,))
    vec = recipe.build(lm)
    assert vec.provenance["sae_model_matches"] is False
    assert vec.provenance["sae_fvu_on_this_model"] == pytest.approx(fvu, rel=1e-3)
    assert same_model("gpt2-small", "gpt2") and same_model("google/gemma-2-2b", "gemma-2-2b")
    assert not same_model("gemma-2-2b", "google/gemma-2-2b-it")


def test_median_norm_is_measured_once_per_model_site_and_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    from steer_core import activations

    calls: list[tuple[HookPoint, str]] = []
    measure = activations.site_activations

    def counting(model, tokenizer, point, unit, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((point, unit))
        return measure(model, tokenizer, point, unit, **kwargs)

    monkeypatch.setattr(activations, "site_activations", counting)
    lm, other = tiny_lm("llama"), tiny_lm("llama", seed=1)
    p1, p2 = HookPoint(1, "resid_post"), HookPoint(2, "resid_post")
    first = activations.median_norm(lm.model, lm.tokenizer, p1, "resid")
    assert activations.median_norm(lm.model, lm.tokenizer, p1, "resid") == first
    assert len(calls) == 1
    activations.median_norm(lm.model, lm.tokenizer, p2, "resid")
    activations.median_norm(lm.model, lm.tokenizer, p1, "writer")
    assert activations.median_norm(other.model, other.tokenizer, p1, "resid") != first  # another model's own
    assert calls == [(p1, "resid"), (p2, "resid"), (p1, "writer"), (p1, "resid")]
