"""Rebuild steer_core/data/corpus.json.gz: broad, offline, deterministic text for calibration, verification and labels.

    apt-get install wordnet-base fortunes dict-jargon    # Debian packages; licences recorded in the output
    .venv/bin/python -m scripts.build_corpus      # ~11 min on 2 CPU cores (10 of them the model's answers, cached)

Sources:
- **wordnet**: WordNet 3.0 glosses with their example sentences (definitions of everyday words, every domain);
- **fortunes**: quotations, jokes and remarks (Debian's `fortunes`);
- **jargon**: entries of the Jargon File (computer slang, in prose);
- **generated**: the embedded model's own greedy answers on thousands of everyday topics (the most frequent WordNet
  nouns and verbs of 37 domains: animals, food, places, weather, sport, work, feelings, science, history, code...),
  generated as a single-turn chat, a chat with a system prompt, a two-turn chat and a plain continuation without a
  chat template. That is the text a served instruct model reads and writes.

Every document is assigned to one split, `calibration`, `heldout` or `labels`, by a hash of its topic (generated)
or its text (the others), so the splits never share a topic or a text and every source and format is in each. The
package ships calibration and held-out documents; the labels split (for scripts/label_sae.py) goes to the cache.
How a document becomes model input in each format (chat, system, multiturn, plain) is steer_core.corpus's job.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import torch

from steer_core.constants import cache_dir
from steer_core.generate import left_pad

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
JARGON = Path("/usr/share/dictd/jargon")
OUT = Path(__file__).resolve().parents[1] / "steer_core" / "data" / "corpus.json.gz"
GENERATOR = "smollm2-135m-instruct"

# Fortune files of general English prose; offensive-leaning, ASCII-art and fan-fiction files are skipped.
FORTUNE_FILES = [
    "computers", "cookie", "definitions", "education", "food", "fortunes", "goedel", "humorists", "kids", "law",
    "literature", "love", "magic", "medicine", "miscellaneous", "news", "people", "pets", "platitudes", "politics",
    "riddles", "science", "songs-poems", "sports", "tao", "wisdom", "work",
]  # fmt: skip

# WordNet lexicographer files (lexnames(5WN)) that hold everyday concepts, by number.
DOMAINS = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute", 8: "noun.body",
    9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling", 13: "noun.food",
    14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object", 18: "noun.person",
    19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process", 26: "noun.state",
    27: "noun.substance", 28: "noun.time", 29: "verb.body", 30: "verb.change", 31: "verb.cognition",
    32: "verb.communication", 33: "verb.competition", 34: "verb.consumption", 35: "verb.contact", 36: "verb.creation",
    37: "verb.emotion", 38: "verb.motion", 39: "verb.perception", 40: "verb.possession", 41: "verb.social",
    43: "verb.weather",
}  # fmt: skip
NOUN_ASKS = [
    "Tell me about {t}.", "Write a short poem about {t}.", "Give me three tips about {t}.",
    "Why do people care about {t}?",
    "Write a short story involving {t}.", "Explain {t} to a child.", "What are the pros and cons of {t}?",
    "Describe {t} in a few sentences.", "What is the history of {t}?", "Write a product review that mentions {t}.",
    "I have a question about {t}. What should I know?", "Can you write a tweet about {t}?",
]  # fmt: skip
VERB_ASKS = [
    "What does it mean to {t}?", "Give me advice on how to {t}.", "Write a short story where someone has to {t}.",
    "When is it a good idea to {t}?", "Explain to a child what it means to {t}.", "Why would anyone {t}?",
]  # fmt: skip
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly customer support agent for an online shop. Be polite and brief.",
    "You are a concise assistant. Answer in at most three sentences.",
    "You are a patient teacher who explains things simply to beginners.",
    "You are an enthusiastic travel guide.",
    "You are a chef who loves sharing recipes and cooking tips.",
    "You are a careful science tutor. Be accurate and give one example.",
    "You are a cheerful assistant for kids aged 8 to 12.",
    "You are a professional writing assistant. Use clear, plain English.",
    "You are a coding assistant. Prefer short answers with code where useful.",
    "You are a supportive coach who motivates people.",
    "You are a sarcastic but helpful assistant.",
]
FOLLOW_UPS = [
    "Can you say more about that?", "Thanks! Can you give me an example?", "Could you make that shorter?",
    "What else should I know about {t}?", "Interesting. Why is that?", "Can you explain it another way?",
    "Is there anything people often get wrong about {t}?", "Great, and what would you recommend?",
]  # fmt: skip
CONTINUATIONS = [
    "The {t} is", "Here is what most people do not know about {t}:", "Q: What is {t}?\nA:",
    "My favourite thing about {t} is",
    "Everything you need to know about {t}.\n\n", "Chapter 1\n\nThe morning started with {t}", "{T} can be",
    "Dear diary, today I thought about {t}.", "In this article we look at {t} and why it matters.",
]  # fmt: skip
SPLITS = (("calibration", 70), ("heldout", 15), ("labels", 15))


def split_of(key: str) -> str:
    """The split a document belongs to, from its key alone: independent of order, stable across rebuilds."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100
    for name, share in SPLITS:
        if bucket < share:
            return name
        bucket -= share
    raise AssertionError


def package_version(name: str) -> str:
    try:
        return subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def clean(text: str, lo: int = 40, hi: int = 900) -> str | None:
    body = re.sub(r"\s+", " ", text).strip()
    if not lo <= len(body) <= hi or sum(c.isalpha() or c.isspace() for c in body) / len(body) < 0.8:
        return None  # tables, ASCII art, code
    return body


def wordnet_synsets() -> list[tuple[str, str, int, list[str], str]]:
    """(pos, offset, lexicographer file, words, gloss) of every synset."""
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):
                continue  # the licence header
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            n = int(fields[3], 16)
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(n)]
            out.append((pos, fields[0], int(fields[1]), words, gloss.strip()))
    return out


def wordnet_texts(synsets: list[tuple[str, str, int, list[str], str]], keep: int) -> list[str]:
    """A seeded sample of `keep` entries "word: definition; "example"" of synsets that have an example sentence."""
    texts = []
    for _pos, _off, _lex, words, gloss in synsets:
        if '"' not in gloss:
            continue
        text = clean(f"{words[0]}: {gloss}", 40, 600)
        if text:
            texts.append(text)
    return random.Random(0).sample(sorted(set(texts)), keep)


def topic_words(per_domain: int) -> list[tuple[str, str, str]]:
    """(word, "noun" | "verb", domain): the most used single words of each domain, by SemCor tag counts."""
    counts: dict[tuple[str, str, int], int] = defaultdict(int)
    for line in (WORDNET / "cntlist.rev").read_text(encoding="latin-1").splitlines():
        key, _sense, count = line.split()
        lemma, _, rest = key.partition("%")
        ss_type, lex = rest.split(":")[:2]
        pos = {"1": "noun", "2": "verb"}.get(ss_type)
        if pos and int(lex) in DOMAINS and re.fullmatch(r"[a-z]{3,}", lemma):
            counts[(lemma, pos, int(lex))] += int(count)
    best: dict[str, tuple[int, str, int]] = {}
    for (lemma, pos, lex), count in counts.items():  # a word goes to its most used domain, once
        if count > best.get(lemma, (0, "", 0))[0]:
            best[lemma] = (count, pos, lex)
    by_domain: dict[int, list[tuple[int, str, str]]] = defaultdict(list)
    for lemma, (count, pos, lex) in best.items():
        by_domain[lex].append((count, lemma, pos))
    out = []
    for lex, items in sorted(by_domain.items()):
        for _count, lemma, pos in sorted(items, key=lambda i: (-i[0], i[1]))[:per_domain]:
            out.append((lemma, pos, DOMAINS[lex]))
    return out


def fortune_texts() -> list[str]:
    out = []
    for name in FORTUNE_FILES:
        raw = (FORTUNES / name).read_text(encoding="utf-8", errors="replace")
        out += [t for item in raw.split("\n%\n") if (t := clean(item, 80, 700))]
    return sorted(set(out))


def dictd_entries(name: str) -> list[tuple[str, str]]:
    """(headword, raw entry) of a dictd database (a gzip of the entries, indexed by base64 offsets)."""
    path = JARGON.parent / name
    raw = gzip.decompress(path.with_suffix(".dict.dz").read_bytes())
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(s: str) -> int:
        n = 0
        for c in s:
            n = n * 64 + digits.index(c)
        return n

    out, seen = [], set()
    for line in path.with_suffix(".index").read_text(encoding="utf-8", errors="replace").splitlines():
        word, off, length = line.split("\t")[:3]
        if word.startswith("00-") or (off, length) in seen:
            continue  # database headers; several headwords share one entry
        seen.add((off, length))
        out.append((word, raw[b64(off) : b64(off) + b64(length)].decode("utf-8", errors="replace")))
    return out


def jargon_texts(hi: int = 500) -> list[str]:
    """Entries of the Jargon File. hi=500 for the shipped corpus: longer entries would outweigh the other sources."""
    out = []
    for _word, body in dictd_entries("jargon"):
        body = re.sub(r"\{([^}]*)\}", r"\1", body)  # cross-reference braces
        if text := clean(body, 120, hi):
            out.append(text)
    return sorted(set(out))


def foldoc_texts() -> list[str]:
    """FOLDOC entries (computing), without their subject tags, cross-reference braces and dates."""
    out = []
    for _word, body in dictd_entries("foldoc"):
        body = re.sub(r"\{([^}]*)\}", r"\1", re.sub(r"<[^>]*>|\(\d{4}-\d\d-\d\d\)", "", body))
        if text := clean(body, 120, 1500):
            out.append(text)
    return sorted(set(out))


def gcide_texts() -> list[str]:
    """GCIDE (Webster 1913 + WordNet) definitions as "word: definition", without pronunciation, etymology and
    source tags; literary quotations kept."""
    out = []
    for word, body in dictd_entries("gcide"):
        lines = body.split("\n")[1:]  # the first line is the headword's pronunciation and grammar
        body = re.sub(r"\[[^\]]*\]|\{([^}]*)\}|--[A-Z][\w. ]*", lambda m: m.group(1) or "", "\n".join(lines))
        if text := clean(f"{word}: {body}", 60, 1200):
            out.append(text)
    return sorted(set(out))


def conversation_plan(topics: list[tuple[str, str, str]]) -> list[dict]:
    """One generated document per topic, the formats in turn: chat, system, multiturn, plain."""
    rng = random.Random(0)
    plan = []
    for i, (word, pos, domain) in enumerate(topics):
        fmt = ("chat", "system", "multiturn", "plain")[i % 4]
        ask = rng.choice(NOUN_ASKS if pos == "noun" else VERB_ASKS).format(t=word)
        doc: dict = {"source": "generated", "topic": word, "domain": domain, "format": fmt}
        if fmt == "plain":
            doc["prompt"] = rng.choice(CONTINUATIONS).format(t=word, T=word.capitalize())
        else:
            doc["messages"] = [{"role": "user", "content": ask}]
            if fmt == "system":
                doc["messages"].insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            if fmt == "multiturn":
                doc["follow_up"] = rng.choice(FOLLOW_UPS).format(t=word)
        plan.append(doc)
    return plan


@torch.no_grad()
def generate(lm, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations (deterministic), batched with left padding, shortest prompts together."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoded = [tok(p, add_special_tokens=True).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        t0 = time.time()
        idx = order[start : start + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], pad)
        width = ids.shape[1]
        seqs = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            repetition_penalty=1.1,
        )
        for row, i in zip(seqs, idx, strict=True):
            out[i] = tok.decode(row[width:], skip_special_tokens=True).strip()
        print(f"  generated {start + len(idx)}/{len(prompts)} ({time.time() - t0:.0f} s)", flush=True)
    return [out[i] for i in range(len(prompts))]


def run_generation(plan: list[dict], max_new_tokens: int, batch_size: int) -> list[dict]:
    """Fill in the model's answers: first turns (or continuations), then the multi-turn chats' second answers."""
    from steer_core.model import load_model

    lm = load_model(GENERATOR)
    tok = lm.tokenizer

    def chat_prompt(messages: list[dict]) -> str:
        return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    prompts = [chat_prompt(d["messages"]) if "messages" in d else d["prompt"] for d in plan]
    for doc, answer in zip(plan, generate(lm, prompts, max_new_tokens, batch_size), strict=True):
        if "messages" in doc:
            doc["messages"].append({"role": "assistant", "content": answer})
        else:
            doc["continuation"] = answer
    second = [d for d in plan if "follow_up" in d]
    for d in second:
        d["messages"].append({"role": "user", "content": d.pop("follow_up")})
    answers = generate(lm, [chat_prompt(d["messages"]) for d in second], max_new_tokens, batch_size)
    for doc, answer in zip(second, answers, strict=True):
        doc["messages"].append({"role": "assistant", "content": answer})
    return plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topics-per-domain", type=int, default=36, help="37 domains: ~1,300 generated documents")
    p.add_argument("--answer-tokens", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--wordnet", type=int, default=1500, help="WordNet entries (a seeded sample)")
    p.add_argument("--fortunes", type=int, default=1200)
    p.add_argument("--jargon", type=int, default=300)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)

    work = cache_dir() / "corpus_build"
    work.mkdir(parents=True, exist_ok=True)
    topics = topic_words(args.topics_per_domain)
    gen_path = work / f"generated-{args.topics_per_domain}-{args.answer_tokens}.json"
    if gen_path.exists():
        generated = json.loads(gen_path.read_text())
    else:
        t0 = time.time()
        generated = run_generation(conversation_plan(topics), args.answer_tokens, args.batch_size)
        print(f"generation: {(time.time() - t0) / 60:.1f} min", flush=True)
        gen_path.write_text(json.dumps(generated, ensure_ascii=False))

    rng = random.Random(0)
    docs: list[dict] = []
    for doc in generated:
        doc = {**doc, "split": split_of("topic:" + doc["topic"])}
        if "continuation" in doc:  # a plain document is its prompt and what the model wrote after it
            prompt = doc.pop("prompt")
            doc["text"] = prompt + ("" if prompt[-1:].isspace() else " ") + doc.pop("continuation")
        docs.append(doc)
    for source, texts in (
        ("wordnet", wordnet_texts(wordnet_synsets(), args.wordnet)),
        ("fortunes", rng.sample(fortune_texts(), args.fortunes)),
        ("jargon", rng.sample(jargon_texts(), args.jargon)),
    ):
        docs += [{"source": source, "text": t, "split": split_of(f"{source}:{t}")} for t in texts]

    sources = {
        "generated": f"{len(generated)} documents: greedy answers (at most {args.answer_tokens} new tokens, repetition "
        f"penalty 1.1) of HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0) on {len(topics)} topics, the most used "
        f"single words of {len(DOMAINS)} WordNet domains; formats chat, system, multiturn, plain in turn",
        "wordnet": f"Debian package wordnet-base {package_version('wordnet-base')}: WordNet 3.0 glosses with examples; "
        "licence WordNet 3.0 (Princeton, permissive with notice), see /usr/share/doc/wordnet-base/copyright",
        "fortunes": f"Debian package fortunes {package_version('fortunes')} files {', '.join(FORTUNE_FILES)}; licence "
        "BSD (fortune-mod), see /usr/share/doc/fortunes-min/copyright",
        "jargon": f"Debian package dict-jargon {package_version('dict-jargon')}: the Jargon File 4.4.7; public domain",
    }
    shipped = [d for d in docs if d["split"] != "labels"]
    body = json.dumps(shipped, ensure_ascii=False, sort_keys=True)
    doc = {
        "built_by": "python -m scripts.build_corpus "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "splits": f"{', '.join(f'{n} {s}%' for n, s in SPLITS)} by sha1 of the topic (generated) or text; "
        "the labels split is not shipped (scripts/label_sae.py rebuilds it)",
        "sources": sources,
        "sha256_of_documents": hashlib.sha256(body.encode()).hexdigest(),
        "documents": shipped,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime 0: the same documents give the same bytes
    with gzip.GzipFile(args.out, "wb", mtime=0) as f:
        f.write(json.dumps(doc, ensure_ascii=False, indent=0).encode())
    labels = [d for d in docs if d["split"] == "labels"]
    (work / "labels.json").write_text(json.dumps({"sources": sources, "documents": labels}, ensure_ascii=False))
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for d in docs:
        counts[(d["source"], d["split"])] += 1
    for (source, split), n in sorted(counts.items()):
        print(f"{source:10s} {split:12s} {n}")
    print(f"-> {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), labels split -> {work / 'labels.json'}")


if __name__ == "__main__":
    main()
