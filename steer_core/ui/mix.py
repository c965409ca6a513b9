"""A mix of SAE features, each with its own strength, written as text the user can edit: "1234:4, 77:-2"."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from steer_core.ui.catalog import SAEChoice
from steer_core.vectors.recipe import VectorRecipe

# Dropdown label -> VectorRecipe strength_unit. Residual-norm units first: the same number means roughly the same
# push on any model, where an absolute coefficient depends on the SAE's decoder norms.
UNITS: dict[str, str] = {
    "× residual norm": "resid",
    "absolute (× decoder row)": "abs",
    "× writer output norm": "writer",
}
# Past these the model emits noise; a typo (an extra zero) should be an error, not a wasted generation.
MAX_STRENGTH: dict[str, float] = {"resid": 100.0, "writer": 100.0, "abs": 10_000.0}
SLIDER_RANGE: dict[str, tuple[float, float, float]] = {
    "resid": (-20.0, 20.0, 0.1),
    "writer": (-20.0, 20.0, 0.1),
    "abs": (-400.0, 400.0, 1.0),
}

_SEPARATORS = ":=@×*"
# A token is a run of anything but separators and spaces, or one separator: no two alternatives can match the same
# characters, so findall is linear however the text is made.
_TOKEN = re.compile(r"[^\s,;:=@×*]+|[,;:=@×*]")
_ITEM = re.compile(r"^#?(\d+)(?:[:=@×*]([-+]?(?:[\d.eE+-]+|nan|inf)))?$", re.IGNORECASE)


def _items(text: str) -> list[str]:
    """The items of a mix as 'FEATURE' or 'FEATURE:STRENGTH' strings, separators and surrounding spaces dropped."""
    items: list[str] = []
    joining = False  # the last token was a separator: the next one is its strength
    for token in _TOKEN.findall(text):
        if token in ",;":
            joining = False
        elif token in _SEPARATORS:
            if not items or items[-1][-1:] in _SEPARATORS:
                items.append(token)  # a stray separator: _ITEM refuses the item and names it
            else:
                items[-1] += token
            joining = True
        elif joining and items:
            items[-1] += token
            joining = False
        else:
            items.append(token)
    return items


def unit_of(label: str) -> str:
    if label in UNITS:
        return UNITS[label]
    if label in UNITS.values():
        return label
    raise ValueError(f"strength unit {label!r} is not one of {', '.join(UNITS)}")


def check_strength(value: float, unit: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"strength must be a finite number, got {value}")
    limit = MAX_STRENGTH[unit]
    if abs(value) > limit:
        raise ValueError(f"strength {value:g} is too large for unit {unit!r}: use at most ±{limit:g}")
    return value


@dataclass(frozen=True)
class FeatureMix:
    items: tuple[tuple[int, float], ...] = ()  # (feature, strength), in the order the user added them

    def __post_init__(self) -> None:
        seen = [f for f, _ in self.items]
        if any(f < 0 for f in seen):
            raise ValueError(f"feature indices must be 0 or more, got {seen}")
        if len(set(seen)) != len(seen):
            raise ValueError(f"a feature appears twice in {seen}; give each feature once with its strength")
        bad = [s for _, s in self.items if not math.isfinite(s)]
        if bad:
            raise ValueError(f"strengths must be finite numbers, got {bad}")

    @classmethod
    def parse(cls, text: str, default_strength: float) -> FeatureMix:
        """'12:4, 7:-2.5, 33' (33 takes default_strength); separators: comma, semicolon, whitespace or newline; spaces
        around ':' are allowed ("12 : 4" is one item). Linear in the text: every token is matched once, with nothing
        that backtracks (a run of spaces once took seconds per 10k characters)."""
        items = []
        for part in _items(text):
            match = _ITEM.match(part)
            if not match:
                raise ValueError(f"cannot read {part[:40]!r} as FEATURE or FEATURE:STRENGTH (e.g. '1234:4, 77:-2')")
            feature, strength = int(match.group(1)), match.group(2)
            try:
                value = float(strength) if strength is not None else float(default_strength)
            except ValueError as err:
                raise ValueError(f"strength {strength!r} of feature {feature} is not a number") from err
            items.append((feature, value))
        return cls(tuple(items))

    def with_feature(self, feature: int, strength: float) -> FeatureMix:
        """Add a feature, or change its strength if it is already in the mix."""
        kept = tuple((f, s) for f, s in self.items if f != feature)
        if len(kept) == len(self.items):
            return FeatureMix((*self.items, (feature, strength)))
        return FeatureMix(tuple((f, strength if f == feature else s) for f, s in self.items))

    def without(self, feature: int) -> FeatureMix:
        return FeatureMix(tuple((f, s) for f, s in self.items if f != feature))

    @property
    def features(self) -> tuple[int, ...]:
        return tuple(f for f, _ in self.items)

    @property
    def strengths(self) -> tuple[float, ...]:
        return tuple(s for _, s in self.items)

    def format(self) -> str:
        return ", ".join(f"{f}:{s:g}" for f, s in self.items)

    def recipe(self, sae: SAEChoice, unit: str) -> VectorRecipe:
        """The steering this mix asks for, on the given SAE; strengths are checked against the unit's limit."""
        if not self.items:
            raise ValueError("no feature chosen: pick a feature (by index, search or from your prompt) and add it")
        unit = unit_of(unit)
        strengths = tuple(check_strength(s, unit) for s in self.strengths)
        return VectorRecipe(
            "sae", strengths, unit, path=sae.path, sae_release=sae.release, sae_id=sae.sae_id, features=self.features
        )
