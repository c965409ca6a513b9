import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import D_MODEL, tiny_lm
from steer_core import corpus
from steer_core.check.verify import verify
from steer_core.constants import ADAPTER_WEIGHTS_FILENAME
from steer_core.export import export
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector


def _vec(scale: float = 3.0) -> SteeringVector:
    return SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * scale}, {"source": "test"})


@pytest.mark.parametrize(("family", "mode"), [("llama", "exact"), ("gpt2", "exact"), ("llama", "ablate")])
def test_exact_modes_roundtrip_through_peft(tmp_path: Path, family: str, mode: str) -> None:
    lm = tiny_lm(family)
    result = export(lm, _vec(), tmp_path / "a", mode=mode, verify_tokens=512)  # type: ignore[arg-type]
    rep = result.report
    assert rep.top1_agreement == 1.0
    assert rep.max_abs_logit_diff < 1e-4
    assert rep.kl_hook_adapter < 1e-6  # float noise; the KL ratio is noisy when ablation changes little
    assert rep.greedy_full_match == 1.0


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_portable_export_writes_a_complete_verified_folder(tmp_path: Path, family: str) -> None:
    lm = tiny_lm(family)
    result = export(lm, _vec(), tmp_path / "a", calibration_tokens=2048, verify_tokens=512)
    names = sorted(p.name for p in result.folder.iterdir())
    assert names == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "steering.json",
        "steering_vector.safetensors",
    ]
    meta = json.loads((result.folder / "steering.json").read_text())
    config = json.loads((result.folder / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 1 and config["peft_type"] == "LORA"
    assert meta["fidelity"]["top1_agreement"] == result.report.top1_agreement
    assert 0 <= result.report.kl_ratio < 0.5
    card = (result.folder / "README.md").read_text()
    assert "library_name: peft" in card and "vllm serve" in card and "top-1" in card
    fit_error = next(iter(result.report.fit_abs_error.values()))
    # the card shows steering.json's seconds (rounded to 0.01 first: formatting the raw total differed near x.x5)
    assert f"| {fit_error:.3g} |" in card and f"| {meta['seconds']['total']:.1f} |" in card
    assert not list(tmp_path.glob(".a-*")), "no temp folder is left behind"
    # verify() from the folder alone gives the same numbers
    again = verify(lm.model, lm.tokenizer, result.folder, tokens=512)
    assert again.top1_agreement == result.report.top1_agreement
    # a second export at the site keeps the writers' statistics, and its folder says so
    assert not meta["calibration"]["reused_statistics"] and "kept from an earlier export" not in card
    second = export(lm, _vec(), tmp_path / "b", calibration_tokens=2048, verify_tokens=512)
    assert second.meta["calibration"]["reused_statistics"]
    assert (
        "calibration included (input statistics kept from an earlier export)"
        in (second.folder / "README.md").read_text()
    )


def test_fidelity_per_format_adds_up_to_the_whole(tmp_path: Path) -> None:
    """Per-format figures are the overall ones restricted to that format's tokens; a base model has plain text only."""
    lm = tiny_lm("llama")
    rep = export(lm, _vec(), tmp_path / "a", calibration_tokens=2048, verify_tokens=1024).report
    by = rep.by_format
    assert set(by) == set(corpus.FORMATS) and all(g["tokens"] >= 50 for g in by.values())
    assert max(g["tokens"] for g in by.values()) < 3 * min(g["tokens"] for g in by.values())  # balanced
    n = sum(g["tokens"] for g in by.values())
    assert n == rep.tokens
    assert sum(g["top1_agreement"] * g["tokens"] for g in by.values()) / n == pytest.approx(rep.top1_agreement)
    assert sum(g["kl_hook_adapter"] * g["tokens"] for g in by.values()) / n == pytest.approx(rep.kl_hook_adapter)
    assert sum(g["greedy_prompts"] for g in by.values()) == rep.greedy_prompts == 8  # two prompts per format
    assert sum(g["tokens"] for g in rep.by_source.values()) == rep.tokens
    card = (tmp_path / "a" / "README.md").read_text()
    worst = min(by, key=lambda f: by[f]["top1_agreement"])
    assert rep.worst_format == worst and card.index("By input format") < card.index("All formats together")
    assert rep.summary().startswith(f"worst format {worst}: top-1 agreement")
    base = tiny_lm("llama", chat=False)
    plain = export(base, _vec(), tmp_path / "b", calibration_tokens=2048, verify_tokens=512).report
    assert set(plain.by_format) == {"plain"} and plain.worst_format is None


def test_portable_is_close_on_pre_norm(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    rep = export(lm, _vec(), tmp_path / "a", calibration_tokens=4096, verify_tokens=1024).report
    assert rep.top1_agreement > 0.9 and rep.kl_ratio < 0.05
    assert rep.kl_hook_base > 1e-3, "the vector actually steers"


def test_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny_lm("llama")

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("verification crashed")

    monkeypatch.setattr("steer_core.export.verify", boom)
    with pytest.raises(RuntimeError, match="crashed"):
        export(lm, _vec(), tmp_path / "a", calibration_tokens=512)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(tiny_lm("llama"), _vec(), tmp_path / "a", mode="exact")
    assert (tmp_path / "a" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("vec", "kwargs", "match"),
    [
        (SteeringVector({HookPoint(0, "resid_pre"): torch.randn(D_MODEL)}), {}, "embedding output"),
        (SteeringVector({HookPoint(5, "resid_post"): torch.randn(D_MODEL)}), {}, "layer 5 is out of range"),
        (SteeringVector({HookPoint(1, "resid_post"): torch.randn(7)}), {}, "length 7.*hidden size is 32"),
        (None, {"mode": "nope"}, "mode 'nope'"),
        (None, {"calibration_tokens": 10}, "at least 256"),
        (None, {"refine_steps": -1}, r"refine steps must be 0 \(no refinement\) or more, got -1"),
    ],
)
def test_bad_export_inputs(tmp_path: Path, vec: SteeringVector | None, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        export(tiny_lm("llama"), vec or _vec(), tmp_path / "a", **kwargs)
    assert not (tmp_path / "a").exists()


def test_verify_refuses_an_all_zero_adapter(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    folder = export(lm, _vec(), tmp_path / "a", mode="exact", verify_tokens=256).folder
    tensors = load_file(str(folder / ADAPTER_WEIGHTS_FILENAME))
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS_FILENAME))
    with pytest.raises(ValueError, match="zero"):
        verify(lm.model, lm.tokenizer, folder)


def test_verify_detects_a_wrong_adapter(tmp_path: Path) -> None:
    """Tampering with B must show up in the report: the check can fail."""
    lm = tiny_lm("llama")
    folder = export(lm, _vec(), tmp_path / "a", mode="exact", verify_tokens=256).folder
    tensors = load_file(str(folder / ADAPTER_WEIGHTS_FILENAME))
    key = next(k for k in tensors if k.endswith("lora_B.bias"))
    tensors[key] = -tensors[key]
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_FILENAME))
    rep = verify(lm.model, lm.tokenizer, folder, tokens=512)
    assert rep.kl_ratio > 0.5


def test_effect_kept_measures_how_much_of_the_steering_the_adapter_does(tmp_path: Path) -> None:
    """1 for the exact adapter; less the less of the update an adapter applies; negative when it steers away. A log-
    probability gain saturates (a token made near-certain by a tenth of the update is near-certain), so it grows
    faster than linearly: a behaviour figure, where top-1 and KL are distribution figures."""
    lm = tiny_lm("llama")
    folder = export(lm, _vec(scale=0.3), tmp_path / "a", mode="exact", verify_tokens=512).folder
    exact = verify(lm.model, lm.tokenizer, folder, tokens=512)
    assert exact.effect_kept == pytest.approx(1.0, abs=1e-3)
    assert len(exact.promoted_tokens) == 10 and "effect kept 100%" in exact.summary()
    tensors = load_file(str(folder / ADAPTER_WEIGHTS_FILENAME))
    kept = {}
    for scale in (0.02, 0.1, -1.0):
        scaled = {k: v * scale if "lora_B" in k else v for k, v in tensors.items()}
        save_file(scaled, str(folder / ADAPTER_WEIGHTS_FILENAME))
        kept[scale] = verify(lm.model, lm.tokenizer, folder, tokens=512).effect_kept
    assert kept[-1.0] < 0 < kept[0.02] < 0.5 < kept[0.1] < 0.99, kept  # measured -0.51, 0.21, 0.75


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_forward_from_a_block_replays_the_full_pass(family: str) -> None:
    from steer_core.activations import forward_from, recording_block_calls
    from steer_core.steer import steering

    lm = tiny_lm(family, layers=3)
    ids = torch.randint(3, 90, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    vec = _vec()
    with torch.no_grad():
        with recording_block_calls(lm.model, 1) as calls:
            full = lm.model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(forward_from(lm.model, 1, calls), full, atol=1e-5, rtol=1e-5)
        with steering(lm.model, vec):
            steered = lm.model(input_ids=ids, attention_mask=mask).logits
            replayed = forward_from(lm.model, 1, calls)
    torch.testing.assert_close(replayed, steered, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered, full, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_verify_with_shared_early_blocks_equals_full_passes(
    tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import steer_core.check.verify as verify_module

    lm = tiny_lm(family)
    folder = export(lm, _vec(), tmp_path / "a", calibration_tokens=1024, verify_tokens=256).folder
    shared = verify(lm.model, lm.tokenizer, folder, tokens=256, greedy_prompts=0)
    monkeypatch.setattr(verify_module, "_first_changed_block", lambda *a: None)
    full = verify(lm.model, lm.tokenizer, folder, tokens=256, greedy_prompts=0)
    assert shared.top1_agreement == full.top1_agreement
    assert shared.kl_hook_adapter == pytest.approx(full.kl_hook_adapter, rel=1e-3, abs=1e-7)
    assert shared.kl_hook_base == pytest.approx(full.kl_hook_base, rel=1e-3)
    assert shared.fit_abs_error == pytest.approx(full.fit_abs_error, rel=1e-4)


def test_export_of_a_given_calibration_keeps_it(tmp_path: Path) -> None:
    """A calibration made (and refined) beforehand is exported as it is, not made again."""
    import dataclasses

    from steer_core.fit.calibrate import calibrate

    lm = tiny_lm("llama")
    vec = _vec()
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=1024)
    (fit,) = cal.fits
    cal = dataclasses.replace(cal, fits=[dataclasses.replace(fit, A=fit.A * 0.5)], tokens=1234)
    result = export(lm, vec, tmp_path / "a", calibration=cal, verify_tokens=256)
    assert result.meta["calibration"]["tokens"] == 1234
    saved = load_file(str(result.folder / ADAPTER_WEIGHTS_FILENAME))
    a = saved[f"base_model.model.{fit.module}.lora_A.weight"].reshape(-1)
    b = saved[f"base_model.model.{fit.module}.lora_B.weight"].reshape(-1)
    # the saved update is the given one (the writer balances |A| against |B|, which keeps the product)
    torch.testing.assert_close(torch.outer(b, a), torch.outer(fit.B, fit.A * 0.5), rtol=1e-5, atol=1e-6)
    refined = export(lm, vec, tmp_path / "b", calibration=cal, refine_steps=2, verify_tokens=256).meta["calibration"]
    assert refined["tokens"] == 1234 and refined["refine"]["steps"] == 2  # the given calibration, refined further


def test_export_refuses_a_calibration_of_other_sites(tmp_path: Path) -> None:
    from steer_core.fit.calibrate import calibrate

    lm = tiny_lm("llama")
    cal = calibrate(lm.model, lm.tokenizer, _vec(), tokens=512)
    other = SteeringVector({HookPoint(2, "resid_post"): torch.randn(D_MODEL)})
    with pytest.raises(ValueError, match=r"this vector's sites \(blocks.2.hook_resid_post\).*blocks.1.hook_resid_post"):
        export(lm, other, tmp_path / "a", calibration=cal)
    with pytest.raises(ValueError, match="got mode 'exact'"):
        export(lm, _vec(), tmp_path / "b", calibration=cal, mode="exact")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_verify_with_the_head_at_measured_tokens_only_equals_the_full_head(
    tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LM head applied to the measured rows alone computes the same rows in a product of another shape: logits
    equal up to the order of float sums (~1e-6), so a top-1 can flip only where the hook's two best tokens are that
    close; at most one such token is allowed, and KL within 1e-3 (relative)."""
    from steer_core.fit import passes

    lm = tiny_lm(family)
    folder = export(lm, _vec(), tmp_path / "a", calibration_tokens=1024, verify_tokens=256).folder
    at_measured = verify(lm.model, lm.tokenizer, folder, tokens=256, greedy_prompts=0)
    monkeypatch.setattr(passes, "SAVINGS", passes.SAVINGS - {"head"})
    full = verify(lm.model, lm.tokenizer, folder, tokens=256, greedy_prompts=0)
    assert at_measured.tokens == full.tokens
    assert at_measured.top1_agreement == pytest.approx(full.top1_agreement, abs=1 / full.tokens)
    assert at_measured.kl_hook_adapter == pytest.approx(full.kl_hook_adapter, rel=1e-3, abs=1e-7)
    assert at_measured.kl_hook_base == pytest.approx(full.kl_hook_base, rel=1e-3)
    assert at_measured.max_abs_logit_diff == pytest.approx(full.max_abs_logit_diff, rel=1e-3, abs=1e-5)
