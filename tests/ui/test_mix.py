import contextlib
import math

import pytest

from steer_core.ui.catalog import SAEChoice
from steer_core.ui.mix import FeatureMix, check_strength, unit_of


def test_parse_each_feature_with_its_own_strength_or_the_default() -> None:
    mix = FeatureMix.parse("12:4, 7 : -2.5; #33\n5=1e1", default_strength=1.5)
    assert mix.items == ((12, 4.0), (7, -2.5), (33, 1.5), (5, 10.0))
    assert FeatureMix.parse(mix.format(), 0).items == mix.items
    assert FeatureMix.parse("  ", 1).items == ()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("12:abc", "12:abc"),
        ("dog", "FEATURE:STRENGTH"),
        ("1:nan", "finite"),
        ("1:4, 1:3", "twice"),
        ("-3:1", "FEATURE:STRENGTH"),
    ],
)
def test_parse_names_the_bad_part(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FeatureMix.parse(text, 1.0)


def test_with_feature_adds_or_restrengthens_in_place() -> None:
    mix = FeatureMix(((3, 2.0),)).with_feature(5, 1.0)
    assert mix.items == ((3, 2.0), (5, 1.0))
    assert mix.with_feature(3, -1.0).items == ((3, -1.0), (5, 1.0))
    assert mix.without(3).items == ((5, 1.0),)


def test_strength_limits_depend_on_the_unit() -> None:
    assert check_strength(50, "resid") == 50
    assert check_strength(5000, "abs") == 5000
    with pytest.raises(ValueError, match="too large"):
        check_strength(500, "resid")
    with pytest.raises(ValueError, match="finite"):
        check_strength(math.inf, "abs")
    assert unit_of("× residual norm") == "resid" and unit_of("abs") == "abs"
    with pytest.raises(ValueError, match="strength unit 'furlongs'"):
        unit_of("furlongs")


def test_recipe_carries_features_strengths_and_sae() -> None:
    choice = SAEChoice("r / id", release="r", sae_id="id")
    recipe = FeatureMix(((3, 2.0), (5, -1.0))).recipe(choice, "× residual norm")
    assert (recipe.source, recipe.features, recipe.strengths, recipe.strength_unit) == (
        "sae",
        (3, 5),
        (2.0, -1.0),
        "resid",
    )
    assert (recipe.sae_release, recipe.sae_id, recipe.path) == ("r", "id", None)
    with pytest.raises(ValueError, match="no feature chosen"):
        FeatureMix().recipe(choice, "abs")


def test_recipe_refuses_a_layer_its_source_would_ignore() -> None:
    from steer_core.vectors.recipe import VectorRecipe

    with pytest.raises(ValueError, match="layer 99 does not apply to a sae vector"):
        VectorRecipe("sae", (0.5,), "resid", features=(639,), layer=99)
    with pytest.raises(ValueError, match="layer 2 does not apply to a control_vector"):
        VectorRecipe("control_vector", (1.0,), path="c.gguf", layer=2)


@pytest.mark.parametrize(
    "text",
    [" " * 1_000_000, " :" * 300_000, "1" * 1_000_000 + "x", "1:" + "1" * 1_000_000 + "x", ", " * 400_000],
)
def test_parse_is_linear_on_a_megabyte_of_pathological_text(text: str) -> None:
    """The old `re.sub(r"\\s*([:=@×*])\\s*")` took 6 s on 32k spaces and ~25 minutes on 500 kB, holding the GIL."""
    import time

    start = time.perf_counter()
    with contextlib.suppress(ValueError):
        FeatureMix.parse(text, 1.0)
    assert time.perf_counter() - start < 2.0


def test_parse_joins_a_separator_with_its_neighbours_only() -> None:
    assert FeatureMix.parse("12 :4,7:  -1 33", 2.0).items == ((12, 4.0), (7, -1.0), (33, 2.0))
    with pytest.raises(ValueError, match="':4'"):
        FeatureMix.parse(", :4", 1.0)
