"""Names, filenames and defaults, written once."""

from __future__ import annotations

import os
from pathlib import Path

# Files of an exported adapter folder. The first two are PEFT's own names.
ADAPTER_CONFIG_FILENAME = "adapter_config.json"
ADAPTER_WEIGHTS_FILENAME = "adapter_model.safetensors"
# PEFT's older weights file: we never write it, but PEFT and the Hub's adapters still have it, so readers accept it.
ADAPTER_WEIGHTS_BIN_FILENAME = "adapter_model.bin"
STEERING_JSON_FILENAME = "steering.json"
# The hook-steering vector travels with the adapter so `verify` can rebuild the reference later.
STEERING_VECTOR_FILENAME = "steering_vector.safetensors"
MODEL_CARD_FILENAME = "README.md"
# Our card's name in a Hub repo whose README is its owner's (steer_core.adapter.publish).
CARD_BESIDE_README = "STEERING.md"
# What the llama.cpp and Ollama targets add to the folder (steer_core.adapter.targets), named as their docs name them.
GGUF_LORA_FILENAME = "adapter.gguf"
CONTROL_VECTOR_FILENAME = "control_vector.gguf"
MODELFILE_FILENAME = "Modelfile"
# The merged-weights targets (steer_core.adapter.merged): the base model with the adapter baked in, in its own layout,
# in a subfolder beside the PEFT folder's files; and that model as llama.cpp's convert_hf_to_gguf.py writes it.
MERGED_DIRNAME = "merged"
MERGED_GGUF_FILENAME = "model.gguf"
# An SAE folder in SAE Lens' format (steer_core.sae.feature): SAE Lens' own names.
SAE_CONFIG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
# Feature labels shipped next to an SAE's cfg.json (steer_core.sae.labels).
LABELS_FILENAME = "labels.json.gz"

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CALIBRATION_TOKENS = 16_384
# where an export is served (steer_core.adapter.targets)
TARGET_NAMES = ("peft", "fireworks", "llama.cpp", "ollama", "merged")
# The servability map (check.servability): a miniature export per cell, and the top-1 that counts as servable.
MAP_CALIBRATION_TOKENS = 8_192
MAP_EVAL_TOKENS = 1_024
SERVABLE_TOP1 = 0.95
ENGINE_SCALES = (0.25, 0.5, 1.0, 1.5, 2.0)  # the LoRA scales an export checks (check.scales)
DEFAULT_VERIFY_TOKENS = 4_096  # ~700 answer tokens for each of the four input formats (2,765 measured of 4,096)
DEFAULT_MAX_DOC_TOKENS = 256  # a two-turn chat's second answer starts near token 130
DEFAULT_GREEDY_PROMPTS = 8  # two per input format
DEFAULT_GREEDY_TOKENS = 20
MODES = ("portable", "exact", "ablate")
SITES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
# Which module serves a one-site vector on a pre-norm model: chosen by held-in KL, the site's own MLP writer, block
# L+1's attention writer, or the two splitting the vector (steer_core.fit.composite)
WRITERS = ("auto", "own", "next", "split")
STRENGTH_UNITS = ("abs", "resid", "writer")


def cache_dir() -> Path:
    """Where dequantized embedded models are cached (override with STEER_CORE_CACHE)."""
    root = os.environ.get("STEER_CORE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "steer_core"


# The strength of a concept's own reading (sae.concept), × the layer's median residual norm. Measured on SmolLM2:
# "volcano", "robot", "ghost" read at layer 15 were named in 9-12 of 12 answers at 0.5× and fell into repetition at 1×
CONCEPT_STRENGTH = 0.5
