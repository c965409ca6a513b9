"""steer_core: from an SAE feature or steering vector to a verified, servable rank-1 PEFT LoRA.

The modules, in the order the data flows (each family a folder):

- foundation: `constants`; `sites` (hook points and the module that writes each, per architecture), `hooks`,
  `activations`; `corpus` (the shipped text), `divergence`, `provenance`; `hardware`, `hub`, `model` (loading),
  `template` (chat templates and tokenizers of any repo, under limits).
- `sae/`: `feature` (loading an SAE: embedded, folder or registry), `labels`, `search` (by meaning), `concept`
  (whether search found the concept, and its own reading when the SAE has no feature for it).
- `vectors/`: `vector` (the type), `recipe` (what a user asked for, built on a model), `contrastive`,
  `controlvector`.
- `steer` (hook steering, per request), `generate` (the side-by-side preview), `schedule` (one batch for every preview).
- `fit/`: `calibrate` (one rank-1 fit per site, from `ridge`, `position0`, `selection`, `shares`, `postnorm` and
  `composite`), `refine` (end to end), `passes` (the unsteered passes a map's cells share).
- `adapter/`: `build` (the PEFT LoRA), `targets` (llama.cpp, Ollama, Fireworks files), `merged` (the model with
  the adapter merged in, for engines without LoRA), `record` (steering.json),
  `folder` (an adapter folder read back, every file once), `card`, `served` (an adapter applied per request),
  `publish`, `shared` (adapters others shared on the Hub, found by base model and words).
- `check/`: `verify` (against the hook, held out), `scales` (the engine scales it stays servable at),
  `servability` (the map before an export).
- `export` runs the chain; `cli` is the command line; `serve` starts a stock engine with many adapters; `ui/`
  (`catalog`, `form`, `mix`, `workspace`, `shared` (a shared adapter opened, verified and re-served here), `link`
  (a URL that restores the page), `explain`, `limits`, `exposure`, `gate`) is what only `app.py` uses.

The names below load on first use (PEP 562), so `python -m steer_core --help` imports no model code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "steer_core.model",
    "LoadedModel": "steer_core.model",
    "load_sae": "steer_core.sae.feature",
    "VectorRecipe": "steer_core.vectors.recipe",
    "SteeringVector": "steer_core.vectors.vector",
    "steering": "steer_core.steer",
    "calibrate": "steer_core.fit.calibrate",
    "verify": "steer_core.check.verify",
    "SteeringRecord": "steer_core.adapter.record",
    "read_record": "steer_core.adapter.record",
    "push": "steer_core.adapter.publish",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'steer_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
