"""The post-norm writers' shares of v (steer_core.fit.shares): split by the norms' gains, then fitted."""

from __future__ import annotations

import pytest
import torch

from helpers import D_MODEL, tiny_lm


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
