"""Whether search found the concept itself, and a vector for the concept when the SAE has no feature for it.

An SAE has features for only part of the vocabulary (the embedded one anchors 4,096 of the most frequent words). For
another word, search's top hit is a neighbour by spelling or by meaning ("volcano" finds "mountain", "robot" finds
"bat"), and steering with it talks about the neighbour. So the app says when the top hit does not carry the concept,
and offers the model's own reading of the word instead: a contrastive vector, the residual at the word in a few
sentences less the residual at everyday nouns in the same sentences, at the SAE's layer. docs/concept-bands.md
measures both on nouns drawn by a fixed rule (scripts/concept_bands.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from steer_core.sae.feature import LoadedSAE
from steer_core.sae.labels import FeatureLabel, same_word
from steer_core.sae.search import query_words, reads_as
from steer_core.sites import HookPoint
from steer_core.vectors.recipe import VectorRecipe

# The sentences end on the word: the residual is read at the sentence's last token, where the model has read it.
TEMPLATES = (
    "I love my {w}", "Tell me about the {w}", "We talked for hours about the {w}", "There was a story about the {w}",
    "My favourite thing is the {w}", "Everyone was looking at the {w}", "Here is a picture of the {w}",
    "She wrote a poem about the {w}",
)  # fmt: skip
# What a concept is read against: everyday nouns, so that what is left is this noun rather than nouns in general
NEUTRAL = ("table", "day", "person", "book", "car", "house", "idea", "water")
# A top hit without an anchored word carries the concept when its decoder row is this close to the word's reading.
# On the embedded SAE, the features of 50 concepts search was measured on sit at 0.54-0.73, the neighbours it found
# for words it has no feature for ("volcano" -> mountain, "robot" -> bat) at 0.35-0.51.
CARRIES_COSINE = 0.55
# What scripts/concept_bands.py measured, per frequency band, for the embedded SAEs: what a user can expect
RATES_FILE = Path(__file__).parents[1] / "data" / "concept_bands.json"


@dataclass(frozen=True)
class ConceptMatch:
    """What search's top hit is for the query: the concept itself, or only a neighbour of it."""

    query: str
    feature: int | None
    hit_word: str | None  # the word the top hit's decoder row is anchored to, when the SAE has one
    cosine: float  # of the top hit's decoder row with what the model reads the query word as
    carries: bool
    nearest: tuple[str, ...]  # the top hits, by their word or index

    def message(self) -> str:
        """One line for the user; empty when the top hit is the concept."""
        if self.carries:
            return ""
        near = ", ".join(self.nearest) or "none"
        return (
            f"No feature for {self.query!r} in this SAE: the nearest are {near}, and steering with them talks about "
            f"them, not about {self.query!r}. To steer with {self.query!r} itself, use the model's own reading of "
            "the word (a contrastive vector at the SAE's layer)."
        )


def _name(label: FeatureLabel) -> str:
    return label.word.strip() if label.word else f"#{label.feature}"


def _is_form(word: str, query: str) -> bool:
    a, b = word.strip().lower(), query.lower()
    return a == b or same_word(a, b)


def match(
    sae: LoadedSAE, model: nn.Module, tokenizer: Any, query: str, hits: list[tuple[FeatureLabel, float]]
) -> ConceptMatch:
    """Whether `hits` (search's results for `query`, best first) begin with a feature for the query itself.

    On an SAE with anchored words, the top hit must be anchored to the query word or one of its forms; on any other,
    its decoder row must be within CARRIES_COSINE of the model's reading of the word.
    """
    nearest = tuple(dict.fromkeys(_name(label) for label, _ in hits[:5]))
    if not hits:
        return ConceptMatch(query, None, None, 0.0, False, nearest)
    top = hits[0][0]
    words = query_words(query)
    cosine = max(float(reads_as(sae, model, tokenizer, w)[top.feature]) for w in words)
    # an anchored word says what the feature is; a cosine only how near it writes
    carries = any(_is_form(top.word, w) for w in words) if top.word else cosine >= CARRIES_COSINE
    return ConceptMatch(query, top.feature, top.word.strip() if top.word else None, round(cosine, 3), carries, nearest)


def concept_prompts(concept: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(positive, negative) prompts: the concept, and everyday nouns, at the end of the same sentences."""
    if not re.search(r"[^\W\d_]", concept):
        raise ValueError(f"concept {concept!r} has no words; give a word such as 'volcano'")
    concept = " ".join(concept.split())
    return tuple(t.format(w=concept) for t in TEMPLATES), tuple(t.format(w=n) for t in TEMPLATES for n in NEUTRAL)


def concept_recipe(concept: str, point: HookPoint, strength: float) -> VectorRecipe:
    """The model's reading of `concept` at `point` as a contrastive recipe (mean of differences at the last token),
    its norm `strength` × the layer's median residual norm."""
    positive, negative = concept_prompts(concept)
    return VectorRecipe(
        "contrastive", (strength,), "resid", layer=point.layer, site=point.site, positive=positive, negative=negative
    )


def expected_rates(model_name: str) -> str:
    """The measured rates of concepts found and steered per frequency band on `model_name`'s embedded SAE, as one
    line; empty where none were measured."""
    rates = json.loads(RATES_FILE.read_text()).get(model_name) if RATES_FILE.is_file() else None
    if not rates:
        return ""
    bands = "; ".join(
        f"{band} words: the top hit {rates['search'][band]}, the word's reading {rates['fallback'][band]}"
        for band in rates["bands"]
    )
    return (
        f"What to expect, measured on {rates['concepts']} everyday nouns drawn from WordNet (docs/concept-bands.md), "
        f"the share of concepts steered at the default strength: {bands}."
    )
