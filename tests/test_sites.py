import pytest
import torch

from helpers import D_MODEL, tiny_model
from steer_core.sites import HookPoint, architecture_for, parse_hook_name
from steer_core.steer import steering
from steer_core.vectors.vector import SteeringVector


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("blocks.5.hook_resid_post", HookPoint(5, "resid_post")),
        ("blocks.0.hook_resid_pre", HookPoint(0, "resid_pre")),
        ("blocks.7.hook_mlp_out", HookPoint(7, "mlp_out")),
        ("blocks.7.hook_attn_out", HookPoint(7, "attn_out")),
        ("blocks.3.hook_resid_mid", HookPoint(3, "attn_out")),
        ("model.layers.9.output", HookPoint(9, "resid_post")),
        ("model.layers.9.input", HookPoint(9, "resid_pre")),
        ("layers.4.mlp.output", HookPoint(4, "mlp_out")),
        ("model.layers.2.self_attn.output", HookPoint(2, "attn_out")),
        ("model.language_model.layers.2.output", HookPoint(2, "resid_post")),
        ("transformer.h.1.output", HookPoint(1, "resid_post")),
    ],
)
def test_parse_hook_name(name: str, expected: HookPoint) -> None:
    assert parse_hook_name(name) == expected


@pytest.mark.parametrize("name", ["blocks.5.attn.hook_z", "blocks.x.hook_resid_post", "model.layers.3.mlp.input", ""])
def test_parse_hook_name_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="hook"):
        parse_hook_name(name)


def test_hookpoint_checks_fields() -> None:
    with pytest.raises(ValueError, match="resid_mid"):
        HookPoint(1, "resid_mid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        HookPoint(-1, "resid_post")


def test_writer_mapping() -> None:
    assert HookPoint(4, "resid_post").writer() == (4, "mlp")
    assert HookPoint(4, "mlp_out").writer() == (4, "mlp")
    assert HookPoint(4, "resid_pre").writer() == (3, "mlp")
    assert HookPoint(4, "attn_out").writer() == (4, "attn")
    with pytest.raises(ValueError, match="embedding"):
        HookPoint(0, "resid_pre").writer()


def test_unsupported_architecture_lists_supported() -> None:
    model = torch.nn.Linear(2, 2)
    model.config = type("C", (), {"model_type": "mamba"})()  # type: ignore[assignment]
    with pytest.raises(ValueError, match="mamba.*supported: gemma"):
        architecture_for(model)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "mlp_out"])
def test_site_conventions_match_hidden_states(family: str, site: str) -> None:
    """Adding v at (L, site) moves HF hidden_states exactly where the convention says, and nowhere earlier."""
    model = tiny_model(family, layers=3)
    ids = torch.randint(3, 90, (2, 9))
    v = torch.randn(D_MODEL)
    layer = 1
    base = model(ids, output_hidden_states=True).hidden_states
    with steering(model, SteeringVector({HookPoint(layer, site): v})):  # type: ignore[arg-type]
        steered = model(ids, output_hidden_states=True).hidden_states
    index = layer if site == "resid_pre" else layer + 1  # hidden_states[L] = resid_pre L
    for i in range(index):
        torch.testing.assert_close(steered[i], base[i])
    torch.testing.assert_close(steered[index] - base[index], v.expand_as(base[index]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_attn_out_lands_before_the_mlp(family: str) -> None:
    """attn_out L is added to the residual before block L's MLP reads it: resid_post L moves by v + ΔMLP."""
    model = tiny_model(family, layers=3)
    ids = torch.randint(3, 90, (1, 7))
    v = torch.randn(D_MODEL)
    base = model(ids, output_hidden_states=True).hidden_states
    with steering(model, SteeringVector({HookPoint(1, "attn_out"): v})):
        steered = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(steered[1], base[1])
    assert not torch.allclose(steered[2] - base[2], v.expand_as(base[2]), atol=1e-4)
