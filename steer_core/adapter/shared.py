"""Adapters others shared: the Hub's steer-core adapters of one base model, searchable by words in their labels.

One `HfApi.list_models` call filters on two tags: `steer-core`, which every export's card carries, and
`base_model:adapter:<base>`, which the Hub derives from a card's `base_model` and `base_model_relation: adapter`
(adapter.card). Merged models are `base_model:finetune:<base>` and so stay out. The Hub's own `search` matches repo
ids only, so words are matched here, on the card metadata the same call returns (`expand=["cardData", ...]`): the
`steer_core:` mapping's labels, SAE, feature indices and the repo id. A card is anyone's text: every value read from
it is type-checked and bounded, and a malformed one leaves its field empty rather than failing the list.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from steer_core.adapter.card import CARD_KEY, TAG, feature_label
from steer_core.hub import check_repo_id, hub_api

logger = logging.getLogger(__name__)

MAX_LIMIT = 100  # adapters one call returns
MAX_WORDS_CHARS = 200
SCAN = 500  # adapters read, most downloaded first, when words narrow them down here rather than on the Hub
MAX_FEATURES = 64  # features of one card kept
MAX_TEXT = 200  # characters of one text value kept
EXPAND = ["cardData", "likes", "downloads", "lastModified", "tags"]


@dataclass(frozen=True)
class SharedAdapter:
    """One adapter on the Hub, as its card's metadata describes it (steering.json, once opened, is the record)."""

    repo_id: str
    base_model: str
    labels: tuple[str, ...] = ()
    features: tuple[int, ...] = ()
    source: str | None = None  # sae, contrastive, file, control_vector
    sae: str | None = None  # release/sae_id, or the embedded or hashed folder
    strengths: tuple[float, ...] = ()  # as given, in strength_unit
    strength_unit: str | None = None
    site: tuple[str, ...] = ()
    mode: str | None = None
    top1: float | None = None  # top-1 agreement with the hook, all formats
    servable: tuple[float, float] | None = None  # the engine scales that stay servable, lowest and highest
    likes: int = 0
    downloads: int = 0
    last_modified: datetime | None = None

    def text(self) -> str:
        """What words are matched against: the repo id, labels, SAE and feature indices."""
        return " ".join([self.repo_id, *self.labels, self.sae or "", *(f"#{f} {f}" for f in self.features)])


def check_words(words: str) -> list[str]:
    """The search words, lower-cased (casefold), or an error naming what is wrong."""
    if not isinstance(words, str):
        raise ValueError(f"search words must be text, got {type(words).__name__}")
    if len(words) > MAX_WORDS_CHARS:
        raise ValueError(f"search words are at most {MAX_WORDS_CHARS} characters, got {len(words)}: {words[:40]!r}...")
    return words.casefold().split()


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}")
    return limit


def matches(adapter: SharedAdapter, words: list[str]) -> bool:
    """Every word occurs in the adapter's text (plain substrings, case-insensitive)."""
    text = adapter.text().casefold()
    return all(word in text for word in words)


def find_shared(
    base_model: str, words: str = "", *, limit: int = 50, token: str | bool | None = None, api: Any = None
) -> list[SharedAdapter]:
    """The steer-core adapters of `base_model` on the Hub whose labels or repo id hold every one of `words`, most
    downloaded first, at most `limit`. With words, the SCAN most downloaded adapters of the base are read and matched
    here. `token` sees its owner's private adapters too (huggingface_hub's token: False sends none)."""
    check_repo_id(base_model, "a base model id")
    terms = check_words(words)
    check_limit(limit)
    api = api or hub_api(token)
    listed = api.list_models(
        filter=[TAG, f"base_model:adapter:{base_model}"],
        sort="downloads",
        limit=SCAN if terms else limit,
        expand=EXPAND,
    )
    found: list[SharedAdapter] = []
    entries = iter(listed)
    while len(found) < limit:
        try:
            info = next(entries)
        except StopIteration:
            break
        except (TypeError, ValueError, KeyError) as err:  # huggingface_hub could not read an entry: the list ends
            logger.warning("listing shared adapters of %s stopped at a malformed entry: %s", base_model, err)
            break
        adapter = _adapter(info, base_model)
        if adapter is not None and matches(adapter, terms):
            found.append(adapter)
    return found


def _text(value: Any) -> str | None:
    """A text value of a card on one line, bounded; None for anything else."""
    if not isinstance(value, str):
        return None
    return " ".join(value.split())[:MAX_TEXT] or None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    """A count or index of a card: a whole number, not negative; None for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _card_data(info: Any) -> dict[str, Any]:
    """The entry's card metadata as a dict (huggingface_hub reads it into a ModelCardData), or {}."""
    data: Any = getattr(info, "card_data", None)
    try:
        out = data.to_dict() if hasattr(data, "to_dict") else data
    except (TypeError, ValueError, KeyError):
        return {}
    return out if isinstance(out, dict) else {}


def _list(facts: dict[str, Any], key: str) -> list[Any]:
    value = facts.get(key)
    return value[:MAX_FEATURES] if isinstance(value, list) else []


def _dict(facts: dict[str, Any], key: str) -> dict[str, Any]:
    value = facts.get(key)
    return value if isinstance(value, dict) else {}


def _bases(card: dict[str, Any]) -> list[str]:
    base = card.get("base_model")
    return [b for b in ([base] if isinstance(base, str) else base or []) if isinstance(b, str)]


def _adapter(info: Any, base_model: str) -> SharedAdapter | None:
    """The list entry as a SharedAdapter; None when its card names another base model (the Hub filtered on a tag
    derived from it, so this only guards against a Hub that did not)."""
    card = _card_data(info)
    bases = _bases(card)
    if bases and base_model.casefold() not in {b.casefold() for b in bases}:
        return None
    facts = _dict(card, CARD_KEY)
    features = [f for f in _list(facts, "features") if isinstance(f, dict)]
    labels = [feature_label(f) for f in features] + [_text(facts.get("label"))]
    sae = _dict(facts, "sae")
    named = [t for t in (_text(sae.get("release")), _text(sae.get("sae_id"))) if t]
    pair = [_float(s) for s in _list(facts, "servable_scales")]
    lo_hi = (pair[0], pair[1]) if len(pair) == 2 and pair[0] is not None and pair[1] is not None else None
    return SharedAdapter(
        repo_id=str(info.id),
        base_model=base_model,
        labels=tuple(label for label in labels if label),
        features=tuple(i for i in (_int(f.get("index")) for f in features) if i is not None),
        source=_text(facts.get("source")),
        sae="/".join(named) if named else _text(sae.get("folder")),
        strengths=tuple(x for x in map(_float, _list(facts, "strength")) if x is not None),
        strength_unit=_text(facts.get("strength_unit")),
        site=tuple(t for t in map(_text, _list(facts, "site")) if t),
        mode=_text(facts.get("mode")),
        top1=_float(facts.get("top1_agreement")),
        servable=lo_hi,
        likes=_int(getattr(info, "likes", 0)) or 0,
        downloads=_int(getattr(info, "downloads", 0)) or 0,
        last_modified=getattr(info, "last_modified", None),
    )
