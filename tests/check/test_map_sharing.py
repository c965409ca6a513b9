"""A map computes once what its cells share (#32): the held-out base pass, the blocks before the steering, the fits
of A at a site. Each cell must measure what it measured on its own."""

from __future__ import annotations

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core.activations import forward_from, recording_block_calls
from steer_core.check.servability import HeldOut, Reference, first_block, predict, servability_map
from steer_core.fit.calibrate import calibrate
from steer_core.fit.ridge import forget_statistics
from steer_core.sites import HookPoint, num_layers
from steer_core.vectors.recipe import VectorRecipe
from steer_core.vectors.vector import SteeringVector


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_shared_reference_measures_each_cell_as_a_full_pass_does(family: str) -> None:
    lm = tiny_lm(family)
    point = HookPoint(2, "resid_post")
    vector = SteeringVector({point: torch.randn(D_MODEL, generator=torch.Generator().manual_seed(1)) * 4})
    cal = calibrate(lm.model, lm.tokenizer, vector, tokens=512)
    params = {f.module: (f.A.float(), f.B.float()) for f in cal.fits}
    # a reference recorded after every block the cell changes: each pass runs the whole model
    full = HeldOut(lm, vector, 512, reference=Reference(lm, 512, first=num_layers(lm.model)))
    alone = full.measure(params)
    shared_ref = Reference(lm, 512, first=1)
    for first in (0, 1):
        shared = HeldOut(lm, vector, 512, reference=Reference(lm, 512, first=first) if first == 0 else shared_ref)
        assert shared.n == full.n and shared.kl_base == pytest.approx(full.kl_base, rel=1e-4)
        got = shared.measure(params)
        assert got["top1"] == pytest.approx(alone["top1"], abs=1 / shared.n)
        assert got["kl_ratio"] == pytest.approx(alone["kl_ratio"], rel=1e-3)
    assert first_block(lm.model, vector) == 2 and first_block(lm.model, vector, ["model.layers.1.mlp.down_proj"]) == 1
    with pytest.raises(ValueError, match="reference of 512 tokens"):
        HeldOut(lm, vector, 256, reference=shared_ref)


def test_replayed_blocks_give_the_logits_of_the_positions_asked_for() -> None:
    lm = tiny_lm("llama")
    ids = torch.randint(0, 32, (2, 9))
    mask = torch.ones_like(ids)
    keep = torch.rand(2, 9, generator=torch.Generator().manual_seed(0)) > 0.4
    with torch.no_grad(), recording_block_calls(lm.model, 1) as calls:
        full = lm.model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        assert torch.allclose(forward_from(lm.model, 1, calls, positions=keep), full[keep], atol=1e-5)
        assert torch.allclose(forward_from(lm.model, 2, calls[1:]), full, atol=1e-5)


def test_a_strength_map_fits_a_once_and_predicts_each_cell_as_alone() -> None:
    from steer_core.fit import position0

    lm = tiny_lm("llama")
    vector = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    known = len(position0._FITS)
    weak = predict(lm, vector, 1, 1.0, 512, 512)
    fitted = len(position0._FITS)
    strong = predict(lm, vector.scaled(4.0), 1, 4.0, 512, 512)
    assert fitted > known and len(position0._FITS) == fitted  # the second strength's A came from the first's fits
    forget_statistics(lm.model)
    alone = predict(lm, vector.scaled(4.0), 1, 4.0, 512, 512)
    assert (alone.top1, alone.kl_ratio) == (strong.top1, strong.kl_ratio) and weak.tokens == strong.tokens


def test_a_map_shares_the_base_pass_across_its_cells(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from safetensors.torch import save_file

    from steer_core.check import servability

    path = tmp_path / "v.safetensors"
    save_file({"v": torch.randn(D_MODEL, generator=torch.Generator().manual_seed(3)) * 4}, str(path))
    lm = tiny_lm("llama")
    made: list[int] = []
    original = servability.Reference.__init__

    def counted(self, *args, **kwargs) -> None:
        made.append(kwargs.get("first", 0))
        original(self, *args, **kwargs)

    monkeypatch.setattr(servability.Reference, "__init__", counted)
    recipe = VectorRecipe("file", (1.0,), "abs", path=str(path), layer=1)
    result = servability_map(lm, recipe, layers=[0, 2], calibration_tokens=512, eval_tokens=512)
    assert [c.layer for c in result.cells] == [0, 1, 2] and made == [0]  # one base pass, from the first cell's block
    monkeypatch.undo()
    cells = [VectorRecipe("file", (1.0,), "abs", path=str(path), layer=c.layer) for c in result.cells]
    alone = []
    for r in cells:
        forget_statistics(lm.model)  # each cell's own pass over the calibration text, as before maps shared one
        alone.append(predict(lm, r.build(lm), r.layer or 0, 1.0, 512, 512))
    for shared, own in zip(result.cells, alone, strict=True):
        assert shared.top1 == pytest.approx(own.top1, abs=1 / own.tokens) and shared.tokens == own.tokens
        assert shared.kl_ratio == pytest.approx(own.kl_ratio, rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_one_pass_keeps_each_sites_statistics_as_its_own_pass_makes_them(family: str) -> None:
    from steer_core.fit.calibrate import statistics_plan
    from steer_core.fit.ridge import _STATISTICS, gather_at_sites
    from steer_core.fit.shares import SHARE_SAMPLE_TOKENS

    lm = tiny_lm(family)
    vectors = [SteeringVector({HookPoint(layer, "resid_post"): torch.randn(D_MODEL) * 3}) for layer in (0, 1)]
    plans = [statistics_plan(lm.model, v) for v in vectors]
    settings = {"sample_tokens": SHARE_SAMPLE_TOKENS, "tokens": 512, "max_doc_tokens": 256, "skip_bos": False}
    gather_at_sites(lm.model, lm.tokenizer, vectors, [(p.gathered, p.sample) for p in plans], **settings)
    shared = dict(_STATISTICS[lm.model])
    forget_statistics(lm.model)
    for v in vectors:
        calibrate(lm.model, lm.tokenizer, v, tokens=512)
    own = dict(_STATISTICS[lm.model])
    assert set(shared) == set(own) and len(own) == 2
    for key, (stats, sampled, seen) in own.items():
        kept, kept_sampled, kept_seen = shared[key]
        assert seen == kept_seen and set(stats) == set(kept)
        for name, (body, head) in stats.items():
            for mine, theirs in ((body, kept[name][0]), (head, kept[name][1])):
                assert torch.equal(mine.xtx, theirs.xtx) and torch.equal(mine.xty, theirs.xty) and mine.n == theirs.n
        assert all(torch.equal(a, b) for n in sampled for a, b in zip(sampled[n], kept_sampled[n], strict=True))


def test_a_strength_maps_cells_share_their_layers_prefixes_and_predict_each_cell_as_alone() -> None:
    """The cells of a strength map steer one layer: the blocks before it on the held-in and unseen text, and the
    next writer's unsteered response pass, run once (passes.shared_across_cells)."""
    from steer_core.check.servability import STRENGTH_FACTORS
    from steer_core.fit import passes

    lm = tiny_lm("llama")
    vector = SteeringVector(
        {HookPoint(1, "resid_post"): torch.randn(D_MODEL, generator=torch.Generator().manual_seed(5))}
    )
    kept: list[str] = []
    original = passes.keep

    def counted(saving: str, key: tuple, value: object) -> None:
        kept.append(saving)
        original(saving, key, value)

    recipe = VectorRecipe("sae", (1.0,), "abs", features=(0,))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(passes, "keep", counted)
        result = servability_map(lm, recipe, calibration_tokens=512, eval_tokens=512, build=lambda _r: vector)
    assert {"prefixes", "responses"} <= set(kept)
    for cell, f in zip(result.cells, STRENGTH_FACTORS, strict=True):
        forget_statistics(lm.model)
        own = predict(lm, vector.scaled(f), 1, f, 512, 512)
        assert cell.top1 == pytest.approx(own.top1, abs=1 / own.tokens) and cell.tokens == own.tokens
        assert cell.kl_ratio == pytest.approx(own.kl_ratio, rel=1e-3)
