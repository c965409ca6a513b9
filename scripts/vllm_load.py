"""Load adapter folders with vLLM's own LoRA loader (PEFTHelper + LoRAModel) and print what it made of each, as JSON.

Runs in vLLM's environment, not the project's (vLLM pins its own torch and transformers), so it imports nothing of
steer_core. `bash scripts/vllm_venv.sh` makes that environment; tests/adapter/test_vllm.py drives this script:

    "$(bash scripts/vllm_venv.sh)"/bin/python scripts/vllm_load.py DIR [DIR ...] [--max-lora-rank R --max-loras N]

With --max-loras, the folders are one set, as `vllm serve --max-loras N --lora-modules ...` loads them
(steer_core serve): one LoRAConfig for all, each adapter under its own id.
"""

from __future__ import annotations

import json
import sys


def load(folder: str, max_lora_rank: int = 8, max_loras: int = 1, lora_id: int = 1) -> dict:
    import torch
    import vllm.lora.lora_model as lora_model
    from safetensors.torch import load_file
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    # Pinned host memory speeds copies to a GPU and needs a CUDA driver; on a machine without one the loader's own
    # pin_memory() fails, so pinning is off. It changes where the tensors live, not what is loaded.
    lora_model.PIN_MEMORY = False

    try:
        helper = PEFTHelper.from_local_dir(folder, max_position_embeddings=None)
        helper.validate_legal(LoRAConfig(max_lora_rank=max_lora_rank, max_loras=max_loras))
        model = LoRAModel.from_local_checkpoint(
            folder, {"down_proj", "o_proj", "c_proj"}, helper, lora_model_id=lora_id, device="cpu", dtype=torch.float32
        )
    except Exception as err:  # what vLLM says when it refuses an adapter is the result
        return {"folder": folder, "loaded": False, "error": f"{type(err).__name__}: {err}"}
    saved = load_file(f"{folder}/adapter_model.safetensors")
    modules = {}
    for name, lora in model.loras.items():
        a = next(v for k, v in saved.items() if k.endswith(f"{name}.lora_A.weight"))
        b = next(v for k, v in saved.items() if k.endswith(f"{name}.lora_B.weight"))
        # vLLM keeps lora_a as PEFT's A; its scaling is either kept apart or folded into lora_b (optimize())
        scaled_b = lora.lora_b.float() * float(lora.scaling)
        modules[name] = {
            "rank": int(lora.rank),
            "a_equal": bool(torch.equal(lora.lora_a.float().reshape(a.shape), a.float())),
            "b_equal": bool(torch.allclose(scaled_b.reshape(b.shape), b.float() * helper.vllm_lora_scaling_factor)),
        }
    return {"folder": folder, "loaded": True, "rank": helper.r, "scaling": helper.vllm_lora_scaling_factor,
            "id": model.id, "modules": modules}  # fmt: skip


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--max-lora-rank", type=int, default=8)
    ap.add_argument("--max-loras", type=int, default=1)
    args = ap.parse_args(sys.argv[1:])
    print(json.dumps([load(f, args.max_lora_rank, args.max_loras, i + 1) for i, f in enumerate(args.folders)]))


if __name__ == "__main__":
    main()
