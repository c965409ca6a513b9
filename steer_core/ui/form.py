"""The app's steering form: its inputs in the order Gradio passes them, and what recipe they ask for.

One dataclass is the one place a steering input is added: the app lays out a component per field (in this order),
its handlers receive `SteeringForm(*values)`, and tests build forms by name instead of 11-item lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from steer_core.ui.catalog import SAEChoice
from steer_core.ui.limits import Limits
from steer_core.ui.mix import FeatureMix, check_strength, unit_of
from steer_core.vectors.recipe import VectorRecipe, file_recipe

# The last source steers the preview with the served adapter's own stored vector (steer_core.ui.shared.own_vector):
# a source of the form rather than a separate switch, so that opening a shared adapter sets it like any other choice
# and every handler that builds a recipe refuses it by name instead of quietly building the form's other vector.
SOURCES = ("SAE features", "Contrastive prompts", "Vector file", "Served adapter's own vector")
SAE_FEATURES, CONTRASTIVE, VECTOR_FILE, SERVED_VECTOR = SOURCES
DEFAULT_UNIT = "× residual norm"


@dataclass(frozen=True)
class SteeringForm:
    """What the user filled in, as the components hold it (strings, floats from sliders, a file path or None)."""

    source: str = SAE_FEATURES
    sae_pick: str | None = ""
    sae_folder: str | None = ""
    mix: str | None = ""
    strength: float = 1.0
    unit: str = DEFAULT_UNIT
    positive: str | None = ""
    negative: str | None = ""
    layer: float = 10
    site: str = "resid_post"
    vector_file: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"steering source {self.source!r} is not one of {', '.join(SOURCES)}")

    def values(self) -> list[Any]:
        """The values in FIELDS order, as Gradio passes them to a handler."""
        return list(astuple(self))

    @property
    def sae_chosen(self) -> bool:
        return bool((self.sae_pick or self.sae_folder or "").strip())

    def recipe(self, choose_sae: Callable[[], SAEChoice], limits: Limits, tokenizer: Any = None) -> VectorRecipe:
        """The recipe this form asks for, within `limits`. `choose_sae` resolves the form's SAE (the app knows which
        SAEs a visitor may use); it is called only for SAE features. Prompts are counted when a tokenizer is given."""
        if self.source == SERVED_VECTOR:
            raise ValueError(
                "the served adapter's own vector steers the preview only: to write that adapter for another engine, "
                "use 'Export for another engine' under Shared adapters; to export a new one, steer with its SAE "
                "features, prompts or vector file"
            )
        if self.source == SAE_FEATURES:
            features = FeatureMix.parse(self.mix or "", self.strength)
            limits.check_features(len(features.items))
            return features.recipe(choose_sae(), self.unit)
        unit, value = unit_of(self.unit), self.strength
        check_strength(value, unit)
        site: Any = self.site  # VectorRecipe checks it against SITES
        if self.source == CONTRASTIVE:
            positive, negative = lines(self.positive), lines(self.negative)
            if tokenizer is not None:
                limits.check_prompts(tokenizer, positive, negative)
            return VectorRecipe(
                "contrastive", (value,), unit, layer=int(self.layer), site=site, positive=positive, negative=negative
            )
        if not self.vector_file:
            raise ValueError("upload a vector file (.safetensors, .pt, .npy or a llama.cpp control vector .gguf)")
        limits.check_upload(Path(self.vector_file).stat().st_size, "the vector file")
        return file_recipe(self.vector_file, (value,), unit, layer=int(self.layer), site=site)


FIELDS = tuple(f.name for f in fields(SteeringForm))


def lines(text: str | None) -> tuple[str, ...]:
    """One prompt per non-blank line."""
    return tuple(line for line in (text or "").splitlines() if line.strip())
