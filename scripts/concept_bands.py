"""Any everyday concept, not only the benchmark's own: a stratified benchmark drawn from WordNet by a fixed rule.

The concepts are fixed before anything is tuned (`--select` writes them to docs/concept-bands.json, and the run reads
that file):
- every WordNet common noun (WordNet keeps proper nouns' capitals) that is one word of 3-12 letters, whose most
  used sense (WordNet orders senses by use) is concrete and everyday (RULE_LEXNAMES: animals, artifacts, food,
  plants, objects, places, people, phenomena, substances, the body), and which is used more as a noun than as a
  verb or adjective (SemCor counts);
- not one of the concepts the project has measured or tuned on before (scripts.concept_benchmark's 35 and 15, and
  the 10 of the issue that asked for this benchmark);
- banded by its Zipf frequency in `wordfreq` (frequent >= 4.5, middle 3.5-4.5, rare 2.5-3.5), and PER_BAND drawn
  at random (seed 0) from each band.
Each concept's "talks about it" family is derived, not written: the word, the other single-word lemmas of its sense
(synonyms) and of its direct hyponyms, each with its plural (WordNet's irregular plurals, else English rules).

For each concept the run compares what a user can steer with at the app's default strength (0.5× the layer's median
residual norm): search's top hit (`steer_core.sae.search`), the fallback (`steer_core.sae.concept`: the model's own
reading of the word at the SAE's layer) and what the app offers (the top hit when it carries the concept, else the
fallback, `steer_core.sae.concept.match`). Greedy answers to four chat prompts and four plain openings that are in no
corpus of the project; *steered* means the family is mentioned in more of the 8 answers than without steering. With
--export-every N, the offered vector of every Nth concept it steered is exported as the app exports it and served
with PEFT: its mentions against the hook's are what serving keeps. A script that prints numbers, not a test:

    apt-get install wordnet-base && pip install wordfreq==3.1.1     # only for --select
    .venv/bin/python -m scripts.concept_bands --select               # writes docs/concept-bands.json (seconds)
    .venv/bin/python -m scripts.concept_bands --export-every 4       # ~20 s a concept, 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from steer_core.constants import LABELS_FILENAME
from steer_core.generate import left_pad
from steer_core.model import keep_freed_memory, load_model
from steer_core.sae.concept import RATES_FILE, concept_recipe, match
from steer_core.sae.feature import embedded_sae_for, load_sae_from_disk
from steer_core.sae.labels import load_labels
from steer_core.sae.search import search
from steer_core.steer import steering
from steer_core.vectors.recipe import VectorRecipe

WORDNET = Path("/usr/share/wordnet")
CONCEPTS_FILE = Path(__file__).resolve().parents[1] / "docs" / "concept-bands.json"
# lexnames(5WN) numbers of concrete, everyday nouns
RULE_LEXNAMES = {5: "animal", 6: "artifact", 8: "body", 13: "food", 15: "location", 17: "object", 18: "person",
                 19: "phenomenon", 20: "plant", 27: "substance"}  # fmt: skip
BANDS = (("frequent", 4.5, 9.0), ("middle", 3.5, 4.5), ("rare", 2.5, 3.5))
PER_BAND = 40
MEASURED_BEFORE = {
    "dog", "cat", "horse", "bird", "fish", "pizza", "coffee", "chocolate", "bread", "wine", "ocean", "mountain",
    "forest", "city", "desert", "rain", "snow", "sun", "wind", "football", "music", "painting", "dance", "money",
    "job", "school", "doctor", "love", "anger", "fear", "joy", "computer", "space", "war", "king",
    "tree", "car", "river", "baby", "book", "sleep", "garden", "train", "flower", "beach", "cheese", "game",
    "teacher", "storm", "hospital",
    "volcano", "robot", "airport", "bicycle", "ghost", "church", "wedding", "prison", "soup", "island",
}  # fmt: skip
CHAT = ["How was your morning?", "Write a few lines for a birthday card.", "What is a good way to relax?",
        "Tell me something interesting."]  # fmt: skip
PLAIN = ["Yesterday afternoon,", "The letter began:", "Last summer we", "In my opinion, the best part of"]
STRENGTH = 0.5  # the app's default for the embedded SAE, in units of the layer's median residual norm
MAX_NEW_TOKENS = 40


# --- selection (WordNet + wordfreq), run once to fix the concepts ---------------------------------------------------


def _index(pos: str) -> dict[str, list[str]]:
    """lemma -> synset offsets, most used sense first."""
    out = {}
    for line in (WORDNET / f"index.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        f = line.split()
        n_ptr = int(f[3])
        out[f[0]] = f[4 + n_ptr + 2 :]
    return out


def _synsets() -> dict[str, tuple[int, list[str], list[str]]]:
    """noun synset offset -> (lexname number, lemmas, direct hyponym offsets)."""
    out = {}
    for line in (WORDNET / "data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        f = line.partition(" | ")[0].split()
        n = int(f[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", f[4 + 2 * i]).replace("_", " ") for i in range(n)]
        at = 4 + 2 * n
        pointers = [f[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(int(f[at]))]
        out[f[0]] = (int(f[1]), lemmas, [p[1] for p in pointers if p[0] == "~" and p[2] == "n"])
    return out


def _use_counts() -> dict[tuple[str, str], int]:
    """(lemma, "n" | "v" | "a") -> SemCor tag count."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for line in (WORDNET / "cntlist.rev").read_text(encoding="latin-1").splitlines():
        key, _sense, count = line.split()
        lemma, _, rest = key.partition("%")
        counts[(lemma, {"1": "n", "2": "v", "3": "a", "5": "a"}.get(rest[0], "r"))] += int(count)
    return counts


def _plurals() -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for line in (WORDNET / "noun.exc").read_text(encoding="latin-1").splitlines():
        plural, *singulars = line.split()
        for s in singulars:
            out[s].append(plural)
    return out


def forms(word: str, irregular: dict[str, list[str]]) -> list[str]:
    """The word and its plural(s)."""
    if word in irregular:
        return [word, *irregular[word]]
    if re.search(r"(s|x|z|ch|sh)$", word):
        return [word, word + "es"]
    if re.search(r"[^aeiou]y$", word):
        return [word, word[:-1] + "ies"]
    return [word, word + "s"]


def select_concepts() -> dict:
    from wordfreq import zipf_frequency

    nouns, verbs, adjs = _index("noun"), _index("verb"), _index("adj")
    synsets, counts, irregular = _synsets(), _use_counts(), _plurals()
    bands: dict[str, list[dict]] = defaultdict(list)
    for lemma, offsets in sorted(nouns.items()):
        if not re.fullmatch(r"[a-z]{3,12}", lemma) or lemma in MEASURED_BEFORE:
            continue
        lex, lemmas, hyponyms = synsets[offsets[0]]
        if lex not in RULE_LEXNAMES or lemma not in lemmas:
            continue  # not everyday, or a proper noun (WordNet keeps their capitals: "Boston", "Asian")
        if (lemma in verbs or lemma in adjs) and counts[(lemma, "n")] < counts[(lemma, "v")] + counts[(lemma, "a")]:
            continue
        zipf = zipf_frequency(lemma, "en")
        band = next((name for name, lo, hi in BANDS if lo <= zipf < hi), None)
        if band is None:
            continue
        kin = [w.lower() for w in lemmas if w != lemma] + [w.lower() for h in hyponyms for w in synsets[h][1]]
        family = sorted({f for w in [lemma, *kin] if re.fullmatch(r"[a-z][a-z ]{2,}", w) for f in forms(w, irregular)})
        bands[band].append({"concept": lemma, "band": band, "zipf": zipf, "kind": RULE_LEXNAMES[lex],
                            "family": family})  # fmt: skip
    rng = random.Random(0)
    chosen = [
        c for name, _lo, _hi in BANDS for c in sorted(rng.sample(bands[name], PER_BAND), key=lambda c: c["concept"])
    ]
    return {
        "rule": __doc__.split("\n\n")[1],
        "pool": {name: len(bands[name]) for name, _lo, _hi in BANDS},
        "concepts": chosen,
    }


# --- the run ---------------------------------------------------------------------------------------------------------


def mentions(text: str, family: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) for w in family)


@torch.no_grad()
def answers(lm, vector, *, model=None) -> list[str]:
    """Greedy answers to CHAT (templated) and PLAIN in one left-padded batch, steered by `vector` when given, from
    `model` (a PEFT-loaded adapter) when given."""
    tok = lm.tokenizer
    rows = [
        tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False).input_ids
        for p in CHAT
    ] + [tok(p).input_ids for p in PLAIN]  # fmt: skip
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = left_pad(rows, pad)
    ctx = steering(lm.model, vector) if vector is not None else torch.no_grad()
    with ctx:
        out = (model or lm.model).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad
        )
    return [tok.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]


def served(lm, vector, verify_tokens: int) -> list[str]:
    from steer_core.check.verify import load_peft
    from steer_core.export import export

    with tempfile.TemporaryDirectory() as tmp:
        result = export(lm, vector, Path(tmp) / "adapter", verify_tokens=verify_tokens)
        return answers(lm, None, model=load_peft(lm.model, result.folder))


def rates(rows: list[dict], key: str) -> dict[str, str]:
    out = {}
    for name, _lo, _hi in (*BANDS, ("all", 0, 0)):
        band = [r for r in rows if name in (r["band"], "all")]
        hits = sum(bool(r[key]) for r in band)
        out[name] = f"{hits}/{len(band)} ({hits / max(len(band), 1):.0%})"
    return out


def save_rates(rows: list[dict], model: str) -> None:
    """What the app and the CLI show a user beside search: the rates per band of search's top hit, of the word's
    reading, and of what the app offers first."""
    known = json.loads(RATES_FILE.read_text()) if RATES_FILE.is_file() else {}
    bands = [name for name, _lo, _hi in BANDS]
    known[model] = {
        "concepts": len(rows),
        "bands": bands,
        **{
            key: {b: rates(rows, f"{key}_steered")[b].split()[1].strip("()") for b in bands}
            for key in ("search", "fallback", "offered")
        },
    }
    RATES_FILE.write_text(json.dumps(known, indent=1) + "\n")


def report(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Stratified concept benchmark: {meta['model']}, the embedded SAE at {meta['point']}, "
        f"{len(rows)} WordNet nouns\n",
        f"`python -m scripts.concept_bands{meta['args']}` ({meta['date']}). The concepts, their bands and word "
        "families are fixed in `docs/concept-bands.json` by the rule in the script; none of them was measured "
        f"before. Steered: the word family is mentioned in more of {len(CHAT) + len(PLAIN)} greedy answers "
        f"({len(CHAT)} chat, {len(PLAIN)} plain, {MAX_NEW_TOKENS} new tokens) than without steering, at "
        f"{STRENGTH}× the layer's median residual norm.\n",
        "| found and steered by | frequent | middle | rare | all |",
        "|---|---|---|---|---|",
    ]
    names = {"search": "search's top hit (before)", "fallback": "the model's reading of the word (fallback)",
             "offered": "what the app offers: the top hit if it carries the concept, else the fallback (after)",
             "either": "either of the two"}  # fmt: skip
    for key, name in names.items():
        r = rates(rows, f"{key}_steered")
        lines.append(f"| {name} | {r['frequent']} | {r['middle']} | {r['rare']} | {r['all']} |")
    carried = rates(rows, "carries")
    lines.append(f"| (top hit carries the concept) | {carried['frequent']} | {carried['middle']} | {carried['rare']} "
                 f"| {carried['all']} |")  # fmt: skip
    exported = [r for r in rows if "served_mentions" in r]
    if exported:
        lines.append("\nServed adapters (PEFT-loaded, greedy), the offered vector's mentions kept of the hook's:\n")
        lines.append("| band | concepts exported | hook mentions | served mentions | kept |")
        lines.append("|---|---|---|---|---|")
        for name, _lo, _hi in (*BANDS, ("all", 0, 0)):
            band = [r for r in exported if name in (r["band"], "all")]
            hook = sum(r["offered_mentions"] for r in band)
            kept = sum(r["served_mentions"] for r in band)
            lines.append(f"| {name} | {len(band)} | {hook} | {kept} | {kept / max(hook, 1):.0%} |")
    lines.append("\n## Misses\n")
    lines.append("Concepts that what the app offers did not steer, with search's top hit:\n")
    for name, _lo, _hi in BANDS:
        missed = [f"{r['concept']} (→ {r['hit_word'] or '#' + str(r['feature'])})" for r in rows
                  if r["band"] == name and not r["offered_steered"]]  # fmt: skip
        lines.append(f"- {name}: {', '.join(missed) or 'none'}")
    lines.append("\n## Every concept\n")
    lines.append("| concept | band | top hit | carries | base | search | fallback | offered | served/hook |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    n = len(CHAT) + len(PLAIN)
    for r in rows:
        kept = f"{r['served_mentions']}/{r['offered_mentions']}" if "served_mentions" in r else ""
        lines.append(
            f"| {r['concept']} | {r['band']} | #{r['feature']} {r['hit_word'] or ''}"
            f" | {'yes' if r['carries'] else 'no'} | {r['base_mentions']}/{n} | {r['search_mentions']}/{n}"
            f" | {r['fallback_mentions']}/{n}"
            f" | {r['offered_mentions']}/{n} | {kept} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    keep_freed_memory()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--select", action="store_true", help=f"draw the concepts by the rule into {CONCEPTS_FILE.name}")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--limit", type=int, help="only the first N concepts of each band")
    p.add_argument(
        "--export-every", type=int, default=0, help="export and serve every Nth concept whose offered vector steered"
    )
    p.add_argument("--verify-tokens", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("artifacts/concept-bands"))
    p.add_argument("--from-rows", type=Path, help="only write the report (and the rates) from a run's saved rows")
    args = p.parse_args()
    if args.from_rows:
        saved = json.loads(args.from_rows.read_text())
        finish(saved["rows"], saved["meta"], args.out)
        return
    if args.select:
        CONCEPTS_FILE.write_text(json.dumps(select_concepts(), indent=1) + "\n")
        print(f"wrote {CONCEPTS_FILE}")
        return

    concepts = json.loads(CONCEPTS_FILE.read_text())["concepts"]
    if args.limit:
        concepts = [c for name, _lo, _hi in BANDS for c in [c for c in concepts if c["band"] == name][: args.limit]]
    lm = load_model(args.model)
    spec = embedded_sae_for(lm.name)
    if spec is None:
        raise SystemExit(f"{args.model} has no embedded SAE")
    sae = load_sae_from_disk(spec.path)
    labels = load_labels(spec.path / LABELS_FILENAME)
    base = answers(lm, None)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    steered_so_far = 0
    for c in concepts:
        t = time.perf_counter()
        family = c["family"]
        hits = search(labels, sae, lm.model, lm.tokenizer, c["concept"], k=5)
        found = match(sae, lm.model, lm.tokenizer, c["concept"], hits)
        row = {**c, "feature": found.feature, "hit_word": found.hit_word, "carries": found.carries,
               "nearest": list(found.nearest), "base_mentions": sum(mentions(a, family) for a in base)}  # fmt: skip
        vectors = {
            "search": VectorRecipe("sae", (STRENGTH,), "resid", path=str(spec.path), features=(found.feature,)).build(
                lm, sae
            ),
            "fallback": concept_recipe(c["concept"], sae.source.point, STRENGTH).build(lm),
        }
        for key, vector in vectors.items():
            said = answers(lm, vector)
            row[f"{key}_mentions"] = sum(mentions(a, family) for a in said)
            row[f"{key}_steered"] = row[f"{key}_mentions"] > row["base_mentions"]
            row[f"{key}_example"] = said[0]
        offered = "search" if found.carries else "fallback"
        row.update({f"offered_{k}": row[f"{offered}_{k}"] for k in ("mentions", "steered")})
        row["offered"] = offered
        row["either_steered"] = row["search_steered"] or row["fallback_steered"]
        steered_so_far += row["offered_steered"]
        if args.export_every and row["offered_steered"] and steered_so_far % args.export_every == 1 % args.export_every:
            row["served_mentions"] = sum(mentions(a, family) for a in served(lm, vectors[offered], args.verify_tokens))
        rows.append(row)
        print(f"{c['concept']:>12} {c['band']:>8} #{found.feature} {found.hit_word!s:>10} carries={found.carries!s:5} "
              f"base {row['base_mentions']} search {row['search_mentions']} fallback {row['fallback_mentions']}"
              f"{' served ' + str(row['served_mentions']) if 'served_mentions' in row else ''} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
        (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    meta = {"model": lm.name, "point": sae.source.point.tl_name, "date": time.strftime("%Y-%m-%d"),
            "args": "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                            if v and k in ("export_every", "limit"))}  # fmt: skip
    finish(rows, meta, args.out)


def finish(rows: list[dict], meta: dict, out: Path) -> None:
    text = report(rows, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concept-bands.md").write_text(text)
    (out / "concept-bands-rows.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if len(rows) == len(json.loads(CONCEPTS_FILE.read_text())["concepts"]):  # a whole run, not --limit
        save_rates(rows, meta["model"])
    print(text)


if __name__ == "__main__":
    main()
