"""Can a newcomer find an everyday concept and steer with it? Search, take the top hit, steer, count mentions.

For each concept: `steer_core.search` on the concept's own word, the top feature, its vector at each strength (× the
layer's median residual norm, the app's unit), greedy answers to neutral prompts with and without it. A concept is
*found and steered* when the steered answers mention it (the word or one of its forms: an embedding neighbour that
starts like it, as a word prefix) in more answers than the unsteered ones do. A script that prints numbers, not a test:

    .venv/bin/python -m scripts.concept_benchmark --out artifacts/concepts        # ~8 min per strength, 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from steer_core.constants import LABELS_FILENAME
from steer_core.feature import embedded_sae_for, load_sae_from_disk
from steer_core.generate import left_pad
from steer_core.labels import load_labels
from steer_core.model import keep_freed_memory, load_model
from steer_core.recipe import VectorRecipe
from steer_core.search import neighbours, search
from steer_core.steer import steering

CONCEPTS = [
    "dog", "cat", "horse", "bird", "fish",  # animals
    "pizza", "coffee", "chocolate", "bread", "wine",  # food and drink
    "ocean", "mountain", "forest", "city", "desert",  # places
    "rain", "snow", "sun", "wind",  # weather
    "football", "music", "painting", "dance",  # sport and art
    "money", "job", "school", "doctor",  # work and life
    "love", "anger", "fear", "joy",  # feelings
    "computer", "space", "war", "king",  # science, history
]  # fmt: skip
PROMPTS = [
    "Tell me about your day.",
    "Write a short story.",
    "What should I do this weekend?",
    "Give me some advice.",
    "Describe something you like.",
    "What do you think about the future?",
]
NEAR = 0.55  # an embedding neighbour at least this similar, spelled like the word, is one of its forms


def mentions(text: str, words: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}", text, re.IGNORECASE) for w in words)


@torch.no_grad()
def answers(lm, vector, max_new_tokens: int) -> list[str]:
    """Greedy answers to PROMPTS in one left-padded batch, steered by `vector` when given."""
    tok = lm.tokenizer
    rows = [
        tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False).input_ids
        for p in PROMPTS
    ]  # fmt: skip
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = left_pad(rows, pad)
    width = ids.shape[1]
    ctx = steering(lm.model, vector) if vector is not None else torch.no_grad()
    with ctx:
        out = lm.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
    return [tok.decode(row[width:], skip_special_tokens=True) for row in out]


def main() -> None:
    keep_freed_memory()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--concepts", nargs="+", default=CONCEPTS)
    p.add_argument("--out", type=Path, default=Path("artifacts/concepts"))
    p.add_argument("--folder", type=Path, help="an SAE for --model not shipped yet, labelled (scripts.label_sae)")
    args = p.parse_args()

    lm = load_model(args.model)
    spec = embedded_sae_for(lm.name)
    if spec is None:
        raise SystemExit(f"{args.model} has no embedded SAE")
    folder = args.folder or spec.path
    sae = load_sae_from_disk(folder)
    labels = load_labels(folder / LABELS_FILENAME)
    base = answers(lm, None, args.max_new_tokens)
    rows = []
    for concept in args.concepts:
        t = time.perf_counter()
        # the word's own forms (loves, loving): embedding neighbours that start like it; "cat" is near "dog" too
        words = [
            w for w, sim in neighbours(lm.model, lm.tokenizer, concept).items() if sim >= NEAR and w[:3] == concept[:3]
        ]
        top = search(labels, sae, lm.model, lm.tokenizer, concept, k=1)
        row: dict = {"concept": concept, "words": words, "base_mentions": sum(mentions(a, words) for a in base)}
        if not top:
            rows.append({**row, "feature": None})
            continue
        label, score = top[0]
        row.update({"feature": label.feature, "score": score, "label": label.summary(1)})
        for k in args.strengths:
            vector = VectorRecipe("sae", (k,), "resid", path=str(folder), features=(label.feature,)).build(lm)
            steered = answers(lm, vector, args.max_new_tokens)
            row[f"steered_mentions_{k:g}"] = sum(mentions(a, words) for a in steered)
            row[f"steered_{k:g}"] = row[f"steered_mentions_{k:g}"] > row["base_mentions"]
            row[f"example_{k:g}"] = steered[0]
        rows.append(row)
        cells = " ".join(f"{k:g}×: {row[f'steered_mentions_{k:g}']}/{len(PROMPTS)}" for k in args.strengths)
        print(f"{concept:>10} #{label.feature:<5} base {row['base_mentions']}/{len(PROMPTS)} {cells} "
              f"({time.perf_counter() - t:.0f} s)  {label.summary(1)[:80]}", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "concepts.json").write_text(json.dumps({"prompts": PROMPTS, "rows": rows}, indent=1))
    lines = [
        f"| concept | top hit | base mentions | {' | '.join(f'steered {k:g}×' for k in args.strengths)} |",
        "|---|---|---|" + "---|" * len(args.strengths),
    ]
    for r in rows:
        cells = " | ".join(
            f"{r.get(f'steered_mentions_{k:g}', '-')}/{len(PROMPTS)}{' ✓' if r.get(f'steered_{k:g}') else ''}"
            for k in args.strengths
        )
        lines.append(f"| {r['concept']} | #{r['feature']} | {r['base_mentions']}/{len(PROMPTS)} | {cells} |")
    for k in args.strengths:
        hits = [r["concept"] for r in rows if r.get(f"steered_{k:g}")]
        lines.append(f"\n{k:g}×: {len(hits)}/{len(rows)} concepts found and steered ({', '.join(hits) or 'none'})")
    (args.out / "concepts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
