"""Train the embedded SAE: a BatchTopK sparse autoencoder on SmolLM2-135M-Instruct's residual stream.

Reproducible from registry packages alone (never run in CI):

    apt-get install wordnet-base fortunes dict-jargon dict-foldoc dict-gcide   # Debian; licences in quality.json
    .venv/bin/python -m scripts.build_corpus    # the shipped corpus and its model-generated documents (cached)
    .venv/bin/python -m scripts.train_sae       # ~2 h on a 2-core CPU, minutes on a GPU; --help for the knobs

Steps, each cached under $STEER_CORE_CACHE/sae_train/ so a rerun resumes:
1. texts: the broad corpus's sources at full size (scripts.build_corpus: WordNet, fortunes, the Jargon File, the
   model's own answers on everyday topics) plus FOLDOC and GCIDE, every document in one of the four input formats
   (chat, system, multiturn, plain; steer_core.corpus renders them as a served model reads them), short
   definitions grouped into paragraphs so a chat template does not outweigh its content. Only documents of the
   corpus's *calibration* split (sha1 of text or topic) are trained on: held-out and label documents never are.
2. activations: `blocks.L.hook_resid_post` (the output of decoder layer L) for every token except position 0 (the
   attention sink, whose norm is ~50x a typical token's and which no feature should have to explain), in chunks
   saved as they finish.
3. training with sae_lens' own `BatchTopKTrainingSAE` + `SAETrainer`, saved as its inference form (JumpReLU).
4. quality on the shipped corpus's held-out split, per source and per format -> quality.json; the held-out
   documents as plain text -> heldout.json.gz (the test fixture).
Labels are a separate step: scripts/label_sae.py (the corpus's labels split, every source).

Why BatchTopK: L0 is set directly (no L1 coefficient to tune on a short CPU budget), the batch-level top-k lets
frequent tokens use more features than rare ones at the same mean L0 (lower FVU than per-token TopK), the aux-k loss
revives dead features, and it saves as a plain JumpReLU SAE that every sae_lens version loads.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
from pathlib import Path

import torch
from torch import Tensor

from scripts import build_corpus as bc
from steer_core import corpus
from steer_core.activations import SINK_NORM, forward_until, not_sinks, recording
from steer_core.constants import cache_dir
from steer_core.hooks import gated_hooks, retuple, untuple
from steer_core.model import EMBEDDED_MODELS, load_model

MODEL = "smollm2-135m-instruct"
OUT = Path(__file__).resolve().parents[1] / "steer_core" / "data" / "saes"
# Token budget per source in the training split (the labels split is built with --scale 0.2): all of the model's own
# answers, the quotations and the Jargon File; of the large dictionaries (WordNet 2.5M tokens, FOLDOC 1.0M, GCIDE's
# Webster 1913 4.6M) enough for 3.6M in all: 3.2M activation vectors after the 256-token cut and position 0, three
# times the first SAE's 1.07M, with no dictionary dominating.
ALL = 10**9
BUDGETS = {"generated": ALL, "fortunes": ALL, "jargon": ALL, "wordnet": 1_200_000, "foldoc": 700_000, "gcide": 950_000}
# Attention sinks (steer_core.activations.SINK_NORM): one token in ten thousand carried half the training MSE and 40%
# of held-out variance when left in.
GROUPED = {"wordnet", "gcide"}  # one-line definitions, grouped into paragraphs of about GROUP_CHARS
GROUP_CHARS = 500


def source_items(split: str) -> dict[str, list[dict]]:
    """Corpus items ({source, text[, format, messages, topic]}) of one split, by source, every source at full size."""
    out: dict[str, list[dict]] = {}
    generated = cache_dir() / "corpus_build"
    for path in sorted(generated.glob("generated-*.json")):
        for doc in json.loads(path.read_text()):
            if bc.split_of("topic:" + doc["topic"]) == split:
                if "continuation" in doc:
                    prompt = doc["prompt"]
                    doc = {**doc, "text": prompt + ("" if prompt[-1:].isspace() else " ") + doc["continuation"]}
                out.setdefault("generated", []).append(doc)
    wordnet = [t for *_, words, gloss in bc.wordnet_synsets() if (t := bc.clean(f"{words[0]}: {gloss}", 20, 600))]
    for source, texts in (
        ("wordnet", wordnet),
        ("fortunes", bc.fortune_texts()),
        ("jargon", bc.jargon_texts(hi=1500)),
        ("foldoc", bc.foldoc_texts()),
        ("gcide", bc.gcide_texts()),
    ):
        texts = [t for t in sorted(set(texts)) if bc.split_of(f"{source}:{t}") == split]
        random.Random(0).shuffle(texts)
        if source in GROUPED:
            texts = _grouped(texts)
        out[source] = [{"source": source, "text": t} for t in texts]
    return out


def _grouped(texts: list[str]) -> list[str]:
    groups, current = [], ""
    for t in texts:
        current = f"{current}\n{t}" if current else t
        if len(current) >= GROUP_CHARS:
            groups.append(current)
            current = ""
    return groups + ([current] if current else [])


def build_texts(lm, work: Path, split: str, scale: float) -> list[dict]:
    """{source, format, text}: documents of `split` rendered in their formats, each source up to its budget."""
    path = work / f"texts-{split}-{scale}.json"
    if path.exists():
        return json.loads(path.read_text())
    tok = lm.tokenizer
    rng = random.Random(0)
    texts = []
    for source, items in source_items(split).items():
        budget, used = BUDGETS[source] * scale, 0
        for i, item in enumerate(items):
            if used >= budget:
                break
            fmt = item.get("format") or corpus.FORMATS[i % len(corpus.FORMATS)]
            doc = corpus.document_from(item, fmt, items[(i + 1) % len(items)], rng)
            fmt, text = doc.render(tok)
            used += len(tok(text, add_special_tokens=fmt == "plain").input_ids)
            texts.append({"source": source, "format": fmt, "text": text})
        print(f"  {split} {source}: {len(texts)} documents so far, {used:,} tokens", flush=True)
    path.write_text(json.dumps(texts, ensure_ascii=False))
    return texts


def sources_doc() -> dict[str, str]:
    return {
        **corpus.sources(),
        "foldoc": f"Debian package dict-foldoc {bc.package_version('dict-foldoc')}: the Free On-line Dictionary of "
        "Computing; licence GFDL 1.1+, see /usr/share/doc/dict-foldoc/copyright",
        "gcide": f"Debian package dict-gcide {bc.package_version('dict-gcide')}: GNU Collaborative International "
        "Dictionary of English (Webster 1913 + WordNet); licence GPL-3+, see /usr/share/doc/dict-gcide/copyright",
    }


def tokenize(lm, texts: list[dict], max_tokens: int) -> list[list[int]]:
    """As a server tokenizes them: a chat template writes its own special tokens, plain text takes the tokenizer's."""
    return [corpus.encode(lm.tokenizer, t["text"], max_tokens, plain=t["format"] == "plain").tolist() for t in texts]


def collect_chunked(lm, layer: int, seqs: list[list[int]], path: Path, chunk: int = 2000) -> torch.Tensor:
    """collect() in chunks of `chunk` texts, each saved as it finishes: a CPU run that is stopped resumes."""
    parts = []
    for n, start in enumerate(range(0, len(seqs), chunk)):
        part = path.with_name(f"{path.stem}.part{n:03d}.pt")
        if not part.exists():
            torch.save(collect(lm, layer, seqs[start : start + chunk]), part)
        parts.append(torch.load(part))
    return torch.cat(parts)


@torch.no_grad()
def collect(lm, layer: int, seqs: list[list[int]], batch_tokens: int = 4096) -> torch.Tensor:
    """Float16[Tensor, "n 576"]: resid_post at `layer` for every token but position 0, in the order of `seqs`."""
    name = f"{lm.arch.layers_path}.{layer}"
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    per_seq: dict[int, torch.Tensor] = {}
    captured: list[torch.Tensor] = []
    pad = lm.tokenizer.pad_token_id or 0
    start, t0, done = 0, time.time(), 0
    while start < len(order):
        width = len(seqs[order[min(start + 1, len(order) - 1)]])
        n = 1
        while start + n < len(order) and len(seqs[order[start + n]]) * (n + 1) <= batch_tokens:
            n += 1
        idx = order[start : start + n]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((n, width), pad)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        captured.clear()
        with recording(lm.model, [name], lambda _n, t: captured.append(t), what="output"):
            forward_until(lm.model, layer, input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
        acts = captured[0]
        for r, i in enumerate(idx):
            per_seq[i] = acts[r, 1 : len(seqs[i])].to("cpu", torch.float16)
        start += n
        done += int(mask.sum())
        if start % 50 < n:
            print(f"  {done} tokens, {done / (time.time() - t0):.0f} tok/s", flush=True)
    return torch.cat([per_seq[i] for i in range(len(seqs))])


def batches_forever(acts: torch.Tensor, batch_size: int, seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(acts), generator=g)
        for s in range(0, len(perm) - batch_size + 1, batch_size):
            yield acts[perm[s : s + batch_size]].to(device, torch.float32)


def sample(acts: torch.Tensor, n: int = 200_000) -> torch.Tensor:
    """About n evenly spaced rows: enough for a mean or a median, without a float32 copy of millions of rows."""
    return acts[:: max(len(acts) // n, 1)]


@torch.no_grad()
def word_directions(acts: torch.Tensor, ids: torch.Tensor, tokenizer, n: int, min_count: int) -> tuple[Tensor, list]:
    """Float[Tensor, "m d"] (m <= n): the mean activation on each of the n most frequent whole-word tokens (3+
    letters, counted at least `min_count` times) less the mean over all tokens, unit length; and those words.

    Initialising some features on these points the dictionary at the words people search for ("dog", "coffee"):
    from a random start, a 4,096-feature SAE on 3M tokens of broad text spent its features on syntax and templates
    and found a feature for 3 of 28 everyday words. Training then moves them like any other feature.
    """
    counts = torch.bincount(ids, minlength=len(tokenizer))
    words = []
    for tid in counts.argsort(descending=True).tolist():
        if counts[tid] < min_count or len(words) >= n:
            break
        text = tokenizer.decode([tid])
        if text.startswith(" ") and text[1:].isalpha() and len(text) >= 4:
            words.append(tid)
    row_of = torch.full((len(counts),), -1)
    row_of[words] = torch.arange(len(words))
    sums = torch.zeros(len(words), acts.shape[1])
    for part, part_ids in zip(acts.split(1 << 18), ids.split(1 << 18), strict=True):
        rows_here = row_of[part_ids]
        hit = rows_here >= 0
        sums.index_add_(0, rows_here[hit], part[hit].float())
    mean = sample(acts).float().mean(0)
    rows = sums / counts[words][:, None] - mean
    return torch.nn.functional.normalize(rows, dim=-1), [tokenizer.decode([t]).strip() for t in words]


@torch.no_grad()
def keep_in_cone(w_dec: Tensor, anchors: Tensor, cos_min: float) -> None:
    """Turn each of the first len(anchors) rows of `w_dec`, in place, to at least `cos_min` cosine with its anchor
    (unit rows), keeping its norm and the side it leaned to; rows already inside the cone are left alone."""
    rows = w_dec[: len(anchors)]
    norm = rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (rows / norm * anchors).sum(-1, keepdim=True)
    side = torch.nn.functional.normalize(rows / norm - cos * anchors, dim=-1)
    turned = (cos_min * anchors + (1 - cos_min**2) ** 0.5 * side) * norm
    rows.copy_(torch.where(cos < cos_min, turned, rows))


def train(
    acts: torch.Tensor, args, hook_name: str, model_name: str, init: Tensor | None = None, anchor_cos: float = 0.0
):
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(args.seed)
    cfg = BatchTopKTrainingSAEConfig(
        d_in=acts.shape[1],
        d_sae=args.d_sae,
        k=args.k,
        dtype="float32",
        device=args.device,
        normalize_activations="expected_average_only_in",
        decoder_init_norm=0.1,
        metadata=SAEMetadata(
            model_name=model_name, hook_name=hook_name, context_size=args.max_tokens, prepend_bos=True
        ),
    )
    sae = BatchTopKTrainingSAE(cfg)
    if init is not None:
        # at sae_lens' own initial norm, the encoder tied to the decoder as sae_lens initialises it
        with torch.no_grad():
            rows = init.to(sae.W_dec) * sae.W_dec[: len(init)].norm(dim=-1, keepdim=True)
            sae.W_dec[: len(init)] = rows
            sae.W_enc[:, : len(init)] = rows.T
    total = int(args.epochs * len(acts)) // args.batch_size * args.batch_size
    steps = total // args.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr / 10,  # the runner config derives this; the bare trainer config needs it given
        lr_warm_up_steps=steps // 20,
        lr_decay_steps=steps // 5,
        lr_scheduler_name="constant",
        dead_feature_window=args.dead_window,
        feature_sampling_window=max(steps // 4, 1),
        n_batches_for_norm_estimate=50,
    )
    trainer = SAETrainer(trainer_cfg, sae, batches_forever(acts, args.batch_size, args.seed, args.device))
    if init is not None and anchor_cos > 0:
        # Word features that drift lose their word: left free, one epoch turned "music" to cosine 0.08 with its start
        # and "dog" to 0.12, and no feature then steered toward either, while the starting directions steer 3-6 of 6
        # answers. With the rows frozen outright 41% of all features died in training: a fixed mean is a poor atom
        # for the word's own tokens. A cone lets each adapt; its norm stays free (the feature's scale).
        anchors = init.to(sae.W_dec)
        trainer.optimizer.register_step_post_hook(lambda *_: keep_in_cone(sae.W_dec.data, anchors, anchor_cos))
    t0 = time.time()
    trainer.fit()
    return sae, time.time() - t0


@torch.no_grad()
def content(acts: torch.Tensor, limit: float) -> torch.Tensor:
    """The activations that are not attention sinks (norm at most `limit`)."""
    return acts[not_sinks(acts, limit)]


@torch.no_grad()
def reconstruction(sae, acts: torch.Tensor, limit: float) -> tuple[float, float, torch.Tensor]:
    """(FVU, mean L0, which features fired) on the non-sink activations; FVU relative to their own variance."""
    x = content(acts, limit).float()
    feats = sae.encode(x)
    fvu = float((x - sae.decode(feats)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return fvu, float((feats > 0).float().sum(-1).mean()), (feats > 0).any(0)


@torch.no_grad()
def quality(lm, sae, layer: int, acts: torch.Tensor, seqs: list[list[int]], ce_tokens: int, limit: float) -> dict:
    """FVU, L0 and dead features on held-out activations; CE loss with the SAE spliced in vs without."""
    fvu, l0, fired = reconstruction(sae, acts, limit)
    x = acts
    block = lm.model.get_submodule(f"{lm.arch.layers_path}.{layer}")

    def splice(_m, _a, output):
        h = untuple(output)
        # position 0 and any other sink stay: the SAE never saw them
        keep = h.float().norm(dim=-1) > limit
        keep[:, 0] = True
        new = torch.where(keep[..., None], h, sae(h.float()).to(h.dtype))
        return retuple(output, new)

    losses = {"clean": [0.0, 0], "spliced": [0.0, 0]}
    used = 0
    for ids in seqs:
        if used >= ce_tokens:
            break
        t = torch.tensor([ids])
        used += len(ids)
        for key in losses:
            with gated_hooks() as hooks:
                if key == "spliced":
                    hooks.forward(block, splice)
                logits = lm.model(input_ids=t).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits[1:], t[0, 2:], reduction="sum")  # targets after pos 1
            losses[key][0] += float(nll)
            losses[key][1] += len(ids) - 2
    ce = {k: s / n for k, (s, n) in losses.items()}
    return {
        "heldout_tokens": len(x),
        "sink_tokens_excluded": int(len(x) - len(content(x, limit))),
        "fvu": round(fvu, 4),
        "mean_l0": round(l0, 2),
        "dead_features": int((~fired).sum()),
        "dead_fraction": round(float((~fired).float().mean()), 4),
        "ce_loss_clean": round(ce["clean"], 4),
        "ce_loss_spliced": round(ce["spliced"], 4),
        "ce_increase": round(ce["spliced"] - ce["clean"], 4),
        "ce_tokens": used,
    }


def write_readme(out: Path, report: dict) -> None:
    """Provenance, licences and quality next to the weights, for people browsing the folder (or the Hub)."""
    sources = "\n".join(f"- **{name}**: {text}" for name, text in report["sources"].items())
    lines = [
        f"# Embedded SAE: {report['model']}, `{report['hook_name']}`",
        "",
        f"A {report['architecture']} sparse autoencoder, d_sae {report['d_sae']}, k {report['k']}, trained by "
        f"`{report['trained_by']}` on {report['training_tokens']:,} activation vectors ({report['epochs']} epochs) "
        f"in {report['minutes_activations']} + {report['minutes_training']} minutes on a 2-core CPU. "
        "Load it with `sae_lens.SAE.load_from_disk(this_folder)`.",
        "",
        "## Held-out quality (text training never saw)",
        "",
        "| FVU | mean L0 | dead features | CE loss clean | CE loss with SAE spliced in | CE increase |",
        "|---|---|---|---|---|---|",
        f"| {report['fvu']} | {report['mean_l0']} | {report['dead_features']} "
        f"({report['dead_features'] / report['d_sae']:.1%}) | "
        f"{report['ce_loss_clean']} | {report['ce_loss_spliced']} | {report['ce_increase']} |",
        "",
        f"{report['heldout_tokens']:,} held-out tokens for FVU/L0/dead, {report['ce_tokens']:,} for CE. "
        f"Split: {report['split']}. Position 0: {report['position_0']}.",
        "",
        *[f"- {report[k]}" for k in ("dead_features_note", "timing_note") if k in report],
        f"- dead in training (the trainer's last window): {report['dead_features_training']}",
        *(
            [
                f"- never fired on the labels split ({d['tokens']:,} tokens, also unseen in training; "
                f"scripts/label_sae.py): {d['count']} ({d['count'] / report['d_sae']:.1%})"
            ]
            if (d := report.get("dead_features_labels"))
            else []
        ),
        f"- features that started on a frequent word's mean activation (--init-words): "
        f"{report.get('features_initialised_on_words', 0)}"
        + (
            f" (kept within cosine {report['words']['anchor_cos']} of it, --anchor-cos)"
            if report.get("words", {}).get("anchor_cos")
            else ""
        ),
        "",
        "| held-out part | tokens | FVU | mean L0 |",
        "|---|---|---|---|",
        *[
            f"| {kind} {name} | {g['tokens']:,} | {g['fvu']} | {g['mean_l0']} |"
            for kind in ("by_source", "by_format")
            for name, g in report[kind].items()
        ],
        "",
        "## Text and licences",
        "",
        sources,
        "",
        "`heldout.json.gz` holds the held-out texts; `labels.json.gz` the feature labels (scripts/label_sae.py).",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def heldout_texts(lm) -> list[dict]:
    """The shipped corpus's held-out documents, {source, format, text}, as the model reads them."""
    out = []
    for doc in corpus.documents("heldout"):
        fmt, text = doc.render(lm.tokenizer)
        out.append({"source": doc.source, "format": fmt, "text": text})
    return out


def by_group(
    sae, acts: torch.Tensor, seqs: list[list[int]], items: list[dict], key: str, limit: float
) -> dict[str, dict]:
    """FVU and mean L0 per source or per format (each relative to its own variance), sinks left out."""
    owner = torch.cat([torch.full((max(len(s) - 1, 0),), i) for i, s in enumerate(seqs)])
    out = {}
    for name in sorted({t[key] for t in items}):
        rows = torch.tensor([i for i, t in enumerate(items) if t[key] == name])
        pick = torch.isin(owner, rows)
        fvu, l0, _ = reconstruction(sae, acts[pick], limit)
        out[name] = {"tokens": int(pick.sum()), "fvu": round(fvu, 4), "mean_l0": round(l0, 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=float, default=48)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--dead-window", type=int, default=150, help="steps without firing before a feature counts dead")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per text")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every source's token budget (BUDGETS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-words", type=int, default=0, help="features that start on frequent words' mean activation")
    p.add_argument("--init-min-count", type=int, default=40, help="occurrences a word needs to start a feature")
    p.add_argument(
        "--anchor-cos", type=float, default=0.0, help="the --init-words features stay within this cosine of their word"
    )
    p.add_argument("--ce-tokens", type=int, default=20000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stop-after", choices=["texts", "activations"], help="stop after this step (a CPU run in parts)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not 0 <= args.anchor_cos <= 1 or (args.anchor_cos and not args.init_words):
        raise SystemExit(f"--anchor-cos {args.anchor_cos}: give a cosine in 0..1, with --init-words N to anchor")

    torch.set_grad_enabled(False)
    work = cache_dir() / "sae_train"
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model(MODEL)
    lm.model.to(args.device)
    hook_name = f"blocks.{args.layer}.hook_resid_post"
    model_name = EMBEDDED_MODELS[MODEL].hub_id
    t_start = time.time()
    items = {"train": build_texts(lm, work, "calibration", args.scale), "heldout": heldout_texts(lm)}
    print(f"{len(items['train'])} training texts, {len(items['heldout'])} held out", flush=True)
    if args.stop_after == "texts":
        return

    seqs = {}
    acts = {}
    for split in ("train", "heldout"):
        seqs[split] = tokenize(lm, items[split], args.max_tokens)
        path = work / f"acts_L{args.layer}_{split}_{args.max_tokens}_{args.scale}.pt"
        if not path.exists():
            print(f"activations: {split}", flush=True)
            torch.save(collect_chunked(lm, args.layer, seqs[split], path), path)
            for part in path.parent.glob(f"{path.stem}.part*.pt"):
                part.unlink()
        acts[split] = torch.load(path)
        print(f"{split}: {len(acts[split])} activation vectors", flush=True)
    t_acts = time.time() - t_start
    if args.stop_after == "activations":
        return

    # one limit for training, FVU and the CE splice, from the training text's median norm (not position 0's)
    limit = SINK_NORM * float(sample(acts["train"]).float().norm(dim=-1).median())
    keep = not_sinks(acts["train"], limit)
    train_acts = acts["train"][keep]
    sinks = len(acts["train"]) - len(train_acts)
    print(f"sink limit {limit:.0f}: {sinks} sink tokens left out of training", flush=True)
    init, init_words = None, []
    if args.init_words:
        ids = torch.cat([torch.tensor(s[1:]) for s in seqs["train"]])[keep]
        init, init_words = word_directions(train_acts, ids, lm.tokenizer, args.init_words, args.init_min_count)
        print(f"{len(init_words)} features start on words: {', '.join(init_words[:12])} ... {init_words[-1]}")
    torch.set_grad_enabled(True)
    sae, t_train = train(train_acts, args, hook_name, model_name, init, anchor_cos=args.anchor_cos)
    del train_acts
    torch.set_grad_enabled(False)
    sae.to("cpu")

    out = args.out or OUT / f"{MODEL}-res-L{args.layer}"
    out.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(str(out))
    # Ship it small: fp16 weights, loaded by sae_lens as float32 unless asked otherwise.
    from safetensors.torch import load_file, save_file

    weights = out / "sae_weights.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()}, weights)

    from sae_lens import SAE

    lm.model.to("cpu")
    shipped = SAE.load_from_disk(str(out))
    report = quality(lm, shipped, args.layer, acts["heldout"], seqs["heldout"], args.ce_tokens, limit)
    report.update(
        {
            "by_source": by_group(shipped, acts["heldout"], seqs["heldout"], items["heldout"], "source", limit),
            "by_format": by_group(shipped, acts["heldout"], seqs["heldout"], items["heldout"], "format", limit),
            "model": model_name,
            "hook_name": hook_name,
            "architecture": "batchtopk (saved as jumprelu)",
            "d_sae": args.d_sae,
            "k": args.k,
            "training_tokens": len(acts["train"]) - sinks,
            "features_initialised_on_words": len(init_words),
            # feature i < len(words) started on words[i] (and stayed within --anchor-cos of it)
            "words": {"anchor_cos": args.anchor_cos, "features": init_words},
            "sink_limit": round(limit, 1),
            "sink_tokens_left_out_of_training": sinks,
            # not fired in the trainer's last --dead-window steps (sae_lens writes it into cfg.json's metadata)
            "dead_features_training": int(sae.cfg.metadata.num_dead_features),
            "dead_features_note": f"dead_features: never fired on the held-out tokens; dead_features_training: not "
            f"fired in the trainer's last {args.dead_window} steps ({args.dead_window * args.batch_size:,} tokens)",
            "training_tokens_by_source": {
                s: sum(len(q) - 1 for q, t in zip(seqs["train"], items["train"], strict=True) if t["source"] == s)
                for s in BUDGETS
            },
            "epochs": args.epochs,
            "training_samples": int(args.epochs * len(acts["train"])),
            "minutes_activations": round(t_acts / 60, 1),
            "minutes_training": round(t_train / 60, 1),
            "device": args.device,
            "sources": sources_doc(),
            "split": "trained on the corpus's calibration split (scripts.build_corpus.split_of); measured on its "
            "held-out split, every format; labelled on its labels split",
            "position_0": "excluded from training and from FVU/L0 (attention sink); kept unspliced in the CE test; so "
            f"is any other token whose norm is over {SINK_NORM:g}x the median (sink_limit)",
            "trained_by": "scripts/train_sae.py "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "stop_after")),
        }
    )
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    write_readme(out, report)
    with gzip.open(out / "heldout.json.gz", "wt", encoding="utf-8") as f:
        json.dump({"split": report["split"], "texts": items["heldout"]}, f, ensure_ascii=False)
    print(json.dumps({k: v for k, v in report.items() if k != "sources"}, indent=1))
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
