"""What bfloat16 (the app's dtype on a GPU) does to the fidelity report: one adapter, exported in float32, verified
once with the model in float32 and once in bfloat16, on the same held-out text; and an adapter exported wholly in
bfloat16 (calibrated, built and verified with the model in bfloat16), as the app on a GPU makes it.

    .venv/bin/python -m scripts.dtype_fidelity [--feature 676 --strength 0.5]

Runs on a CPU (bfloat16 matmuls are slow there but exact to the format); a GPU gives the same roundings.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from steer_core.check.verify import verify
from steer_core.export import export
from steer_core.model import load_model
from steer_core.vectors.recipe import VectorRecipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--feature", type=int, default=676)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    lm = load_model(args.model)
    recipe = VectorRecipe("sae", (args.strength,), "resid", features=(args.feature,))
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(lm, recipe.build(lm), Path(tmp) / "a", verify_tokens=args.tokens).folder
        rows = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = lm.model.to(dtype)
            rows[f"float32 adapter, verified in {str(dtype).removeprefix('torch.')}"] = verify(
                model, lm.tokenizer, folder, tokens=args.tokens
            )
        vector = recipe.build(lm)  # the same vector, its norms measured in bfloat16
        rows["exported and verified in bfloat16"] = export(
            lm, vector, Path(tmp) / "b", verify_tokens=args.tokens
        ).report
        lm.model.to(torch.float32)
    print(f"{args.model}, feature {args.feature} at {args.strength}x the residual norm, one float32 adapter:")
    print("| adapter | top-1 agreement | KL(hook‖adapter) | KL ratio | greedy agreement | effect kept |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r.top1_agreement:.1%} | {r.kl_hook_adapter:.4g} | {r.kl_ratio:.3g} | "
              f"{r.greedy_prefix_mean:.1f}/{r.greedy_tokens} | {r.effect_kept:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
