"""End to end on the embedded real models: load (cached), export, reload through PEFT, verify.

Fidelity floors are the values measured at the time of writing minus noise (see the closing notes); never loosen them
to pass. The models load once per test run.
"""

from pathlib import Path

import pytest
import torch

from steer_core.activations import median_norm
from steer_core.export import export
from steer_core.model import EMBEDDED_MODELS, LoadedModel, resolve
from steer_core.sites import HookPoint
from steer_core.vectors.vector import SteeringVector

pytestmark = pytest.mark.e2e


def _check_formats(rep, floors: dict[str, float]) -> None:
    """Every format a chat model is served in was verified on its own ~quarter of the held-out tokens, with its own
    greedy prompts, and each reaches its floor (measured minus noise)."""
    assert set(rep.by_format) == {"chat", "system", "multiturn", "plain"}, rep.by_format
    for fmt, floor in floors.items():
        figures = rep.by_format[fmt]
        assert figures["tokens"] >= 0.2 * rep.tokens and figures["greedy_prompts"] == 2
        assert figures["top1_agreement"] >= floor, (fmt, figures)


def _check_prediction(lm: LoadedModel, vector: SteeringVector, layer: int, measured: float) -> None:
    """The servability map's cell for this vector (a miniature export) predicts the full export's top-1 within 5
    points (scripts/map_check.py: 9 of 10 benchmark rows, errors -2.3 to +5.7 points, L6 4× -2.3, L15 4× -0.2)."""
    from steer_core.check.servability import predict

    cell = predict(lm, vector, layer, 4.0)
    assert abs(cell.top1 - measured) <= 0.05, (layer, cell, measured)
    assert cell.servable == (measured >= 0.95) or abs(measured - 0.95) < 0.02


def _random_vector(lm: LoadedModel, point: HookPoint, k: float, unit: str) -> SteeringVector:
    g = torch.Generator().manual_seed(point.layer)
    v = torch.randn(lm.model.config.hidden_size, generator=g)
    norm = median_norm(lm.model, lm.tokenizer, point, unit)  # type: ignore[arg-type]
    return SteeringVector({point: v / v.norm() * k * norm}, {"source": "random", "k": k, "unit": unit})


def test_cached_smollm2_matches_the_gguf_load(smollm2: LoadedModel) -> None:
    from transformers import AutoModelForCausalLM

    from steer_core.model import _embedded_gguf

    gguf = _embedded_gguf(EMBEDDED_MODELS["smollm2-135m-instruct"])
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, smollm2.model(ids).logits)
    assert Path(resolve("smollm2-135m-instruct")[0], "model.safetensors").exists()
    assert smollm2.is_chat and smollm2.model.config.num_hidden_layers == 30


@pytest.mark.parametrize(
    ("layer", "floor", "format_floor"),
    [
        (15, 0.99, 0.98),  # broad held-out text, answer positions: 99.6%; by format 99.3-99.9% (system worst)
        (25, 0.97, 0.97),  # 99.1%; by format 98.4-99.4% (plain worst)
    ],
)
def test_smollm2_portable_at_4x(
    smollm2: LoadedModel, tmp_path: Path, layer: int, floor: float, format_floor: float
) -> None:
    """SmolLM2, vector norm 4× the layer's median residual norm (the issue's bar: top-1 ≥ 95%), in every format:
    a plain-text prompt, a system-prompted chat, a single and a two-turn chat, each on its own held-out tokens."""
    vec = _random_vector(smollm2, HookPoint(layer, "resid_post"), 4.0, "resid")
    result = export(smollm2, vec, tmp_path / "a", engine_scales=())
    rep = result.report
    print(f"smollm2 L{layer} 4x: {rep.summary()}; seconds {result.seconds}")
    assert rep.top1_agreement >= floor
    assert rep.kl_ratio <= 0.01
    assert rep.kl_hook_base > 1.0, "a 4x vector changes the model a lot"
    _check_formats(rep, dict.fromkeys(("chat", "system", "multiturn", "plain"), format_floor))
    assert result.meta["fidelity"]["by_format"] == rep.by_format
    _check_prediction(smollm2, vec, layer, rep.top1_agreement)


def test_smollm2_early_layer_weighs_the_attention_sink(smollm2: LoadedModel, tmp_path: Path) -> None:
    """L6 at 4×: fitting position 0 like any token gave 42.4% / KL ratio 0.061; calibration now weighs it.

    On the broad held-out text (answer positions) this layer is far from the hook in every format: 32.1% / 0.0506,
    against 28.5% / 0.0855 (plain text 7.5%) with the earlier chat-only calibration, same vector (the closing note)."""
    vec = _random_vector(smollm2, HookPoint(6, "resid_post"), 4.0, "resid")
    result = export(smollm2, vec, tmp_path / "a", engine_scales=())
    rep = result.report
    print(f"smollm2 L6 4x: {rep.summary()}; calibration {result.meta['calibration']}")
    assert result.meta["calibration"]["first_weight"] > 1
    assert rep.top1_agreement >= 0.29  # measured 32.1%
    assert rep.kl_ratio <= 0.065  # measured 0.0506
    _check_formats(rep, {"plain": 0.22})  # measured 26.4% (7.5% with the chat-only calibration)
    _check_prediction(smollm2, vec, 6, rep.top1_agreement)


def test_smollm2_exact_is_exact(smollm2: LoadedModel, tmp_path: Path) -> None:
    vec = _random_vector(smollm2, HookPoint(10, "resid_post"), 4.0, "resid")
    rep = export(smollm2, vec, tmp_path / "a", mode="exact", verify_tokens=512).report
    assert rep.top1_agreement == 1.0 and rep.kl_hook_adapter < 1e-4


def test_smollm2_contrastive_vector_passes_verify(smollm2: LoadedModel, tmp_path: Path) -> None:
    """The shipped "joy" contrastive recipe, exported as a portable adapter, matches its hook on held-out text."""
    from steer_core.vectors.recipe import VectorRecipe

    recipe = VectorRecipe(
        "contrastive", (0.3,), "resid", layer=10,
        positive=("I love this, it is wonderful and makes me so happy!", "What a beautiful, joyful day."),
        negative=("I hate this, it is awful and makes me so sad.", "What a miserable, gloomy day."),
    )  # fmt: skip
    rep = export(smollm2, recipe.build(smollm2), tmp_path / "a", engine_scales=()).report
    print(f"smollm2 joy L10 0.3x: {rep.summary()}")
    # broad held-out text, answer positions: 92.3% / 0.019 (the earlier chat-only calibration and resid scale: 88.9%
    # / 0.0448 on the same text)
    assert rep.top1_agreement >= 0.90
    assert rep.kl_ratio <= 0.025
    _check_formats(rep, dict.fromkeys(("chat", "system", "multiturn", "plain"), 0.88))  # 90.8-93.7%


@pytest.mark.parametrize(
    ("layer", "floor", "kl_ceiling", "shares"),
    [
        # measured 82.8% / 0.065 on the broad held-out text (the earlier calibration: 82.3% / 0.0657, same vector);
        # on the earlier quotations 85.9% / 0.067 (66.0% / 0.461 split; 59.5% / 0.747 MLP writer alone)
        (9, 0.80, 0.09, "fitted"),
        (5, 0.35, 0.33, "split"),  # measured 37.9% / 0.289 (39.1% / 0.300 on the quotations)
    ],
)
def test_gemma_portable_reports_its_fidelity(
    gemma: LoadedModel, tmp_path: Path, layer: int, floor: float, kl_ceiling: float, shares: str
) -> None:
    """Gemma 3 (post-norm): 0.25× the post-normed MLP output norm. No adapter is exact here (docs/math.md)."""
    assert gemma.arch.post_norm and not gemma.is_chat
    vec = _random_vector(gemma, HookPoint(layer, "resid_post"), 0.25, "writer")
    result = export(gemma, vec, tmp_path / "a", engine_scales=())
    rep = result.report
    print(f"gemma L{layer} 0.25x: {rep.summary()}; seconds {result.seconds}")
    assert result.meta["notes"] and "post-norm" in result.meta["notes"][0]
    assert rep.top1_agreement >= floor
    assert rep.kl_ratio < kl_ceiling
    chosen = result.meta["calibration"]["post_norm_shares"]
    assert chosen["used"] == shares == min(chosen["held_in_kl"], key=chosen["held_in_kl"].get)


def test_gemma_refined_by_default_goes_far_past_the_closed_form(gemma: LoadedModel, tmp_path: Path) -> None:
    """The CLI's and the app's default on post-norm models: 60 refinement steps after the closed form.

    Gemma L9 at 1× the writer norm: the closed form alone measured 7.0% / KL ratio 0.453 (the benchmark table).
    """
    from steer_core.fit.refine import default_steps

    vec = _random_vector(gemma, HookPoint(9, "resid_post"), 1.0, "writer")
    result = export(gemma, vec, tmp_path / "a", refine_steps=default_steps(gemma.model), engine_scales=())
    rep = result.report
    print(f"gemma L9 1x refined: {rep.summary()}; seconds {result.seconds}")
    assert result.meta["calibration"]["refine"]["steps"] == 60
    assert rep.top1_agreement >= 0.70  # measured 74.4% (scripts.refine_curve, same text)
    assert rep.kl_ratio < 0.14  # measured 0.121
