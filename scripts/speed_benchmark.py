"""The interactive loop's costs on this machine, before and after, in one run: a servability map of an SAE feature's
5 strengths, a contrastive vector's layer map, an export right after its map, and the preview's 3 rows against 1.

"Before" is another commit of this repository (`--baseline`, by default the one before the map shared its work),
checked out into a temporary worktree; every measurement runs in a fresh process of each tree in turn (before, after,
before, ...), so both see the same machine. Only public entry points present on both sides are called. A script
that prints numbers, not a test:

    .venv/bin/python -m scripts.speed_benchmark                 # ~25 min on 2 CPU cores, machine otherwise idle
    .venv/bin/python -m scripts.speed_benchmark --only preview  # one row
    .venv/bin/python -m scripts.speed_benchmark --savings --only map export_after_map

`--savings` compares this tree with itself instead: every saving of steer_core.fit.passes off ("before"), all on
("after"), and for the map each one off alone, so each one's share shows (fresh processes in turn, as above).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "deb694b"  # the last commit before #32: each map cell calibrated and measured on its own
MEASURES = ("map", "layer_map", "export_after_map", "export", "preview", "matmul")

# Runs inside the tree being measured (python -c, with that tree first on sys.path); prints one JSON line.
PROBE = r"""
import json, sys, time
import torch
torch.set_grad_enabled(False)
from steer_core.model import load_model
from steer_core.sae.feature import embedded_sae_for
from steer_core.vectors.recipe import VectorRecipe
from steer_core.check.servability import servability_map

what = sys.argv[1]
try:  # the savings a --savings run turns off (a tree from before them has none)
    from steer_core.fit import passes
    passes.SAVINGS -= set(sys.argv[2].split(",")) - {""}
except ImportError:
    pass
lm = load_model("smollm2-135m-instruct")
spec = embedded_sae_for(lm.name)
feature = VectorRecipe("sae", (spec.default_strength,), "resid", features=(spec.default_feature,))
contrastive = VectorRecipe(
    "contrastive", (4.0,), "resid", layer=10, site="resid_post",
    positive=("I love this, it is wonderful.", "What a joyful day."),
    negative=("I hate this, it is awful.", "What a gloomy day."),
)
out = {}
if what in ("map", "layer_map", "export_after_map"):
    recipe = contrastive if what == "layer_map" else feature
    t, c = time.perf_counter(), time.process_time()  # CPU seconds: less moved by other work on the machine
    m = servability_map(lm, recipe)
    out["map_s"], out["map_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    out["cells"] = len(m.cells)
    out["top1"] = [round(c.top1, 4) for c in m.cells]
    if what == "export_after_map":
        import tempfile
        from steer_core.export import export
        vector = feature.build(lm)
        t, c = time.perf_counter(), time.process_time()
        result = export(lm, vector, tempfile.mkdtemp() + "/adapter")
        out["export_s"], out["export_cpu_s"] = time.perf_counter() - t, time.process_time() - c
        out["export_top1"] = round(result.report.top1_agreement, 4)
        out["reused_tokens"] = result.meta["calibration"].get("reused_tokens", 0)
elif what == "export":  # alone, no map before it
    import tempfile
    from steer_core.export import export
    vector = feature.build(lm)
    t, c = time.perf_counter(), time.process_time()
    result = export(lm, vector, tempfile.mkdtemp() + "/adapter")
    out["export_s"], out["export_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    out["export_top1"] = round(result.report.top1_agreement, 4)
elif what == "preview":
    from steer_core.generate import GenerationConfig, stream_sides
    vector = feature.build(lm)
    other = VectorRecipe("sae", (spec.default_strength,), "resid", features=(spec.default_feature + 1,)).build(lm)
    config = GenerationConfig(48)
    lm.model.generation_config.min_new_tokens = 48  # equal lengths, so times compare
    prompt = "Describe something you like."
    def run(sides):
        t = time.perf_counter()
        for texts in stream_sides(lm, prompt, sides, config=config):
            pass
        return time.perf_counter() - t, list(texts)
    run([None])  # warm-up
    ones, threes = [], []
    for _ in range(3):
        ones.append(run([None])[0])
        seconds, texts = run([None, vector, other])
        threes.append(seconds)
    out["one_row_s"], out["three_rows_s"] = sorted(ones)[1], sorted(threes)[1]
    out["texts"] = texts
elif what == "matmul":
    # the CPU's measured throughput: a batch of 1,024 tokens through a 576 x 1536 linear layer, float32
    x, w = torch.randn(1024, 576), torch.randn(1536, 576)
    torch.nn.functional.linear(x, w)
    t, n = time.perf_counter(), 50
    for _ in range(n):
        torch.nn.functional.linear(x, w)
    out["gflops"] = 2 * 1024 * 576 * 1536 * n / (time.perf_counter() - t) / 1e9
import os
out["load"] = [round(x, 2) for x in os.getloadavg()]
print("RESULT " + json.dumps(out))
"""


SAVINGS = ("head", "prefixes", "responses")  # steer_core.fit.passes.SAVINGS


def measure(tree: Path, what: str, off: tuple[str, ...] = ()) -> dict:
    env = {"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-c", PROBE, what, ",".join(off)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{what} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=BASELINE, help="the commit to compare with (default %(default)s)")
    p.add_argument("--only", nargs="+", choices=MEASURES, default=list(MEASURES))
    p.add_argument("--out", type=Path, help="also write the rows here as JSON")
    p.add_argument("--savings", action="store_true", help="this tree with its savings off, on, and each one off")
    args = p.parse_args()
    rows = {}
    if args.savings:
        for what in args.only:
            t = time.perf_counter()
            rows[what] = {"before": measure(ROOT, what, SAVINGS)}
            print(f"  {what} before: {json.dumps(rows[what]['before'])}", flush=True)
            rows[what]["after"] = measure(ROOT, what)
            if what in ("map", "layer_map"):
                for name in SAVINGS:
                    rows[what][f"without_{name}"] = measure(ROOT, what, (name,))
                    print(f"  without {name}: {json.dumps(rows[what][f'without_{name}'])}", flush=True)
            print(f"{what} ({time.perf_counter() - t:.0f} s): {json.dumps(rows[what])}", flush=True)
        summary = _summary(rows)
        print(json.dumps(summary, indent=1))
        if args.out:
            record = {"baseline": "this tree, savings off", "rows": rows, "summary": summary}
            args.out.write_text(json.dumps(record, indent=1) + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), args.baseline], cwd=ROOT, check=True)
        try:
            for what in args.only:
                t = time.perf_counter()
                rows[what] = {"before": measure(before, what), "after": measure(ROOT, what)}
                print(f"{what} ({time.perf_counter() - t:.0f} s): {json.dumps(rows[what])}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    summary = _summary(rows)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"baseline": args.baseline, "rows": rows, "summary": summary}, indent=1) + "\n")


def _summary(rows: dict) -> dict:
    out = {}
    timed = {"map": "map_s", "layer_map": "map_s", "export_after_map": "export_s", "export": "export_s"}
    for what, key in timed.items():
        if what in rows:
            b, a = rows[what]["before"][key], rows[what]["after"][key]
            out[what] = {"before_s": round(b, 1), "after_s": round(a, 1), "speedup": round(b / a, 2)}
            cpu = key.replace("_s", "_cpu_s")
            for side, r in rows[what].items():
                if side.startswith("without_"):
                    out[what][f"{side}_s"] = round(r[key], 1)
                if cpu in r:
                    out[what][f"{side}_cpu_s"] = round(r[cpu], 1)
    if "preview" in rows:
        for side in ("before", "after"):
            r = rows["preview"][side]
            out[f"preview_{side}"] = {"three_over_one": round(r["three_rows_s"] / r["one_row_s"], 2),
                                      "one_row_s": round(r["one_row_s"], 2)}  # fmt: skip
        out["preview_texts_identical"] = rows["preview"]["before"]["texts"] == rows["preview"]["after"]["texts"]
    if "matmul" in rows:
        out["matmul_gflops"] = round(rows["matmul"]["after"]["gflops"], 1)
    return out


if __name__ == "__main__":
    sys.exit(main())
