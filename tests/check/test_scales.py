"""The engine scales an export checks (check.scales): measured per scale, against the hook at that multiple."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import D_MODEL, tiny_lm
from steer_core.check.scales import check_scales, check_scales_arg, engine_scale, servable_run
from steer_core.check.verify import load_peft, verify
from steer_core.constants import ADAPTER_WEIGHTS_FILENAME, ENGINE_SCALES, STEERING_VECTOR_FILENAME
from steer_core.export import export
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector


def _vec(scale: float) -> SteeringVector:
    torch.manual_seed(0)
    return SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * scale}, {"source": "test"})


def test_servable_run_is_the_run_nearest_one() -> None:
    assert servable_run({0.25: 0.99, 0.5: 0.97, 1.0: 0.96, 1.5: 0.94, 2.0: 0.96}) == (0.25, 1.0)
    assert servable_run({0.25: 0.90, 0.5: 0.97, 1.0: 0.96, 2.0: 0.99}) == (0.5, 2.0)  # not past a gap
    assert servable_run({0.25: 0.99, 0.5: 0.96, 1.0: 0.94, 2.0: 0.90}) == (0.25, 0.5)  # 1 short: those below
    assert servable_run({0.5: 0.96, 1.0: 0.94, 2.0: 0.96}) == (0.5, 0.5)  # a tie at equal distance: the lower
    assert servable_run({0.5: 0.90, 1.0: 0.94, 2.0: 0.91}) is None
    assert servable_run({1.0: 0.95}) == (1.0, 1.0)


def test_bad_scales_are_named() -> None:
    assert check_scales_arg([2, 0.5]) == (0.5, 1.0, 2.0)  # scale 1 always, sorted
    for bad in ([0], [-1], [float("nan")], [9], [float("inf")]):
        with pytest.raises(ValueError, match=r"above 0 and at most 8, got"):
            check_scales_arg(bad)
    with pytest.raises(ValueError, match="at most 8 engine scales"):
        check_scales_arg([0.1 * i for i in range(1, 10)])


def test_an_engine_scale_is_lora_b_times_s_and_is_undone_exactly(tmp_path: Path) -> None:
    """What llama-server's per-request scale does (s·alpha/r·BA) is what a folder with lora_B × s holds: serve's
    vLLM strength variants are written that way, and the test of llama-server holds it to these variants."""
    lm = tiny_lm("llama")
    folder = export(lm, _vec(3.0), tmp_path / "a", calibration_tokens=512, verify_tokens=256, engine_scales=()).folder
    scaled = tmp_path / "x2"
    scaled.mkdir()
    for f in folder.iterdir():
        (scaled / f.name).write_bytes(f.read_bytes())
    tensors = load_file(folder / ADAPTER_WEIGHTS_FILENAME)
    save_file({k: v * 2 if ".lora_B." in k else v for k, v in tensors.items()}, scaled / ADAPTER_WEIGHTS_FILENAME)
    ids = torch.randint(0, 90, (2, 12))
    adapted, doubled = load_peft(lm.model, folder), load_peft(lm.model, scaled)
    with torch.no_grad():
        before = adapted(input_ids=ids).logits
        with engine_scale(adapted, 2.0):
            at_two = adapted(input_ids=ids).logits
        after = adapted(input_ids=ids).logits
        want = doubled(input_ids=ids).logits
    torch.testing.assert_close(at_two, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(before, after)
    assert (at_two - before).abs().max() > 1e-3


def test_an_adapter_whose_writer_reads_the_unsteered_stream_is_the_hook_at_every_scale(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    folder = export(lm, _vec(6.0), tmp_path / "a", calibration_tokens=1024, verify_tokens=256, engine_scales=(),
                    writer="own").folder  # fmt: skip
    at_one = verify(lm.model, lm.tokenizer, folder, tokens=256)
    report = check_scales(lm.model, lm.tokenizer, folder, at_one, scales=(0.25, 8.0), tokens=512)
    assert report.by_scale["8"]["top1_agreement"] >= at_one.top1_agreement - 0.02, report.by_scale


def test_an_exact_adapter_is_exact_at_every_scale(tmp_path: Path) -> None:
    """A LoRA bias adds the vector whatever the input, so every scale must measure 100%: the measurement compares the
    hook at s × strength with the adapter at s, not with scale 1."""
    lm = tiny_lm("llama")
    result = export(lm, _vec(3.0), tmp_path / "a", mode="exact", verify_tokens=256)
    scales = result.record.scales
    assert scales is not None and scales["checked"] == list(ENGINE_SCALES)
    assert scales["servable"] == [0.25, 2.0]
    assert all(row["top1_agreement"] == 1.0 for row in scales["by_scale"].values()), scales
    assert json.loads((result.folder / "steering.json").read_text())["scales"] == scales


def _written_at(folder: Path, out: Path, s: float) -> Path:
    """A copy of the folder that *is* scale s: lora_B × s, and the hook vector × s for verify to compare with."""
    out.mkdir()
    for f in folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    for name, key in ((ADAPTER_WEIGHTS_FILENAME, ".lora_B."), (STEERING_VECTOR_FILENAME, "")):
        tensors = load_file(folder / name)
        save_file({k: v * s if key in k else v for k, v in tensors.items()}, out / name)
    return out


def test_each_scale_measures_what_verify_measures_of_that_scale_written_out(tmp_path: Path) -> None:
    """The sweep, checked against a measurement that shares none of its scaling code: verify() of a folder whose
    weights and hook vector are written at scale s, on the same held-out text."""
    lm = tiny_lm("llama")
    folder = export(lm, _vec(6.0), tmp_path / "a", calibration_tokens=1024, verify_tokens=256, engine_scales=()).folder
    at_one = verify(lm.model, lm.tokenizer, folder, tokens=256)
    report = check_scales(lm.model, lm.tokenizer, folder, at_one, scales=(0.5, 2.0), tokens=512)
    by = report.by_scale
    print(json.dumps(by, indent=1), report.servable)
    assert list(by) == ["0.5", "1", "2"] and by["1"]["top1_agreement"] == at_one.top1_agreement
    for s in (0.5, 2.0):
        alone = verify(lm.model, lm.tokenizer, _written_at(folder, tmp_path / f"x{s:g}", s), tokens=512,
                       greedy_prompts=4)  # fmt: skip
        row = by[f"{s:g}"]
        assert row["tokens"] == alone.tokens
        assert row["top1_agreement"] == pytest.approx(alone.top1_agreement, abs=1e-9)
        assert row["kl_ratio"] == pytest.approx(alone.kl_ratio, rel=1e-3)
        assert row["greedy_prefix_mean"] == alone.greedy_prefix_mean
    assert by["0.5"]["kl_ratio"] != pytest.approx(by["2"]["kl_ratio"], rel=0.05), "the scale must change the figures"
    assert report.servable == servable_run({float(k): v["top1_agreement"] for k, v in by.items()})


def test_ablations_skip_the_scales(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    result = export(lm, _vec(3.0), tmp_path / "a", mode="ablate", verify_tokens=256)
    assert result.record.scales is None
    with pytest.raises(ValueError, match="no strength to scale"):
        check_scales(lm.model, lm.tokenizer, result.folder, result.report)
