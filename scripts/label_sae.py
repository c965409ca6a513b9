"""Label the embedded SAE's features: top contexts (token highlighted) and promoted tokens.

    .venv/bin/python -m scripts.label_sae            # ~15 min on a 2-core CPU; writes labels.json.gz next to the SAE

The text is the broad corpus's *labels* split (scripts.train_sae.build_texts: every source, every input format, at
--scale of the training budgets; at least 500k tokens), which neither the SAE's training nor the held-out
measurement ever sees, so a label shows what a feature does on text the SAE never trained on.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time
from pathlib import Path

from scripts.train_sae import build_texts, write_readme
from steer_core.constants import LABELS_FILENAME, cache_dir
from steer_core.model import load_model
from steer_core.sae.feature import EMBEDDED_SAES, load_sae_from_disk
from steer_core.sae.labels import compute_labels, save_labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", default=next(iter(EMBEDDED_SAES)), choices=sorted(EMBEDDED_SAES))
    p.add_argument("--contexts", type=int, default=5)
    p.add_argument("--promoted", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per text (as in training)")
    p.add_argument("--scale", type=float, default=0.2, help="of scripts.train_sae's BUDGETS, for the labels split")
    p.add_argument("--folder", type=Path, help="an SAE trained for --sae but not shipped yet (train_sae.py --out)")
    args = p.parse_args()

    spec = EMBEDDED_SAES[args.sae]
    folder = args.folder or spec.path
    out = folder / LABELS_FILENAME
    lm = load_model(spec.model)
    sae = load_sae_from_disk(folder)
    items = build_texts(lm, cache_dir() / "sae_train", "labels", args.scale)
    texts = [t["text"] for t in items]
    print(f"{len(texts)} label texts: " + ", ".join(f"{k} {v}" for k, v in collections.Counter(
        f"{t['source']}/{t['format']}" for t in items).most_common()), flush=True)  # fmt: skip
    t0 = time.time()
    labels = compute_labels(
        sae, lm.model, lm.tokenizer, texts, contexts=args.contexts, promoted=args.promoted,
        max_tokens_per_text=args.max_tokens,
    )  # fmt: skip
    labels.source.update(
        sae=spec.name,
        text=f"the broad corpus's labels split, every source and format (scripts/label_sae.py --scale {args.scale}); "
        "never seen in training or in the held-out measurement",
        texts_by_source=dict(collections.Counter(t["source"] for t in items).most_common()),
        texts_by_format=dict(collections.Counter(t["format"] for t in items).most_common()),
    )
    report_path = folder / "quality.json"
    quality = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if quality.get("words", {}).get("anchor_cos"):
        # feature i's decoder row stays near words[i]'s mean activation (--anchor-cos): a name it cannot drift from
        for i, word in enumerate(quality["words"]["features"]):
            labels.labels[i] = dataclasses.replace(labels.labels[i], word=word)
    save_labels(labels, out)
    dead = sum(1 for label in labels.labels.values() if not label.contexts)
    if quality:
        # The held-out split (~60k tokens) is too small to tell a rare feature from a dead one: a word seen 40 times
        # in 3M training tokens is expected less than once in it. The labels split is ten times larger and as unseen.
        quality["dead_features_labels"] = {
            "tokens": labels.source["tokens"], "count": dead, "fraction": round(dead / len(labels.labels), 4),
        }  # fmt: skip
        report_path.write_text(json.dumps(quality, indent=1) + "\n")
        write_readme(folder, quality)
    size = out.stat().st_size
    print(f"{len(labels.labels)} features ({dead} never fired) on {labels.source['tokens']} tokens in "
          f"{time.time() - t0:.0f} s -> {out} ({size / 1e6:.1f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
