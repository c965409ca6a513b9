"""Label the embedded SAE's features from its held-out text: top contexts (token highlighted) and promoted tokens.

    .venv/bin/python -m scripts.label_sae            # ~3 min on a 2-core CPU; writes labels.json.gz next to the SAE

Held-out text only (heldout.json.gz, written by scripts/train_sae.py), so labels show what a feature does on text the
SAE never trained on.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time

from steer_core.feature import EMBEDDED_SAES, load_sae_from_disk
from steer_core.labels import compute_labels, save_labels
from steer_core.model import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", default=next(iter(EMBEDDED_SAES)), choices=sorted(EMBEDDED_SAES))
    p.add_argument("--contexts", type=int, default=5)
    p.add_argument("--promoted", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per held-out text (as in training)")
    args = p.parse_args()

    spec = EMBEDDED_SAES[args.sae]
    lm = load_model(spec.model)
    sae = load_sae_from_disk(spec.path)
    with gzip.open(spec.path / "heldout.json.gz", "rt", encoding="utf-8") as f:
        texts = [t["text"] for t in json.load(f)["texts"]]
    t0 = time.time()
    labels = compute_labels(
        sae, lm.model, lm.tokenizer, texts, contexts=args.contexts, promoted=args.promoted,
        max_tokens_per_text=args.max_tokens,
    )  # fmt: skip
    labels.source.update(sae=spec.name, text="heldout.json.gz (never seen in training)")
    save_labels(labels, spec.labels_path)
    dead = sum(1 for label in labels.labels.values() if not label.contexts)
    size = spec.labels_path.stat().st_size
    print(f"{len(labels.labels)} features ({dead} never fired) on {labels.source['tokens']} tokens in "
          f"{time.time() - t0:.0f} s -> {spec.labels_path} ({size / 1e6:.1f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
