"""Rebuild steer_core/data/corpus.json from Debian's `fortunes` package (apt-get install fortunes).

Deterministic: the same package version gives the same file. Run: python scripts/build_corpus.py
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
from pathlib import Path

SOURCE = Path("/usr/share/games/fortunes")
# Files of general English prose, quotations and jokes; skipped: ASCII art, offensive-leaning and
# single-author novel quotations.
FILES = [
    "computers",
    "cookie",
    "definitions",
    "education",
    "food",
    "fortunes",
    "goedel",
    "humorists",
    "kids",
    "law",
    "literature",
    "love",
    "magic",
    "medicine",
    "miscellaneous",
    "news",
    "people",
    "pets",
    "platitudes",
    "politics",
    "riddles",
    "science",
    "songs-poems",
    "sports",
    "tao",
    "wisdom",
    "work",
]
MAX_TEXTS = 2400
OUT = Path(__file__).resolve().parents[1] / "steer_core" / "data" / "corpus.json"


def clean(text: str) -> str | None:
    lines = [ln.strip() for ln in text.strip().splitlines()]
    body = " ".join(ln for ln in lines if ln)
    body = re.sub(r"\s+", " ", body)
    if not 80 <= len(body) <= 700:
        return None
    letters = sum(c.isalpha() or c.isspace() for c in body)
    if letters / len(body) < 0.85:  # tables, ASCII art, code
        return None
    return body


def main() -> None:
    texts: list[str] = []
    seen: set[str] = set()
    for name in FILES:
        raw = (SOURCE / name).read_text(encoding="utf-8", errors="replace")
        for item in raw.split("\n%\n"):
            body = clean(item)
            if body and body not in seen:
                seen.add(body)
                texts.append(body)
    random.Random(0).shuffle(texts)
    texts = texts[:MAX_TEXTS]
    try:
        version = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "fortunes"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        version = "unknown"
    doc = {
        "source": f"Debian package fortunes {version} (files: {', '.join(FILES)})",
        "license": "BSD (fortune-mod; see /usr/share/doc/fortunes-min/copyright)",
        "built_by": "scripts/build_corpus.py",
        "sha256_of_texts": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
        "texts": texts,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"{len(texts)} texts, {sum(map(len, texts))} characters -> {OUT}")


if __name__ == "__main__":
    main()
