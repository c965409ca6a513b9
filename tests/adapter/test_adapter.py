import copy
import warnings

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict

from helpers import D_MODEL, tiny_lm, tiny_model
from steer_core.adapter.build import BuiltAdapter, build_ablate, build_exact, build_portable, check_tensors
from steer_core.fit.calibrate import calibrate
from steer_core.sites import HookPoint
from steer_core.steer import ablation, steering
from steer_core.vectors.vector import SteeringVector


def _apply(model: torch.nn.Module, built: BuiltAdapter) -> torch.nn.Module:
    """The adapter in memory, without disk: PEFT's own injection, then our tensors as its state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), built.config)
    result = set_peft_model_state_dict(peft_model, built.tensors)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora" in k]
    return peft_model.eval()


def _vector(layer: int = 1, site: str = "resid_post", scale: float = 2.0) -> SteeringVector:
    return SteeringVector({HookPoint(layer, site): torch.randn(D_MODEL) * scale})  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("sites", [[(1, "resid_post")], [(2, "resid_pre")], [(0, "attn_out"), (2, "mlp_out")]])
def test_exact_mode_equals_hook(family: str, sites: list) -> None:
    model = tiny_model(family)
    vec = SteeringVector({HookPoint(layer, site): torch.randn(D_MODEL) * 2 for layer, site in sites})
    adapted = _apply(model, build_exact(model, vec, "tiny"))
    ids = torch.randint(3, 90, (2, 11))
    with steering(model, vec):
        hook = model(ids, output_hidden_states=True)
    out = adapted(input_ids=ids, output_hidden_states=True)
    for h, a in zip(hook.hidden_states, out.hidden_states, strict=True):
        assert (h - a).abs().max() < 1e-5
    assert (hook.logits - out.logits).abs().max() < 1e-4


def test_exact_mode_refused_on_post_norm() -> None:
    model = tiny_model("gemma3")
    with pytest.raises(ValueError, match="not exact on post-norm"):
        build_exact(model, _vector(), "tiny")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ablate_mode_equals_hook_ablation(family: str) -> None:
    model = tiny_model(family)
    r = torch.randn(D_MODEL)
    built = build_ablate(model, r, "tiny")
    assert len(built.modules) == 2 * 3
    adapted = _apply(model, built)
    ids = torch.randint(3, 90, (2, 11))
    with ablation(model, r):
        hook = model(ids).logits
    assert (hook - adapted(input_ids=ids).logits).abs().max() < 1e-4


def test_post_norm_ablation_removes_the_direction_exactly() -> None:
    """On Gemma the adapter projects against g ⊙ r, so what each post-norm writes has no r component."""
    model = tiny_model("gemma3")
    r = torch.randn(D_MODEL)
    unit = r / r.norm()
    adapted = _apply(model, build_ablate(model, r, "tiny"))
    seen = []
    for layer in adapted.base_model.model.model.layers:
        for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
            norm.register_forward_hook(lambda _m, _a, out: seen.append(float((out @ unit).abs().max())))
    with torch.no_grad():
        adapted(input_ids=torch.randint(3, 90, (2, 9)))
    assert len(seen) == 6 and max(seen) < 1e-4


def test_portable_config_is_plain_rank1_lora() -> None:
    lm = tiny_lm("llama")
    vec = SteeringVector(
        {HookPoint(0, "attn_out"): torch.randn(D_MODEL), HookPoint(2, "resid_post"): torch.randn(D_MODEL)}
    )
    cal = calibrate(lm.model, lm.tokenizer, vec, tokens=1024)
    built = build_portable(lm.model, cal, "tiny")
    cfg = built.config
    assert (cfg.r, cfg.lora_alpha, cfg.lora_bias) == (1, 1, False)
    assert sorted(cfg.target_modules) == ["down_proj", "o_proj"]
    assert cfg.layers_to_transform == [0, 2] and cfg.layers_pattern == "layers"
    assert not any(k.endswith("bias") for k in built.tensors)
    # The config matches (layer, kind) pairs the vector does not use; those carry explicit zeros.
    assert not built.tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].any()
    assert built.tensors["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"].any()
    _apply(lm.model, built)  # loads with no missing or unexpected keys


def test_gpt2_targets_are_unambiguous() -> None:
    model = tiny_model("gpt2")
    built = build_ablate(model, torch.randn(D_MODEL), "tiny")
    assert sorted(built.config.target_modules) == ["attn.c_proj", "mlp.c_proj"]
    assert built.config.fan_in_fan_out


def test_check_tensors_refuses_bad_adapters() -> None:
    with pytest.raises(ValueError, match="no tensors"):
        check_tensors({})
    with pytest.raises(ValueError, match="every adapter tensor is zero"):
        check_tensors({"a": torch.zeros(1, 4), "b": torch.zeros(4, 1)})
    with pytest.raises(ValueError, match="non-finite"):
        check_tensors({"a": torch.tensor([[1.0, float("inf")]])})
    with pytest.raises(ValueError, match="empty"):
        check_tensors({"a": torch.zeros(0)})
