"""Write examples/joy_smollm2_L10.safetensors: a contrastive (mean-difference) "joy" vector for the default model.

Run from the repo root: .venv/bin/python -m scripts.make_example_vector   (deterministic; about 10 s)
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from steer_core.model import load_model
from steer_core.sites import HookPoint
from steer_core.vectors.contrastive import contrastive_vector, read_pairs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
OUT = EXAMPLES / "joy_smollm2_L10.safetensors"


def main() -> None:
    lm = load_model("smollm2-135m-instruct")
    positive, negative = read_pairs(EXAMPLES / "joy_pairs.json")
    vector = contrastive_vector(lm, positive, negative, HookPoint(10, "resid_post"))
    v = vector.directions[HookPoint(10, "resid_post")]
    save_file({"joy": v.contiguous()}, str(OUT), metadata={"layer": "10", "site": "resid_post", "model": lm.name})
    print(f"wrote {OUT} (norm {float(v.norm()):.2f})")


if __name__ == "__main__":
    main()
