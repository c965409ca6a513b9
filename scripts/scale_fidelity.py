"""The strength dial as users meet it: one llama-server with several exports loaded, each asked at engine scales
0.25-2, greedy, on held-out prompts no fit saw; each answer compared with PEFT at that scale (lora_B × s: what the
engine should compute) and with the hook at s × the exported strength (what the scale stands for), beside the range
the export itself recorded (check.scales).

    .venv/bin/python -m scripts.scale_fidelity [--features 676,1743,2379] [--strength 0.5] [--prompts 6] [--tokens 32]

Exports use the command line's defaults (`export --target llama.cpp`) on the embedded SmolLM2 and SAE, into
--out (kept, and reused when there). Agreement is the share of generated tokens before the first difference. A
benchmark prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import socket
import urllib.request
from pathlib import Path

import torch

from steer_core import corpus
from steer_core.adapter.record import read_record
from steer_core.check.scales import engine_scale
from steer_core.check.verify import load_peft
from steer_core.constants import DEFAULT_MODEL, ENGINE_SCALES, cache_dir
from steer_core.export import export
from steer_core.model import load_model
from steer_core.serve import lora_field, plan, start
from steer_core.steer import steering
from steer_core.vectors.recipe import VectorRecipe
from steer_core.vectors.vector import SteeringVector


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _greedy(model: torch.nn.Module, ids: list[int], tokens: int, pad: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, pad_token_id=pad)
    return out[0, len(ids) :].tolist()


def _served(port: int, ids: list[int], lora: list, tokens: int) -> list[int]:
    body = {"prompt": ids, "n_predict": tokens, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
            "return_tokens": True, "lora": lora}  # fmt: skip
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=900) as r:
        return list(json.loads(r.read())["tokens"])


def _share(a: list[list[int]], b: list[list[int]], tokens: int) -> float:
    same = 0
    for x, y in zip(a, b, strict=True):
        for p, q in zip(x, y, strict=False):
            if p != q:
                break
            same += 1
    return same / (tokens * len(a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="676,1743,2379")
    ap.add_argument("--strength", type=float, default=0.5, help="in units of the residual norm (resid)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=str(cache_dir() / "bench" / "scale_fidelity"))
    ap.add_argument("--base", default=str(cache_dir() / "llama.cpp" / "smollm2-135m-instruct-f32.gguf"))
    ap.add_argument("--binary", default=None, help="llama-server (default: scripts/llama_cpp.sh's build)")
    args = ap.parse_args()
    lm = load_model(DEFAULT_MODEL)
    features = [int(f) for f in args.features.split(",")]
    folders: list[Path] = []
    vectors: list[SteeringVector] = []
    for f in features:
        vector = VectorRecipe("sae", (args.strength,), "resid", features=(f,)).build(lm)
        folder = Path(args.out) / f"f{f}-{args.strength:g}"
        if not (folder / "steering.json").is_file():
            result = export(lm, vector, folder, target="llama.cpp")
            print(f"exported #{f}: {result.report.summary()}", flush=True)
        folders.append(folder)
        vectors.append(vector)

    pad = lm.tokenizer.pad_token_id or 0
    prompts = [corpus.encode(lm.tokenizer, text, 10**6, plain=fmt == "plain")[-256:].tolist()
               for fmt, text in corpus.prompts(lm.tokenizer, args.prompts)]  # fmt: skip
    reference: dict[tuple[int, float], tuple[list[list[int]], list[list[int]]]] = {}
    for i, folder in enumerate(folders):
        peft = load_peft(lm.model, folder)
        for s in ENGINE_SCALES:
            with engine_scale(peft, s):
                theirs = [_greedy(peft, p, args.tokens, pad) for p in prompts]
            with steering(lm.model, vectors[i].scaled(s)):
                hook = [_greedy(lm.model, p, args.tokens, pad) for p in prompts]
            reference[(i, s)] = (theirs, hook)
        del peft

    binary = args.binary
    if binary is None:
        import subprocess

        tree = subprocess.run(["bash", "scripts/llama_cpp.sh"], check=True, capture_output=True, text=True)
        binary = str(Path(tree.stdout.strip()) / "build/bin/llama-server")
    served = plan("llama.cpp", folders, base=args.base, port=_free_port(), binary=binary, extra=["-c", "1024"])
    proc = start(served.argv, f"http://127.0.0.1:{served.port}")
    try:
        got = {(i, s): [_served(served.port, p, lora_field(served, {i: s}), args.tokens) for p in prompts]
               for i in range(len(folders)) for s in ENGINE_SCALES}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"\nllama-server, {len(folders)} adapters loaded, {args.prompts} held-out prompts × {args.tokens} greedy "
          "tokens; share of tokens before the first difference:")  # fmt: skip
    print("| feature | engine scale | export's top-1 at s | llama-server = PEFT at s | llama-server = hook at s× "
          "| PEFT = hook at s× |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for i, folder in enumerate(folders):
        scales = read_record(folder).scales or {}
        by = scales.get("by_scale", {})
        for s in ENGINE_SCALES:
            theirs, hook = reference[(i, s)]
            top1 = by.get(f"{s:g}", {}).get("top1_agreement", float("nan"))
            shares = [_share(got[(i, s)], theirs, args.tokens), _share(got[(i, s)], hook, args.tokens),
                      _share(theirs, hook, args.tokens)]  # fmt: skip
            print(f"| #{features[i]} | {s:g} | {top1:.1%} | " + " | ".join(f"{x:.1%}" for x in shares) + " |")
    for i, folder in enumerate(folders):
        recorded = (read_record(folder).scales or {}).get("servable")
        print(f"#{features[i]}: recorded servable engine scales {recorded}")


if __name__ == "__main__":
    main()
