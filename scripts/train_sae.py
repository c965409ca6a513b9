"""Train the embedded SAE: a BatchTopK sparse autoencoder on SmolLM2-135M-Instruct's residual stream (CPU).

Reproducible from registry packages alone (never run in CI):

    apt-get install fortunes python3-doc        # the text (Debian; BSD and PSF licences)
    .venv/bin/python -m scripts.train_sae       # ~50 min on a 2-core CPU; --help for the knobs

Steps, each cached under $STEER_CORE_CACHE/sae_train/ so a rerun resumes:
1. texts: Debian `fortunes` (quotations, jokes), the Python 3.11 documentation's prose paragraphs, and chat
   conversations whose answers the model itself writes (greedy, so deterministic); half the fortunes are
   chat-formatted too, because a served adapter mostly sees chat. A text is held out when its SHA-1 says so: the
   split does not depend on order, and training never sees a held-out text.
2. activations: `blocks.L.hook_resid_post` (the output of decoder layer L) for every token except position 0 (the
   attention sink, whose norm is ~50x a typical token's and which no feature should have to explain).
3. training with sae_lens' own `BatchTopKTrainingSAE` + `SAETrainer`, saved as its inference form (JumpReLU).
4. quality on the held-out split -> quality.json; held-out texts -> heldout.json.gz (the test fixture).
Labels are a separate step: scripts/label_sae.py.

Why BatchTopK: L0 is set directly (no L1 coefficient to tune on a short CPU budget), the batch-level top-k lets
frequent tokens use more features than rare ones at the same mean L0 (lower FVU than per-token TopK), the aux-k loss
revives dead features, and it saves as a plain JumpReLU SAE that every sae_lens version loads.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import random
import re
import subprocess
import time
from pathlib import Path

import torch

from steer_core.activations import forward_until, recording
from steer_core.constants import cache_dir
from steer_core.generate import left_pad
from steer_core.hooks import gated_hooks, retuple, untuple
from steer_core.model import EMBEDDED_MODELS, load_model

MODEL = "smollm2-135m-instruct"
FORTUNES = Path("/usr/share/games/fortunes")
# General prose, quotations and jokes; offensive-leaning, ASCII-art and non-English files are skipped.
FORTUNE_FILES = [
    "computers", "cookie", "definitions", "education", "food", "fortunes", "goedel", "humorists", "kids", "law",
    "linux", "literature", "love", "magic", "medicine", "miscellaneous", "news", "paradoxum", "people", "pets",
    "platitudes", "politics", "pratchett", "riddles", "science", "songs-poems", "sports", "startrek", "tao", "wisdom",
    "work", "zippy",
]  # fmt: skip
PYDOC = Path("/usr/share/doc/python3.11/html")
PYDOC_DIRS = ["tutorial", "howto", "faq", "library", "reference", "whatsnew", "glossary.html"]
HELDOUT_PERCENT = 5
OUT = Path(__file__).resolve().parents[1] / "steer_core" / "data" / "saes"

# Chat prompts: templates x topics, so the model writes about many everyday concepts (features to steer with).
TOPICS = [
    "dogs", "cats", "the ocean", "mountains", "coffee", "baking bread", "football", "chess", "music", "jazz",
    "painting", "poetry", "space travel", "the moon", "rain", "winter", "summer holidays", "gardening", "trees",
    "birds", "money", "saving for retirement", "job interviews", "friendship", "love", "weddings", "grief",
    "anger", "happiness", "fear", "sleep", "dreams", "running", "cooking pasta", "pizza", "chocolate", "wine",
    "cars", "trains", "airplanes", "computers", "programming", "the internet", "robots", "history of Rome",
    "ancient Egypt", "pirates", "dragons", "ghosts", "Halloween", "Christmas", "birthdays", "school", "exams",
    "teachers", "doctors", "hospitals", "medicine", "the weather", "climate change", "volcanoes", "earthquakes",
    "fishing", "camping", "Paris", "London", "Tokyo", "New York", "mathematics", "physics", "chemistry", "biology",
    "politics", "elections", "law and courts", "crime", "detectives", "movies", "books", "libraries", "fashion",
    "shoes", "houses", "cleaning", "babies", "old age", "horses", "flowers", "the sun", "fire", "water", "gold",
]  # fmt: skip
TEMPLATES = [
    "Tell me about {t}.",
    "Write a short poem about {t}.",
    "Give me three tips about {t}.",
    "Why do people like {t}?",
    "Write a short story involving {t}.",
    "Explain {t} to a child.",
    "What are the downsides of {t}?",
    "Describe {t} in a few sentences.",
]


def _heldout(text: str) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def _package_version(name: str) -> str:
    try:
        return subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fortune_texts() -> list[str]:
    out = []
    for name in FORTUNE_FILES:
        raw = (FORTUNES / name).read_text(encoding="utf-8", errors="replace")
        for item in raw.split("\n%\n"):
            body = re.sub(r"\s+", " ", item).strip()
            if 40 <= len(body) <= 1500 and sum(c.isalpha() or c.isspace() for c in body) / len(body) >= 0.8:
                out.append(body)
    return sorted(set(out))


class _Paragraphs(html.parser.HTMLParser):
    """Text of <p> elements outside code blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.current: list[str] = []
        self.paragraphs: list[str] = []

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag == "p":
            self.depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "p" and self.depth:
            self.depth -= 1
            text = re.sub(r"\s+", " ", "".join(self.current)).strip()
            if len(text) >= 60:
                self.paragraphs.append(text.replace("¶", ""))
            self.current = []

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.current.append(data)


def pydoc_texts(max_chars: int = 900, keep: int = 2200) -> list[str]:
    """`keep` chunks (a seeded sample) of the Python docs' prose, paragraphs grouped per page up to `max_chars`.

    All of it would be ~1.3M tokens of API reference, twice the rest of the corpus together."""
    pages: list[Path] = []
    for entry in PYDOC_DIRS:
        path = PYDOC / entry
        pages += [path] if path.is_file() else sorted(path.rglob("*.html"))
    out = []
    for page in pages:
        parser = _Paragraphs()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        chunk = ""
        for para in parser.paragraphs:
            if chunk and len(chunk) + len(para) > max_chars:
                out.append(chunk)
                chunk = ""
            chunk = f"{chunk} {para}".strip()
        if chunk:
            out.append(chunk)
    return random.Random(0).sample(sorted(set(out)), keep)


def chat_prompts() -> list[str]:
    return [tpl.format(t=topic) for topic in TOPICS for tpl in TEMPLATES]


@torch.no_grad()
def generate_answers(lm, prompts: list[str], max_new_tokens: int, batch_size: int = 48) -> list[str]:
    """Greedy answers of the model to each prompt (deterministic), batched with left padding."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        t0 = time.time()
        chunk = prompts[start : start + batch_size]
        encoded = [
            tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False).input_ids
            for p in chunk
        ]  # fmt: skip
        ids, mask = left_pad(encoded, pad)
        width = ids.shape[1]
        out = lm.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        answers += [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]
        print(f"  answers {start + len(chunk)}/{len(prompts)} ({time.time() - t0:.0f} s)", flush=True)
    return answers


def chat_format(tok, user: str, answer: str) -> str:
    return str(
        tok.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False
        )
    )


def build_texts(lm, work: Path, max_new_tokens: int) -> dict:
    path = work / "texts.json"
    if path.exists():
        return json.loads(path.read_text())
    print("building texts", flush=True)
    fortunes = fortune_texts()
    pydoc = pydoc_texts()
    prompts = chat_prompts()
    answers = generate_answers(lm, prompts, max_new_tokens)
    rng = random.Random(0)
    asks = ["Tell me something worth remembering.", "Share a quote you like.", "Say something clever.",
            "Any words of wisdom?", "Tell me a joke.", "What's on your mind?"]  # fmt: skip
    texts = []
    for i, t in enumerate(fortunes):
        texts.append({"source": "fortunes", "text": chat_format(lm.tokenizer, rng.choice(asks), t) if i % 2 else t})
    texts += [{"source": "python3-doc", "text": t} for t in pydoc]
    texts += [
        {"source": "chat", "text": chat_format(lm.tokenizer, p, a)} for p, a in zip(prompts, answers, strict=True)
    ]
    doc = {
        "sources": {
            "fortunes": f"Debian package fortunes {_package_version('fortunes')} files {FORTUNE_FILES}; "
            "licence BSD (fortune-mod), see /usr/share/doc/fortunes-min/copyright",
            "python3-doc": f"Debian package python3.11-doc {_package_version('python3.11-doc')}, <p> prose of "
            f"{PYDOC_DIRS}; licence PSF-2.0, see /usr/share/doc/python3.11-doc/copyright",
            "chat": f"{len(prompts)} prompts (templates x topics in scripts/train_sae.py) answered greedily by "
            f"{EMBEDDED_MODELS[MODEL].hub_id} (Apache-2.0), at most {max_new_tokens} new tokens",
        },
        "texts": texts,
    }
    path.write_text(json.dumps(doc, ensure_ascii=False))
    return doc


def tokenize(lm, texts: list[str], max_tokens: int) -> list[list[int]]:
    # Chat-formatted texts carry their own special tokens; plain ones get whatever the tokenizer adds.
    return [lm.tokenizer(t, add_special_tokens=True).input_ids[:max_tokens] for t in texts]


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
            forward_until(lm.model, layer, input_ids=ids, attention_mask=mask)
        acts = captured[0]
        for r, i in enumerate(idx):
            per_seq[i] = acts[r, 1 : len(seqs[i])].to(torch.float16)
        start += n
        done += int(mask.sum())
        if start % 50 < n:
            print(f"  {done} tokens, {done / (time.time() - t0):.0f} tok/s", flush=True)
    return torch.cat([per_seq[i] for i in range(len(seqs))])


def batches_forever(acts: torch.Tensor, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(acts), generator=g)
        for s in range(0, len(perm) - batch_size + 1, batch_size):
            yield acts[perm[s : s + batch_size]].float()


def train(acts: torch.Tensor, args, hook_name: str, model_name: str):
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
        device="cpu",
        normalize_activations="expected_average_only_in",
        decoder_init_norm=0.1,
        metadata=SAEMetadata(
            model_name=model_name, hook_name=hook_name, context_size=args.max_tokens, prepend_bos=True
        ),
    )
    sae = BatchTopKTrainingSAE(cfg)
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
    trainer = SAETrainer(trainer_cfg, sae, batches_forever(acts, args.batch_size, args.seed))
    t0 = time.time()
    trainer.fit()
    return sae, time.time() - t0


@torch.no_grad()
def quality(lm, sae, layer: int, acts: torch.Tensor, seqs: list[list[int]], ce_tokens: int) -> dict:
    """FVU, L0 and dead features on held-out activations; CE loss with the SAE spliced in vs without."""
    x = acts.float()
    feats = sae.encode(x)
    recon = sae.decode(feats)
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    l0 = float((feats > 0).float().sum(-1).mean())
    fired = (feats > 0).any(0)
    block = lm.model.get_submodule(f"{lm.arch.layers_path}.{layer}")

    def splice(_m, _a, output):
        h = untuple(output)
        new = h.clone()
        new[:, 1:] = sae(h[:, 1:].float()).to(h.dtype)  # position 0 stays: the SAE never saw the sink token
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
        f"| {report['fvu']} | {report['mean_l0']} | {report['dead_features']} ({report['dead_fraction']:.1%}) | "
        f"{report['ce_loss_clean']} | {report['ce_loss_spliced']} | {report['ce_increase']} |",
        "",
        f"{report['heldout_tokens']:,} held-out tokens for FVU/L0/dead, {report['ce_tokens']:,} for CE. "
        f"Split: {report['split']}. Position 0: {report['position_0']}.",
        "",
        *[f"- {report[k]}" for k in ("dead_features_note", "timing_note") if k in report],
        "",
        "## Text and licences",
        "",
        sources,
        "",
        "`heldout.json.gz` holds the held-out texts; `labels.json.gz` the feature labels (scripts/label_sae.py).",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=float, default=48)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--dead-window", type=int, default=150, help="steps without firing before a feature counts dead")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per text")
    p.add_argument("--answer-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ce-tokens", type=int, default=20000)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    torch.set_grad_enabled(False)
    work = cache_dir() / "sae_train"
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model(MODEL)
    hook_name = f"blocks.{args.layer}.hook_resid_post"
    model_name = EMBEDDED_MODELS[MODEL].hub_id
    t_start = time.time()
    doc = build_texts(lm, work, args.answer_tokens)
    train_items = [t for t in doc["texts"] if not _heldout(t["text"])]
    held_items = [t for t in doc["texts"] if _heldout(t["text"])]
    print(f"{len(train_items)} training texts, {len(held_items)} held out", flush=True)

    seqs = {}
    acts = {}
    for split, items in (("train", train_items), ("heldout", held_items)):
        seqs[split] = tokenize(lm, [t["text"] for t in items], args.max_tokens)
        path = work / f"acts_L{args.layer}_{split}_{args.max_tokens}.pt"
        if not path.exists():
            print(f"activations: {split}", flush=True)
            torch.save(collect(lm, args.layer, seqs[split]), path)
        acts[split] = torch.load(path)
        print(f"{split}: {len(acts[split])} activation vectors", flush=True)
    t_acts = time.time() - t_start

    torch.set_grad_enabled(True)
    sae, t_train = train(acts["train"], args, hook_name, model_name)
    torch.set_grad_enabled(False)

    out = args.out or OUT / f"{MODEL}-res-L{args.layer}"
    out.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(str(out))
    # Ship it small: fp16 weights, loaded by sae_lens as float32 unless asked otherwise.
    from safetensors.torch import load_file, save_file

    weights = out / "sae_weights.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()}, weights)

    from sae_lens import SAE

    shipped = SAE.load_from_disk(str(out))
    report = quality(lm, shipped, args.layer, acts["heldout"], seqs["heldout"], args.ce_tokens)
    report.update(
        {
            "model": model_name,
            "hook_name": hook_name,
            "architecture": "batchtopk (saved as jumprelu)",
            "d_sae": args.d_sae,
            "k": args.k,
            "training_tokens": len(acts["train"]),
            "epochs": args.epochs,
            "training_samples": int(args.epochs * len(acts["train"])),
            "minutes_activations": round(t_acts / 60, 1),
            "minutes_training": round(t_train / 60, 1),
            "sources": doc["sources"],
            "split": f"a text is held out when int(sha1(text), 16) % 100 < {HELDOUT_PERCENT}",
            "position_0": "excluded from training and from FVU/L0 (attention sink); kept unspliced in the CE test",
            "trained_by": "scripts/train_sae.py "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        }
    )
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    write_readme(out, report)
    with gzip.open(out / "heldout.json.gz", "wt", encoding="utf-8") as f:
        json.dump({"split": report["split"], "texts": held_items}, f, ensure_ascii=False)
    print(json.dumps({k: v for k, v in report.items() if k != "sources"}, indent=1))
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
