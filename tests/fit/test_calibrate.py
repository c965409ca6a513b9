import itertools
import json
import math
from typing import Any

import pytest
import torch

from helpers import D_MODEL, tiny_lm
from steer_core import corpus
from steer_core.adapter.record import SteeringRecord
from steer_core.divergence import kl_per_token
from steer_core.fit.calibrate import NEXT_MARGIN, balance, calibrate
from steer_core.fit.position0 import choose_first_weight
from steer_core.fit.ridge import Stats, fit_ridge
from steer_core.fit.selection import SELECT_TOKENS
from steer_core.sites import HookPoint
from steer_core.steer import lowrank_updates, steering
from steer_core.vectors.vector import SteeringVector


def test_ridge_recovers_an_exact_linear_target() -> None:
    x = torch.randn(4000, 12, dtype=torch.float64)
    u_true = torch.randn(12, dtype=torch.float64)
    stats = Stats(12, torch.device("cpu"))
    for i in range(0, 4000, 500):  # batch by batch: sufficient statistics add up
        stats.add((i // 500) % 2, x[i : i + 500], x[i : i + 500] @ u_true)
    u, ridge, rel = fit_ridge(stats)
    torch.testing.assert_close(u, u_true, atol=1e-4, rtol=1e-4)
    assert ridge == 1e-7 and rel < 1e-4


def test_ridge_picks_a_larger_penalty_for_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 40, generator=g, dtype=torch.float64)
    y = torch.randn(60, generator=g, dtype=torch.float64)  # pure noise: the best fit is heavily shrunk
    stats = Stats(40, torch.device("cpu"))
    stats.add(0, x[:30], y[:30])
    stats.add(1, x[30:], y[30:])
    _u, ridge, _rel = fit_ridge(stats)
    assert ridge >= 1e-2


def test_weighting_rows_equals_repeating_them() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 6, generator=g, dtype=torch.float64), torch.randn(400, generator=g, dtype=torch.float64)
    cpu = torch.device("cpu")
    body, head, repeated = Stats(6, cpu), Stats(6, cpu), Stats(6, cpu)
    for fold in (0, 1):
        rows = slice(10 + fold, 400, 2)
        body.add(fold, x[rows], y[rows])
        repeated.add(fold, x[rows], y[rows])
        head.add(fold, x[fold:10:2], y[fold:10:2])
        for _ in range(5):
            repeated.add(fold, x[fold:10:2], y[fold:10:2])
    combined = body.plus(head, 5.0)
    for name in ("xtx", "xty", "yty"):
        torch.testing.assert_close(getattr(combined, name), getattr(repeated, name))
    assert combined.n == [200, 200] and combined.sq == body.sq + head.sq  # weights do not move the penalty scale


def test_a_heavier_first_position_must_halve_the_held_in_kl() -> None:
    # held-in KL measured on SmolLM2 at 4x: L6 (the sink badly fitted), then L24 (a 20% gain that did not hold out)
    assert choose_first_weight({1.0: 0.526, 10.0: 0.172, 100.0: 0.132}) == 100.0
    assert choose_first_weight({1.0: 0.0073, 10.0: 0.0060, 100.0: 0.0192}) == 1.0
    assert choose_first_weight({1.0: 0.2}) == 1.0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_position_zero_weight_is_chosen_by_held_in_kl(family: str) -> None:
    lm = tiny_lm(family)
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    # share_steps=0: post-norm writers keep the split shares, so the candidates differ only in position 0's weight
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=2048, first_weights=(1.0, 100.0), share_steps=0)
    assert set(cal.selection_kl) == {1.0, 100.0}
    assert cal.first_weight == choose_first_weight(cal.selection_kl)
    # The selection replays only the blocks from the writer on; full passes must give the same KL.
    kl = _replayed_kl(lm, vec, {f.module: (f.A, f.B) for f in cal.fits})
    assert kl == pytest.approx(cal.selection_kl[cal.first_weight], rel=1e-4)
    single = calibrate(lm.model, lm.tokenizer, vec, tokens=2048, first_weights=(1.0,), share_steps=0)
    assert single.selection_kl == {} and single.first_weight == 1.0


def _replayed_kl(lm, vec: SteeringVector, params: dict) -> float:
    """Mean KL(hook ‖ adapter) over the selection tokens, from full forward passes."""
    kl = n = 0.0
    with torch.no_grad():
        for batch in corpus.batches(lm.tokenizer, "calibration", SELECT_TOKENS, max_doc_tokens=64, by_length=True):
            keep = batch.attention_mask.bool()
            with steering(lm.model, vec):
                hook = torch.log_softmax(lm.model(batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
            with lowrank_updates(lm.model, params):
                adapted = torch.log_softmax(lm.model(batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
            kl += float(kl_per_token(hook[keep], adapted[keep]).sum())
            n += int(keep.sum())
    return kl / n


def test_balance_keeps_the_product() -> None:
    a, b = torch.randn(5) * 100, torch.randn(7) * 0.01
    a2, b2 = balance(a, b)
    torch.testing.assert_close(torch.outer(b2, a2), torch.outer(b, a))
    assert math.isclose(float(a2.norm()), float(b2.norm()), rel_tol=1e-5)


def test_corpus_splits_are_disjoint_and_deterministic() -> None:
    cal, held = corpus.documents("calibration"), corpus.documents("heldout")
    assert len(held) > 500 and len(cal) > 4 * len(held)
    assert not {d.text for d in cal} & {d.text for d in held}
    # Generated documents are split by topic: no held-out topic was ever calibrated on, in any format.
    topics = [{d.topic for d in docs if d.source == "generated"} for docs in (cal, held)]
    assert len(topics[1]) > 150 and not topics[0] & topics[1]
    for docs in (cal, held):
        assert {d.source for d in docs} == {"generated", "wordnet", "fortunes", "jargon"}
        assert {d.format for d in docs} == set(corpus.FORMATS)
    lm = tiny_lm("llama")
    first = [b.input_ids for b in corpus.batches(lm.tokenizer, "heldout", 600)]
    again = [b.input_ids for b in corpus.batches(lm.tokenizer, "heldout", 600)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sum(int(b.attention_mask.sum()) for b in corpus.batches(lm.tokenizer, "heldout", 600)) == 600


def test_batching_by_length_keeps_the_tokens_and_cuts_padding() -> None:
    lm = tiny_lm("llama")

    def docs(batches: list[corpus.Batch]) -> dict[int, list[int]]:
        return {
            int(i): row[mask.bool()].tolist()
            for b in batches
            for i, row, mask in zip(b.doc_index, b.input_ids, b.attention_mask, strict=True)
        }

    plain = list(corpus.batches(lm.tokenizer, "calibration", 20000, max_doc_tokens=4096))
    grouped = list(corpus.batches(lm.tokenizer, "calibration", 20000, max_doc_tokens=4096, by_length=True))
    assert docs(grouped) == docs(plain)
    padded = sum(b.attention_mask.numel() for b in grouped)
    assert padded < 0.8 * sum(b.attention_mask.numel() for b in plain)


def test_chat_models_read_every_format_in_equal_measure_and_base_models_plain_text() -> None:
    chat, plain = tiny_lm("llama", chat=True), tiny_lm("llama", chat=False)
    rows = [
        (f, ids)
        for b in corpus.batches(chat.tokenizer, "heldout", 4000)
        for f, ids in zip(b.formats, b.input_ids, strict=True)
    ]
    batches = list(corpus.batches(chat.tokenizer, "heldout", 4000))
    measured = {f: 0 for f in corpus.FORMATS}
    for b in batches:
        for f, row in zip(b.formats, b.measured, strict=True):
            measured[f] += int(row.sum())
    # any budget holds each format about equally where it is measured (documents come whole, so not exactly)
    assert max(measured.values()) < 1.6 * min(measured.values()), measured
    bos = chat.tokenizer.bos_token_id
    for fmt, ids in rows:
        if fmt == "plain":  # plain text: what the tokenizer adds, here nothing (the tiny tokenizer adds no BOS)
            assert ids[0] != bos or chat.tokenizer("x").input_ids[0] == bos
        else:  # the template's own special tokens, once: not a second BOS from the tokenizer
            assert ids[0] == bos and ids[1] != bos
    system = next(d for d in corpus.documents("heldout") if d.format == "system")
    assert system.render(chat.tokenizer)[1].startswith("<bos>system: ")
    multi = next(d for d in corpus.documents("heldout") if d.format == "multiturn")
    assert multi.render(chat.tokenizer)[1].count("<bos>user: ") == 2
    assert {f for b in corpus.batches(plain.tokenizer, "heldout", 4000) for f in b.formats} == {"plain"}
    assert system.render(plain.tokenizer) == ("plain", system.text)
    fmts = [f for f, _ in corpus.prompts(chat.tokenizer, 8)]
    assert fmts == list(corpus.FORMATS) * 2
    assert all(p.endswith("<bos>assistant: ") for f, p in corpus.prompts(chat.tokenizer, 8) if f != "plain")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_calibration_fits_its_target(family: str) -> None:
    lm = tiny_lm(family)
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL)})
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=2048, split_writers=False, writer="own")
    (fit,) = cal.fits
    assert fit.module.endswith(("mlp.down_proj", "mlp.c_proj"))
    assert fit.target == ("rms(Wx)" if family == "gemma3" else "one")
    assert cal.tokens == 2048 and fit.tokens == 2048
    assert fit.cv_rel_rmse < 0.25


def test_two_sites_on_one_writer_are_refused() -> None:
    lm = tiny_lm("llama")
    vec = SteeringVector(
        {HookPoint(1, "resid_post"): torch.randn(D_MODEL), HookPoint(2, "resid_pre"): torch.randn(D_MODEL)}
    )
    with pytest.raises(ValueError, match="both written by model.layers.1.mlp.down_proj"):
        calibrate(lm.model, lm.tokenizer, vec, tokens=512)


def test_refine_lowers_kl_on_post_norm() -> None:
    """End-to-end refinement starts from the closed form and must not end worse on its own objective."""
    from steer_core.fit.refine import refine

    lm = tiny_lm("gemma3")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=1024)
    refined = refine(lm.model, lm.tokenizer, vec, cal, steps=40, lr=1e-2)
    assert refined.refine is not None and refined.refine["steps"] == 40
    assert refined.refine["kl_last"] < refined.refine["kl_first"]
    assert refined.fits[0].refined_steps == 40
    assert not torch.equal(refined.fits[0].A, cal.fits[0].A)


def test_split_shares_add_up_and_favour_the_larger_gain() -> None:
    from steer_core.fit.shares import split_shares

    v = torch.tensor([1.0, 2.0, -3.0])
    a, m = split_shares(v, torch.tensor([10.0, 1.0, 1.0]), torch.tensor([1.0, 10.0, 1.0]))
    torch.testing.assert_close(a + m, v)
    assert abs(a[0]) > 0.98 and abs(m[1]) > 1.96 and a[2] == m[2] == -1.5


def test_a_zero_norm_gain_gives_a_finite_adapter() -> None:
    """Gemma-3-270M layer 1 has dimensions whose norm gain is 0 in both writers: B must stay finite (it was NaN)."""
    from steer_core.fit.shares import split_shares, through_gain

    v = torch.tensor([1.0, 2.0, 3.0])
    g_attn, g_mlp = torch.tensor([0.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])
    a, m = split_shares(v, g_attn, g_mlp)
    torch.testing.assert_close(a + m, v)
    b_attn, b_mlp = through_gain(a, g_attn), through_gain(m, g_mlp)
    assert torch.isfinite(b_attn).all() and torch.isfinite(b_mlp).all()
    torch.testing.assert_close(b_attn, torch.tensor([0.0, 0.0, 0.75]))
    torch.testing.assert_close(b_mlp, torch.tensor([0.0, 2.0, 0.75]))


def test_split_writers_fits_both_post_norm_writers(tmp_path) -> None:
    from steer_core.export import export

    lm = tiny_lm("gemma3")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3}, {"source": "test"})
    result = export(lm, vec, tmp_path / "a", calibration_tokens=1024, verify_tokens=256, split_writers=True)
    fits = json.loads((result.folder / "steering.json").read_text())["fits"]
    assert sorted(f["writer_kind"] for f in fits) == ["attn", "mlp"]
    assert all(f["writer_layer"] == 1 for f in fits)
    assert set(result.report.fit_abs_error) == {f["module"] for f in fits}


def test_fit_shares_models_what_gemmas_norm_does_and_lowers_its_loss() -> None:
    """fit_shares' per-token addition is what the model's own post-norm gives for z + rms(z)·B (A·x = rms(Wx))."""
    from steer_core.fit.postnorm import rms_target
    from steer_core.fit.shares import fit_shares, split_shares, through_gain

    lm = tiny_lm("gemma3")
    layer = lm.model.model.layers[1]
    norms = {"attn": layer.post_attention_layernorm, "mlp": layer.post_feedforward_layernorm}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in norms.values():  # gains far from 1 and one near 0, as in Gemma-3-270M
            norm.weight.copy_(torch.randn(D_MODEL, generator=g) * 2)
            norm.weight[0] = -0.99
    gains = {k: 1 + n.weight.detach() for k, n in norms.items()}
    z = {k: torch.randn(256, D_MODEL, generator=g) * 3 for k in norms}
    zhat = {k: t / rms_target(t, norms[k].eps).unsqueeze(-1) for k, t in z.items()}
    v = torch.randn(D_MODEL, generator=g) * 2
    metric = torch.rand(D_MODEL, generator=g) + 0.1
    a, m = split_shares(v, gains["attn"], gains["mlp"])
    init = {"attn": through_gain(a, gains["attn"]), "mlp": through_gain(m, gains["mlp"])}
    fitted, before, after = fit_shares(v, zhat, gains, metric, init, steps=300)
    assert after < 0.8 * before

    def loss_through_the_model(bs: dict) -> float:
        with torch.no_grad():
            added = sum(norms[k](z[k] + rms_target(z[k], norms[k].eps)[:, None] * bs[k]) - norms[k](z[k]) for k in z)
        return float(((added - v).pow(2) * metric).sum(-1).mean())

    assert loss_through_the_model(init) == pytest.approx(before, rel=1e-3)
    assert loss_through_the_model(fitted) == pytest.approx(after, rel=1e-3)


def test_reader_metric_follows_the_later_norms_gains() -> None:
    from steer_core.fit.shares import reader_metric
    from steer_core.sites import architecture_for

    lm = tiny_lm("gemma3")
    arch = architecture_for(lm.model)
    before = reader_metric(lm.model, arch, 0)
    with torch.no_grad():
        lm.model.model.layers[1].input_layernorm.weight[3] += 5.0  # a later layer reads dimension 3 harder
    after = reader_metric(lm.model, arch, 0)
    assert before.shape == (D_MODEL,) and (before > 0).all()
    assert after[3] > 2 * before[3]
    # a norm before the writer does not read what it writes
    torch.testing.assert_close(reader_metric(lm.model, arch, 1), reader_metric(tiny_lm("gemma3").model, arch, 1))


def test_post_norm_calibration_fits_the_shares_and_keeps_the_better_by_held_in_kl() -> None:
    lm = tiny_lm("gemma3")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    split = calibrate(lm.model, lm.tokenizer, vec, tokens=1024, share_steps=0, first_weights=(1.0,))
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=1024, first_weights=(1.0,))
    assert split.shares == {}
    (losses,) = cal.shares["sites"].values()
    assert losses["loss_fitted"] < losses["loss_split"]
    kl = cal.shares["held_in_kl"]
    assert cal.shares["used"] == min(kl, key=kl.get)
    for a, b in zip(split.fits, cal.fits, strict=True):
        torch.testing.assert_close(a.A / a.A.norm(), b.A / b.A.norm())  # A fits rms(Wx) either way
        same_b = torch.allclose(a.B / a.B.norm(), b.B / b.B.norm())
        assert same_b == (cal.shares["used"] == "split")
    # the KL recorded for the split is that of the split adapter
    params = {f.module: (f.A, f.B) for f in split.fits}
    assert kl["split"] == pytest.approx(_replayed_kl(lm, vec, params), rel=1e-4)


def test_lowrank_updates_add_b_of_a_x() -> None:
    """Rank r: (d_in,) / (d_out,) vectors are rank 1, (r, d_in) / (d_out, r) matrices are PEFT's lora_A / lora_B."""
    lm = tiny_lm("llama")
    name = "model.layers.1.mlp.down_proj"
    module = lm.model.get_submodule(name)
    x = torch.randn(2, 5, module.in_features)
    a, b = torch.randn(3, module.in_features), torch.randn(module.out_features, 3)
    with lowrank_updates(lm.model, {name: (a, b)}):
        out = module(x)
    torch.testing.assert_close(out, module(x) + x @ a.T @ b.T)
    with lowrank_updates(lm.model, {name: (a[0], b[:, 0])}):
        out = module(x)
    torch.testing.assert_close(out, module(x) + (x @ a[0]).unsqueeze(-1) * b[:, 0])


def test_train_passes_over_the_held_in_text_again() -> None:
    """More steps than the held-in text holds still train every step (a second pass), on a rank-2 update."""
    from steer_core.fit.refine import train

    lm = tiny_lm("llama")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    held_in = sum(len(item[1]) for item in corpus._texts_until(lm.tokenizer, "calibration", 10**9, 32))
    name = "model.layers.1.mlp.down_proj"
    module = lm.model.get_submodule(name)
    a = torch.zeros(2, module.in_features, requires_grad=True)
    b = (torch.randn(module.out_features, 2) * 0.01).requires_grad_(True)
    steps = held_in // (256 * 32) + 3
    seen: list[int] = []
    losses = train(
        lm.model, lm.tokenizer, vec, {name: (a, b)}, torch.optim.Adam([a, b], lr=1e-2),
        steps=steps, batch_size=256, max_doc_tokens=32, on_step=lambda s, _kl: seen.append(s),
    )  # fmt: skip
    assert len(losses) == steps and seen == list(range(1, steps + 1))
    assert float(a.detach().abs().sum()) > 0  # A moved from zero, so the gradient reached it
    assert min(losses[-3:]) < losses[0]


def test_cosine_decay_runs_the_learning_rate_down_to_zero() -> None:
    from steer_core.fit.refine import cosine_decay

    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.5)
    schedule = cosine_decay(opt, 10)
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(12):
        opt.step()
        schedule.step()
        rates.append(opt.param_groups[0]["lr"])
    assert rates[0] == 0.5 and math.isclose(rates[5], 0.25) and rates[10] == 0.0 and rates[12] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(rates))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_refine_takes_the_learning_rate_measured_for_its_norm_placement(family: str) -> None:
    from steer_core.fit.refine import LR_POST_NORM, LR_PRE_NORM, refine

    lm = tiny_lm(family)
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=512)
    refined = refine(lm.model, lm.tokenizer, vec, cal, steps=2)
    assert refined.refine is not None
    assert refined.refine["lr"] == (LR_POST_NORM if family == "gemma3" else LR_PRE_NORM)
    assert refined.refine["batch_size"] == 2  # the CPU's default


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_default_refinement_follows_the_device_and_the_norm_placement(family: str) -> None:
    from steer_core.fit.refine import (
        DEFAULT_BATCH_CPU,
        DEFAULT_BATCH_GPU,
        DEFAULT_STEPS_GPU,
        DEFAULT_STEPS_POST_NORM,
        RefineDefaults,
        defaults,
        defaults_for,
    )

    post_norm = family == "gemma3"
    cpu = RefineDefaults(DEFAULT_STEPS_POST_NORM if post_norm else 0, DEFAULT_BATCH_CPU)
    assert defaults(tiny_lm(family).model) == cpu
    assert defaults_for("cuda", post_norm) == RefineDefaults(DEFAULT_STEPS_GPU, DEFAULT_BATCH_GPU)
    assert defaults_for("mps", post_norm) == cpu  # measured on CUDA only


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_second_vector_at_a_site_reuses_its_writers_statistics_and_fits_as_if_fresh(family: str) -> None:
    lm = tiny_lm(family)
    site = HookPoint(1, "resid_post")
    first = calibrate(lm.model, lm.tokenizer, SteeringVector({site: torch.randn(D_MODEL) * 3}), tokens=512)
    other = SteeringVector({site: torch.randn(D_MODEL) * 5})  # another feature, another strength
    again = calibrate(lm.model, lm.tokenizer, other, tokens=512)
    assert not first.reused_statistics and again.reused_statistics
    twin = tiny_lm(family)  # the same weights, another model: nothing is shared between models
    fresh = calibrate(twin.model, twin.tokenizer, other, tokens=512)
    assert not fresh.reused_statistics
    assert [f.module for f in again.fits] == [f.module for f in fresh.fits]
    for kept, new in zip(again.fits, fresh.fits, strict=True):
        assert torch.equal(kept.A, new.A) and torch.equal(kept.B, new.B) and kept.ridge == new.ridge
    assert again.tokens == fresh.tokens and again.first_weight == fresh.first_weight


def test_statistics_are_reused_only_for_one_site_with_the_same_settings() -> None:
    from steer_core.fit.ridge import STATISTICS_KEPT, forget_statistics

    lm = tiny_lm("llama")
    one, two = HookPoint(1, "resid_post"), HookPoint(2, "resid_post")

    def reused(points: tuple[HookPoint, ...], **kwargs: Any) -> bool:
        vec = SteeringVector({p: torch.randn(D_MODEL) * 3 for p in points})
        # one writer a calibration: the next block's attention writer would keep a second entry
        settings = {"tokens": 512, "writer": "own", **kwargs}
        return calibrate(lm.model, lm.tokenizer, vec, **settings).reused_statistics

    assert not reused((one,)) and reused((one,))
    assert not reused((one,), tokens=768) and not reused((one,), skip_bos=True) and not reused((two,))
    # Two sites: layer 2's MLP reads what layer 1's steering changed.
    assert not reused((one, two)) and not reused((one, two))
    # A model converted in place to another dtype is the same object with other activations.
    lm.model.to(torch.bfloat16)
    assert not reused((one,)) and reused((one,))
    lm.model.to(torch.float32)
    # forget_statistics: the next calibration makes a full pass again.
    assert reused((two,))
    forget_statistics(lm.model)
    assert not reused((two,)) and reused((two,))
    # At most STATISTICS_KEPT per model, the least recently used going first.
    lm = tiny_lm("llama")
    sizes = [512 + 256 * i for i in range(STATISTICS_KEPT + 1)]
    assert not any(reused((one,), tokens=t) for t in sizes[:-1])
    assert reused((one,), tokens=sizes[0])  # now the most recently used
    assert not reused((one,), tokens=sizes[-1])  # one too many: sizes[1] goes
    assert reused((one,), tokens=sizes[0]) and not reused((one,), tokens=sizes[1])


def test_statistics_over_the_byte_budget_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from steer_core.fit import ridge

    lm = tiny_lm("llama")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    monkeypatch.setattr(ridge, "STATISTICS_MAX_BYTES", 1000)  # less than one site's XᵀX
    assert not calibrate(lm.model, lm.tokenizer, vec, tokens=512).reused_statistics
    assert not calibrate(lm.model, lm.tokenizer, vec, tokens=512).reused_statistics
    monkeypatch.undo()
    calibrate(lm.model, lm.tokenizer, vec, tokens=512)
    assert calibrate(lm.model, lm.tokenizer, vec, tokens=512).reused_statistics


def test_the_next_blocks_attention_writer_is_a_candidate_chosen_by_held_in_kl() -> None:
    """A one-site vector on a pre-norm model: down_proj L, o_proj L+1 and the two splitting v are fitted and
    measured, the lowest held-in KL kept; none where there is no next block, on post-norm models or when asked."""
    lm = tiny_lm("llama")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3})
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=2048)
    choice = cal.writer_choice
    own, attn = "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj"
    kl = choice["unseen_kl"]
    assert set(kl) == {own, attn, f"{own} + {attn}"}
    best = min(kl, key=kl.__getitem__)
    assert choice["used"] == (best if kl[best] < NEXT_MARGIN * kl[own] else own)
    assert " + ".join(f.module for f in cal.fits) == choice["used"]
    v_norm = float(vec.directions[HookPoint(1, "resid_post")].norm())
    if choice["used"] == f"{own} + {attn}":  # the MLP writer keeps SPLIT of v, the attention writer the rest
        assert cal.fits[0].b_unscaled_norm == pytest.approx(0.75 * v_norm)
    assert calibrate(lm.model, lm.tokenizer, vec, tokens=2048, writer="own").writer_choice == {}
    last = SteeringVector({HookPoint(2, "resid_post"): torch.randn(D_MODEL)})
    assert calibrate(lm.model, lm.tokenizer, last, tokens=1024).writer_choice == {}
    gemma = tiny_lm("gemma3")
    assert calibrate(gemma.model, gemma.tokenizer, vec, tokens=1024).writer_choice == {}


def test_the_attention_response_is_what_the_writer_outputs_differently_under_the_hook() -> None:
    from steer_core.fit.composite import mean_responses

    lm = tiny_lm("llama")
    vec = SteeringVector({HookPoint(0, "resid_post"): torch.randn(D_MODEL) * 3})
    module = "model.layers.1.self_attn.o_proj"
    got = mean_responses(lm.model, lm.tokenizer, vec, module, 1, 512, skip_bos=False, already=(0.0, 1.0))
    assert torch.equal(got[1.0], torch.zeros(D_MODEL))  # the hook against itself
    got = got[0.0]
    outs = []
    batch = next(corpus.batches(lm.tokenizer, "calibration", 512, max_doc_tokens=64, by_length=True))
    keep = batch.attention_mask.bool()
    keep[:, 0] = False
    from steer_core.activations import recording

    for steer in (False, True):
        rows: list[torch.Tensor] = []
        with torch.no_grad(), recording(lm.model, [module], lambda _n, y, rows=rows: rows.append(y), what="output"):
            if steer:
                with steering(lm.model, vec):
                    lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            else:
                lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        outs.append(rows[0][keep])
    first_batch = (outs[1] - outs[0]).mean(0)
    assert got.norm() > 0 and torch.nn.functional.cosine_similarity(got, first_batch, dim=0) > 0.9


def test_an_export_on_the_attention_writer_loads_verifies_and_says_why(tmp_path) -> None:
    """Where the attention writer serves the vector (asked for here), the adapter is an o_proj LoRA on block L+1,
    its fit is measured on the unsteered input it reads, and steering.json and the card name the choice."""
    from steer_core.adapter.card import model_card
    from steer_core.export import export

    lm = tiny_lm("llama")
    vec = SteeringVector({HookPoint(1, "resid_post"): torch.randn(D_MODEL) * 3}, {"source": "test"})
    result = export(lm, vec, tmp_path / "a", calibration_tokens=1024, verify_tokens=256, writer="next")
    meta = json.loads((result.folder / "steering.json").read_text())
    assert meta["target_modules"] == ["model.layers.2.self_attn.o_proj"]
    assert meta["calibration"]["writer_choice"]["used"] == "model.layers.2.self_attn.o_proj"
    assert meta["fits"][0]["reads_steered"] is False and meta["fits"][0]["writer_layer"] == 2
    # A·x read off the unsteered pass, as the adapter reads it: close to its target 1
    assert result.report.fit_abs_error["model.layers.2.self_attn.o_proj"] < 0.25
    card = (result.folder / "README.md").read_text()
    assert "- writer: `model.layers.2.self_attn.o_proj`, asked for (`--writer next`)" in card
    meta["calibration"]["writer_choice"] = {"used": "m.o", "unseen_kl": {"m.d": 0.2, "m.o": 0.1}}
    assert "- writer: `m.o`, chosen by KL(hook ‖ adapter) per token on calibration text no fit saw (`m.d` 0.2, " in (
        model_card(SteeringRecord.from_dict(meta))
    )


def test_the_writer_choice_reads_calibration_text_no_fit_saw() -> None:
    lm = tiny_lm("llama")
    seen = {int(i) for b in corpus.batches(lm.tokenizer, "calibration", 2048, max_doc_tokens=256) for i in b.doc_index}
    after = corpus.batches_after(lm.tokenizer, "calibration", 2048, 1024, max_doc_tokens=256)
    unseen = [int(i) for b in after for i in b.doc_index]
    assert unseen and not seen & set(unseen)
    assert sum(int(b.attention_mask.sum()) for b in after) >= 1024 and any(b.measured.any() for b in after)
