"""Find SAE features by meaning: "puppy" and "dogs" should find the dog feature.

Exact-token matching (FeatureLabels.search) finds a feature only when the query's very word is among its top
contexts. Here each query word is widened to its neighbours in the model's own input embedding (dogs, dog, puppy,
Dog), and each feature is scored by
- what it fires on: its activation on the word and its nearest neighbours in a few short probe sentences, relative
  to its own maximum and to its activation on the probes' other words;
- what it writes: how far the neighbours' logits stand above the feature's mean logit over the whole vocabulary when
  its decoder row is read through the final norm and unembedding (a z-score, so a feature that raises everything
  does not win);
- what it writes at its own layer: the cosine of its decoder row with what the model reads the query word as there
  (the word's activation in the probe sentences less the other tokens'), which finds "dogs" for "puppy" where the
  input embedding puts "puppy" next to "kitten" and "toddler";
- the labelling text's top contexts whose highlighted token is a neighbour;
and features that fire on many tokens are ranked down (they are about no word in particular).
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from steer_core.activations import text_activations
from steer_core.sae.feature import LoadedSAE, sae_unit
from steer_core.sae.labels import FeatureLabel, FeatureLabels, density_discount, term_score
from steer_core.sites import architecture_for, pretrained, weight_of

NEIGHBOURS = 12  # embedding neighbours per query word
PROBED = 4  # of which the word itself and this many in all are read in the probe sentences
PROBES = ("I love my {w}.", "Tell me about {w}.", "We talked about {w} for hours.", "There was {w} in the story.")
FIRES_WEIGHT = 4.0  # a feature at its own maximum on the word scores like a word 4 z above its mean logit
MIN_SIMILARITY = 0.3  # cosine below which a neighbour is no longer the same concept
Z_FLOOR = 3.0  # a word's logit this many standard deviations above a feature's mean is where "promotes it" begins
# A decoder row closer than this to the word's reading counts, 7 at cosine 1 with READS_WEIGHT. Measured on the embedded
# SAE: a word's own anchored feature sits at 0.7, its kin at 0.4-0.5 ("puppy": dogs 0.51, baby 0.52, dog 0.49,
# infant 0.42), so the floor sits below kin; what unrelated features get above it is at most a point.
COS_FLOOR = 0.3
READS_WEIGHT = 10.0


@dataclass(frozen=True)
class Lens:
    """Every feature's decoder row read through the final norm, with its logits' mean and spread over the vocabulary.

    The mean and variance come from the unembedding's own mean and covariance (d_model² numbers), not from the
    d_sae × vocabulary logits, which would take seconds and gigabytes.
    """

    normed: Tensor  # Float[Tensor, "d_sae d_model"]
    mean: Tensor  # Float[Tensor, "d_sae"]
    std: Tensor  # Float[Tensor, "d_sae"]

    def z(self, unembed: Tensor) -> Tensor:
        """Float[Tensor, "d_sae n"]: z-scores of the tokens whose unembedding rows are `unembed` (n × d_model)."""
        return (self.normed @ unembed.T - self.mean[:, None]) / self.std[:, None]


# sae module -> model -> Lens. Weak keys: an SAE or model that is dropped takes its lens with it.
_LENSES: weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary[nn.Module, Lens]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@torch.no_grad()
def lens_for(model: nn.Module, sae: LoadedSAE) -> Lens:
    """The Lens of an SAE's features on `model`, computed once per SAE and model (~1 s for 4,096 features)."""
    with _LOCK:
        known = _LENSES.setdefault(sae.sae, weakref.WeakKeyDictionary()).get(model)
    if known is not None:
        return known
    norm = model.get_submodule(architecture_for(model).final_norm)
    param = next(norm.parameters())
    rows = sae.decoder.split(512)
    normed = torch.cat([norm(c.to(param.device, param.dtype)[:, None, :])[:, 0].float().cpu() for c in rows])
    w = _unembedding(model)
    centred = w - w.mean(0)
    cov = centred.T @ centred / len(w)
    lens = Lens(normed, normed @ w.mean(0), ((normed @ cov) * normed).sum(-1).clamp_min(1e-12).sqrt())
    with _LOCK:
        _LENSES[sae.sae][model] = lens
    return lens


def _unembedding(model: nn.Module) -> Tensor:
    return weight_of(pretrained(model).get_output_embeddings()).detach().float().cpu()


def _word_tokens(tokenizer: Any, word: str) -> list[int]:
    """The single tokens that spell `word` as a whole word, with and without a leading space and capital."""
    out = []
    for form in (f" {word}", word, f" {word.capitalize()}", word.capitalize()):
        ids = tokenizer(form, add_special_tokens=False).input_ids
        # the decoded token must be the word: an unknown word maps to the tokenizer's unk token
        if len(ids) == 1 and ids[0] not in out and tokenizer.decode(ids).strip().lower() == word.lower():
            out.append(ids[0])
    return out


@torch.no_grad()
def neighbours(model: nn.Module, tokenizer: Any, word: str, n: int = NEIGHBOURS) -> dict[str, float]:
    """Words near `word` in the model's input embedding, with their cosine similarity (the word itself at 1).

    A word the tokenizer splits is represented by its first piece's neighbours only when that piece is a word itself
    (3+ letters); otherwise the word stands alone.
    """
    word = word.lower()
    ids = _word_tokens(tokenizer, word)
    if not ids:
        first = tokenizer(f" {word}", add_special_tokens=False).input_ids[:1]
        piece = tokenizer.decode(first).strip().lower() if first else ""
        ids = first if len(piece) >= 3 and piece.isalpha() else []
    found = {word: 1.0}
    if not ids:
        return found
    emb = weight_of(pretrained(model).get_input_embeddings()).detach().float().cpu()
    query = torch.nn.functional.normalize(emb[ids].mean(0), dim=0)
    sims = torch.nn.functional.normalize(emb, dim=-1) @ query
    for tid in sims.topk(n * 4).indices.tolist():
        token = tokenizer.decode([tid]).strip().lower()
        sim = float(sims[tid])
        if sim < MIN_SIMILARITY or len(found) > n:
            break
        if len(token) >= 3 and token.isalpha() and token not in found:
            found[token] = round(sim, 3)
    return found


def query_words(query: str) -> list[str]:
    terms = [t for t in re.findall(r"[^\W\d_]+", query.lower()) if t]
    if not terms:
        raise ValueError(f"search query {query!r} has no words; try e.g. 'dog' or 'rain'")
    return terms


def _probes(tokenizer: Any, words: dict[str, float]) -> tuple[list[str], list[tuple[int, float]]]:
    """Each word in each of PROBES, with (position of the word's last token, the word's similarity) for each text:
    the last token is where the model has read all of the word."""
    texts, targets = [], []
    for word, sim in words.items():
        for probe in PROBES:
            prefix = probe[: probe.index("{w}")]
            texts.append(probe.format(w=word))
            targets.append((len(tokenizer(prefix + word, add_special_tokens=True).input_ids) - 1, sim))
    return texts, targets


@torch.no_grad()
def fires_on(
    sae: LoadedSAE, labels: FeatureLabels, model: nn.Module, tokenizer: Any, words: dict[str, float]
) -> Tensor:
    """Float[Tensor, "d_sae"]: each feature's activation on `words` (weighted by their similarity) in PROBES, over its
    own maximum, less its mean activation on the probes' other tokens."""
    texts, targets = _probes(tokenizer, words)
    # sinks left out: a probe's sink (position 1 of plain text) would outweigh every other token of the probes
    acts, _ids, where = text_activations(
        model, tokenizer, sae.source.point, sae_unit(sae.source), texts, drop_sinks=True
    )
    param = sae.decoder
    feats = sae.sae.encode(acts.to(param.device, param.dtype)).float().cpu()
    d_sae = feats.shape[1]
    top = torch.tensor([labels.labels[f].max_activation if f in labels.labels else 0.0 for f in range(d_sae)])
    feats = feats / top.clamp_min(1e-6)
    on = torch.tensor([pos == targets[t][0] for t, pos in where])
    weights = torch.tensor([targets[t][1] for t, _pos in where])
    if not on.any():
        return torch.zeros(d_sae)
    mean_on = (feats[on] * weights[on, None]).sum(0) / weights[on].sum()
    mean_off = feats[~on].mean(0) if (~on).any() else torch.zeros(d_sae)
    return (mean_on - mean_off).clamp_min(0)


@torch.no_grad()
def reads_as(sae: LoadedSAE, model: nn.Module, tokenizer: Any, word: str) -> Tensor:
    """Float[Tensor, "d_sae"]: the cosine of each feature's decoder row with what the model reads `word` as at the
    SAE's layer: its activation on the word's last token in PROBES less the mean over the probes' other tokens (an
    anchored feature's row started as that difference over the whole training text, scripts/train_sae.py)."""
    texts, targets = _probes(tokenizer, {word: 1.0})
    acts, _ids, where = text_activations(
        model, tokenizer, sae.source.point, sae_unit(sae.source), texts, drop_sinks=True
    )
    on = torch.tensor([pos == targets[t][0] for t, pos in where])
    if not on.any() or on.all():
        return torch.zeros(sae.source.d_sae)
    reading = acts[on].mean(0) - acts[~on].mean(0)
    rows = sae.decoder  # on the SAE's device, uncopied: a registry SAE's rows can take a gigabyte
    reading = torch.nn.functional.normalize(reading, dim=0).to(rows.device, rows.dtype)
    return ((rows @ reading) / rows.norm(dim=-1).clamp_min(1e-12)).float().cpu()


def search(
    labels: FeatureLabels, sae: LoadedSAE, model: nn.Module, tokenizer: Any, query: str, k: int = 20
) -> list[tuple[FeatureLabel, float]]:
    """Features ranked by how much they fire on and write the query's words and their embedding neighbours, and by
    how close they write to what the model reads each query word as."""
    lens = lens_for(model, sae)
    w = _unembedding(model)
    n = lens.normed.shape[0]
    score = torch.zeros(n)
    for word in query_words(query):
        near = neighbours(model, tokenizer, word)
        score += FIRES_WEIGHT * fires_on(sae, labels, model, tokenizer, dict(list(near.items())[:PROBED]))
        score += READS_WEIGHT * (reads_as(sae, model, tokenizer, word) - COS_FLOOR).clamp_min(0)
        ids, sims = [], []
        for token, sim in near.items():
            for tid in _word_tokens(tokenizer, token):
                ids.append(tid)
                sims.append(sim)
        if ids:
            z = lens.z(w[ids]) * torch.tensor(sims)
            score += (z - Z_FLOOR).clamp_min(0).max(-1).values
        for feature, label in labels.labels.items():
            if feature < n:
                score[feature] += sum(sim * term_score(label, token) for token, sim in near.items())
    score = score / torch.tensor([density_discount(labels.labels[f].density if f in labels.labels else 1.0)
                                  for f in range(n)])  # fmt: skip
    top = score.topk(min(k, n))
    return [
        (labels.labels[int(f)], round(float(s), 4))
        for s, f in zip(top.values, top.indices, strict=True)
        if s > 0 and int(f) in labels.labels
    ]
