"""What an SAE feature means: its top-activating contexts and promoted tokens, searchable; features active on a prompt.

Labels are computed from the model itself (no Hub, no LLM judge), so they exist for the embedded SAE offline and for
any registry SAE over the shipped held-out text.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steer_core.activations import text_activations
from steer_core.constants import LABELS_FILENAME, cache_dir
from steer_core.sae.feature import LoadedSAE, sae_unit
from steer_core.sites import architecture_for
from steer_core.template import render_chat

LABEL_TEXTS = 200  # held-out texts a feature's label is computed on
LABEL_NAME_CHARS = 120  # a label's name, as an adapter's card keeps it


@dataclass(frozen=True)
class Context:
    """A stretch of text around one token where the feature fired; `token` is the highlighted one."""

    left: str
    token: str
    right: str
    activation: float

    def render(self, mark: str = "**") -> str:
        """On one line: a context from a multi-line document would break a table row or a terminal listing."""
        return " ⏎ ".join(f"{self.left}{mark}{self.token}{mark}{self.right}".splitlines())


@dataclass(frozen=True)
class FeatureLabel:
    feature: int
    density: float  # fraction of labelled tokens on which the feature fires
    max_activation: float
    contexts: tuple[Context, ...]
    promoted: tuple[str, ...]  # tokens the decoder row raises most, read through the unembedding
    # the word whose mean activation the decoder row was kept near (scripts/train_sae.py --anchor-cos)
    word: str | None = None

    def name(self) -> str:
        """A few words for what the feature means, for an adapter's card and a search of shared adapters: its own
        word (an anchored SAE's), else the tokens it promotes most."""
        if self.word:
            return self.word
        return " ".join(dict.fromkeys(t.strip() for t in self.promoted[:6] if t.strip()))[:LABEL_NAME_CHARS]

    def summary(self, contexts: int = 2) -> str:
        tops = " | ".join(c.render().strip() for c in self.contexts[:contexts])
        name = f' (word "{self.word}")' if self.word else ""
        return f"#{self.feature}{name}: promotes {', '.join(repr(t) for t in self.promoted[:6])}; fires on: {tops}"


@dataclass
class FeatureLabels:
    """Labels of one SAE; `source` says which SAE and which text they were computed on."""

    source: dict[str, Any]
    labels: dict[int, FeatureLabel] = field(default_factory=dict)

    def __getitem__(self, feature: int) -> FeatureLabel:
        if feature not in self.labels:
            raise KeyError(f"feature {feature} has no label (it never fired on the labelling text, or is out of range)")
        return self.labels[feature]

    def search(self, query: str, k: int = 20) -> list[tuple[FeatureLabel, float]]:
        """Features ranked by how well their promoted tokens and highlighted tokens match the query's words.

        A feature's own word (an anchored SAE's) counts most, then the highlighted token of a top context, then a
        promoted token, then the word merely appearing near one (`term_score`); features that fire too often to mean
        anything rank lower.
        """
        terms = [t for t in re.findall(r"\w+", query.lower()) if t]
        if not terms:
            raise ValueError("search query has no words; try e.g. 'dog' or 'python code'")
        scored = []
        for label in self.labels.values():
            score = sum(term_score(label, term) for term in terms)
            if score > 0:
                score /= density_discount(label.density)
                scored.append((label, round(score, 4)))
        scored.sort(key=lambda item: (-item[1], -item[0].max_activation))
        return scored[:k]


def _norm_token(token: str) -> str:
    return token.strip().lower()


def density_discount(density: float) -> float:
    """What a search score is divided by for a feature firing on `density` of tokens: a feature that fires
    everywhere is about no word in particular (1 at density 0, 2 at 10%)."""
    return 1.0 + 10.0 * density


# Endings that make another form of the same word. A bare prefix match would make "for" a form of "forest" and
# "fin" one of "finances": measured, such fragments outranked the real "forest" and "money" features. "-d" only
# after 4 letters ("baked", not "ten" ~ "tend"); no "-er" (derivation: "corn" ~ "corner", "bee" ~ "beer").
INFLECTIONS = ("s", "es", "ed", "ing")


def same_word(a: str, b: str) -> bool:
    """Whether `a` and `b` are different forms of one word ("dog" ~ "dogs", "rain" ~ "raining"), from 3 letters."""
    short, long = sorted((a, b), key=len)
    if a == b or len(short) < 3 or not long.startswith(short):
        return False
    ending = long[len(short) :]
    return ending in INFLECTIONS or (ending == "d" and len(short) >= 4)


def term_score(label: FeatureLabel, term: str) -> float:
    """A feature's own word counts most, then highlighted tokens (what the feature fires on), then promoted tokens
    (what it writes), then the word appearing anywhere in a top context. Other forms of the word count too
    (`same_word`)."""
    promoted = [_norm_token(t) for t in label.promoted]
    score = 1.0 * promoted.count(term) + 0.5 * sum(same_word(t, term) for t in promoted)
    if label.word:
        # the word a feature's decoder row was kept near (train_sae.py --anchor-cos) says more than all its contexts
        # together (at most 3.5): the row is on the word by construction, a context only shows where it fired
        word = _norm_token(label.word)
        score += 8.0 * (word == term) + 2.5 * same_word(word, term)
    if label.contexts:
        n = len(label.contexts)
        tokens = [_norm_token(c.token) for c in label.contexts]
        score += 3.0 * tokens.count(term) / n + 2.0 * sum(same_word(t, term) for t in tokens) / n
        score += 0.5 * sum(term in (c.left + c.token + c.right).lower() for c in label.contexts) / n
    return score


@torch.no_grad()
def promoted_tokens(model: Any, tokenizer: Any, directions: Tensor, k: int = 10) -> list[list[str]]:
    """The k tokens each direction raises most when read straight through the final norm and unembedding."""
    arch = architecture_for(model)
    norm = model.get_submodule(arch.final_norm)
    head = model.get_output_embeddings()
    param = next(head.parameters())
    out = []
    for chunk in directions.split(512):
        logits = head(norm(chunk.to(param.device, param.dtype)[:, None, :]))[:, 0].float()
        out += [[tokenizer.decode([int(i)]) for i in row] for row in logits.topk(k, dim=-1).indices]
    return out


@torch.no_grad()
def compute_labels(
    sae: LoadedSAE,
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    contexts: int = 5,
    promoted: int = 10,
    max_tokens_per_text: int = 128,
    left_tokens: int = 12,
    right_tokens: int = 4,
) -> FeatureLabels:
    """Label every feature from its activations on `texts`; attention sinks (position 0, and any other token with a
    sink's norm, as the SAE's training left them out) are never counted."""
    acts, ids, where = text_activations(
        model, tokenizer, sae.source.point, sae_unit(sae.source), texts, max_tokens_per_text=max_tokens_per_text,
        drop_sinks=True,
    )  # fmt: skip
    d_sae = sae.source.d_sae
    # twice the contexts kept, so that ones repeating an earlier context word for word (the same sentence in two
    # documents) can be dropped and `contexts` different ones still shown
    k = min(2 * contexts, len(acts))
    top_vals = torch.full((k, d_sae), -torch.inf)
    top_rows = torch.zeros((k, d_sae), dtype=torch.long)
    fires = torch.zeros(d_sae)
    param = sae.decoder
    for start in range(0, len(acts), 2048):
        f = sae.sae.encode(acts[start : start + 2048].to(param.device, param.dtype)).float().cpu()
        fires += (f > 0).sum(0)
        vals = torch.cat([top_vals, f])
        rows = torch.cat([top_rows, torch.arange(start, start + len(f))[:, None].expand(-1, d_sae)])
        best = vals.topk(k, dim=0)
        top_vals, top_rows = best.values, rows.gather(0, best.indices)
    tokens = promoted_tokens(model, tokenizer, sae.decoder.float(), promoted)

    def context(row: int, value: float) -> Context:
        text_i, pos = where[row]
        seq = ids[text_i]
        return Context(
            left=tokenizer.decode(seq[max(1, pos - left_tokens) : pos]),
            token=tokenizer.decode(seq[pos : pos + 1]),
            right=tokenizer.decode(seq[pos + 1 : pos + 1 + right_tokens]),
            activation=round(value, 3),
        )

    labels = {}
    for feature in range(d_sae):
        seen: dict[tuple[str, str, str], Context] = {}
        for v, r in zip(top_vals[:, feature].tolist(), top_rows[:, feature].tolist(), strict=True):
            if v > 0 and len(seen) < contexts:
                c = context(r, v)
                seen.setdefault((c.left, c.token, c.right), c)
        ctx = tuple(seen.values())
        labels[feature] = FeatureLabel(
            feature=feature,
            density=round(float(fires[feature]) / max(len(acts), 1), 6),
            max_activation=ctx[0].activation if ctx else 0.0,
            contexts=ctx,
            promoted=tuple(tokens[feature]),
        )
    source = {"sae": sae.source.describe(), "texts": len(texts), "tokens": len(acts)}
    return FeatureLabels(source, labels)


def save_labels(labels: FeatureLabels, path: str | Path) -> Path:
    """Write gzipped JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"source": labels.source, "labels": [asdict(label) for label in labels.labels.values()]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())
    os.replace(tmp, path)
    return path


def load_labels(path: str | Path) -> FeatureLabels:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    labels = {}
    for item in doc["labels"]:
        item["contexts"] = tuple(Context(**c) for c in item["contexts"])
        item["promoted"] = tuple(item["promoted"])
        labels[item["feature"]] = FeatureLabel(**item)
    return FeatureLabels(doc["source"], labels)


def labels_for(sae: LoadedSAE, model: Any, tokenizer: Any, *, texts: int = LABEL_TEXTS) -> FeatureLabels:
    """The labels shipped next to the SAE's weights, or else labels computed on the shipped held-out text.

    Registry SAEs have no labels file here (Neuronpedia's are online only), so they are labelled on this model the
    same way the embedded SAE was, once: a registry release and id name fixed weights, so the result is cached on
    disk. A folder without labels may change between calls, so its labels are not cached.
    """
    if (known := known_labels(sae, model, texts=texts)) is not None:
        return known
    from steer_core.corpus import split_texts

    labels = compute_labels(sae, model, tokenizer, split_texts("heldout")[:texts])
    if sae.source.release:
        save_labels(labels, _cache_path(sae, model, texts))
    return labels


def known_labels(sae: LoadedSAE, model: Any, *, texts: int = LABEL_TEXTS) -> FeatureLabels | None:
    """The labels shipped with the SAE or cached by an earlier `labels_for`, without computing any (None if none)."""
    if sae.source.path and (Path(sae.source.path) / LABELS_FILENAME).is_file():
        return load_labels(Path(sae.source.path) / LABELS_FILENAME)
    if sae.source.release and (path := _cache_path(sae, model, texts)).is_file():
        return load_labels(path)
    return None


def _cache_path(sae: LoadedSAE, model: Any, texts: int) -> Path:
    from steer_core.corpus import corpus_info

    key = json.dumps(
        [sae.source.release, sae.source.sae_id, model.config.name_or_path, texts, corpus_info(), LABELS_VERSION]
    )
    return cache_dir() / "labels" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json.gz"


@dataclass(frozen=True)
class TokenFeatures:
    token: str
    features: tuple[tuple[int, float], ...]  # (feature, activation), strongest first


# How labels are computed; in the cache key, so labels cached by older code are recomputed, not served.
# 2 (2026-11-30): attention sinks left out (counted, they were the top context of most features).
LABELS_VERSION = 2

# A feature that fires on more than this fraction of tokens says little about any one word of a prompt.
DENSE_FEATURE = 0.1


@torch.no_grad()
def active_features(
    sae: LoadedSAE, model: Any, tokenizer: Any, prompt: str, k: int | None = None
) -> list[TokenFeatures]:
    """For each token of `prompt`, the k features that fire most on it (all that fire, by default: the strongest in
    raw activation are mostly dense ones, which strongest_on leaves out).

    Chat models see the prompt as a user turn, as in the preview; only the prompt's own tokens are reported (not the
    template's role markers and default system prompt), and never an attention sink (position 0, or a token with a
    sink's norm).
    """
    if not prompt.strip():
        raise ValueError("the prompt is empty: type some text to see which features fire on it")
    text, start = prompt, 0
    if getattr(tokenizer, "chat_template", None):
        text = render_chat(tokenizer, [{"role": "user", "content": prompt}], generation=False)
        start = text.rindex(prompt)
    end = start + len(prompt)
    spans = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True).offset_mapping
    acts, ids, where = text_activations(
        model, tokenizer, sae.source.point, sae_unit(sae.source), [text], drop_sinks=True
    )  # fmt: skip
    param = sae.decoder
    feats = sae.sae.encode(acts.to(param.device, param.dtype)).float().cpu()
    out = []
    for (_text, pos), row in zip(where, feats, strict=True):
        lo, hi = spans[pos]
        if hi <= start or lo >= end:
            continue
        top = row.topk(min(k or int((row > 0).sum()), len(row)))
        pairs = tuple((int(i), round(float(v), 3)) for v, i in zip(top.values, top.indices, strict=True) if v > 0)
        out.append(TokenFeatures(tokenizer.decode(ids[0][pos : pos + 1]), pairs))
    return out


@dataclass(frozen=True)
class ActiveFeature:
    feature: int
    activation: float  # its strongest activation on the prompt
    relative: float  # that activation over the feature's own maximum on the labelling text (1 = as strong as ever)
    token: str  # the token it fired on most strongly


def strongest_on(active: list[TokenFeatures], k: int = 10, labels: FeatureLabels | None = None) -> list[ActiveFeature]:
    """The features most active anywhere in the prompt, each with the token it fired on.

    With labels, features are ranked by activation relative to their own maximum, and dense features (firing on more
    than DENSE_FEATURE of tokens) are left out: raw activations favour features that are large everywhere.
    """
    best: dict[int, tuple[float, str]] = {}
    for tok in active:
        for feature, value in tok.features:
            if value > best.get(feature, (0.0, ""))[0]:
                best[feature] = (value, tok.token)
    hits = []
    for feature, (value, token) in best.items():
        label = labels.labels.get(feature) if labels else None
        if label is not None and label.density > DENSE_FEATURE:
            continue
        relative = value / label.max_activation if label is not None and label.max_activation > 0 else float("nan")
        hits.append(ActiveFeature(feature, value, round(relative, 3), token))
    key = (lambda h: -h.relative) if labels is not None else (lambda h: -h.activation)
    return sorted(hits, key=lambda h: (math.isnan(h.relative), key(h)))[:k]
