"""What one server loads once and shares between all its requests: models, SAEs, feature labels, built vectors.

Requests never share steering (hooks are gated per request, see steer_core.hooks); they share only read-only
weights and these caches. Each cache has its own lock, so a slow model load does not block label look-ups of a model
that is already there. The server's files on disk (the temp folders of exports and control vectors) are pruned by
age, so a server that runs for weeks does not fill its disk.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from steer_core.catalog import SAEChoice
from steer_core.feature import LoadedSAE, check_fits, load_sae
from steer_core.generate import GLOBAL_RNG_TURN as RNG_TURN
from steer_core.labels import FeatureLabels, labels_for
from steer_core.model import LoadedModel, load_model
from steer_core.recipe import VectorRecipe
from steer_core.sites import HookPoint, num_layers
from steer_core.vector import SteeringVector

MAX_VECTORS = 64
WORK_PREFIXES = ("steer-export-", "steer-cv-")  # the app's temp folders: an export's adapter and zip; a control vector
WORK_MAX_AGE_S = 3600.0  # an hour to download, preview as served, or push an export before its folder goes


class Workspace:
    def __init__(self, loader: Callable[[str], LoadedModel] = load_model) -> None:
        self.loader = loader
        self.models: dict[str, LoadedModel] = {}
        self._saes: dict[SAEChoice, LoadedSAE] = {}
        self._labels: dict[tuple[str, SAEChoice], FeatureLabels] = {}
        self._vectors: OrderedDict[tuple[str, VectorRecipe], SteeringVector] = OrderedDict()
        self._locks = {k: threading.Lock() for k in ("model", "sae", "labels", "vector", "norm")}

    def model(self, name: str) -> LoadedModel:
        name = name.strip()
        if not name:
            raise ValueError("no model chosen: pick one from the list or type a Hub id or a local folder")
        if name in self.models:
            return self.models[name]
        with self._locks["model"]:
            if name not in self.models:
                self.models[name] = self.loader(name)
            return self.models[name]

    def sae(self, choice: SAEChoice, lm: LoadedModel | None = None) -> LoadedSAE:
        """Load (once) the SAE behind a choice; with `lm`, also check that it reads vectors this model has."""
        if choice.path and not choice.available_offline and choice.label.startswith("embedded:"):
            raise FileNotFoundError(
                f"the embedded SAE is not in this install ({choice.path} has no cfg.json); reinstall steer_core, or "
                "give an SAE folder or a registry SAE"
            )
        with self._locks["sae"]:
            if choice not in self._saes:
                with RNG_TURN:
                    self._saes[choice] = load_sae(path=choice.path, release=choice.release, sae_id=choice.sae_id)
            sae = self._saes[choice]
        if lm is not None:
            check_fits(sae.source, int(lm.model.config.get_text_config().hidden_size), num_layers(lm.model))
        return sae

    def labels(self, choice: SAEChoice, lm: LoadedModel) -> FeatureLabels:
        """The SAE's shipped labels if its folder has them, else labels computed once on this model."""
        key = (lm.name, choice)
        with self._locks["labels"]:
            if key in self._labels:
                return self._labels[key]
        labels = labels_for(self.sae(choice, lm), lm.model, lm.tokenizer)
        with self._locks["labels"]:
            return self._labels.setdefault(key, labels)

    def vector(self, lm: LoadedModel, recipe: VectorRecipe) -> SteeringVector:
        """Build once per (model, recipe): a build measures norms and the SAE's fit on this model (seconds)."""
        key = (lm.name, recipe)
        with self._locks["vector"]:
            if key in self._vectors:
                self._vectors.move_to_end(key)
                return self._vectors[key]
        # Loading an SAE initialises its weights from torch's global RNG first; a sampled preview running meanwhile
        # would then not follow its seed. Builds take the sampled previews' turn (they are rare: results are cached).
        with RNG_TURN:
            vector = recipe.build(lm)
        with self._locks["vector"]:
            self._vectors[key] = vector
            while len(self._vectors) > MAX_VECTORS:
                self._vectors.popitem(last=False)
        return vector

    def resid_norm(self, lm: LoadedModel, point: HookPoint) -> float:
        """Median residual-stream norm at `point`, to show any strength as a multiple of it."""
        from steer_core.activations import median_norm

        with self._locks["norm"]:  # one measurement at a time; median_norm remembers it per model
            return median_norm(lm.model, lm.tokenizer, point, "resid")

    def forget_model(self, name: str) -> None:
        """Drop a model and everything derived from it (used by tests that swap models under one name)."""
        with self._locks["model"]:
            lm = self.models.pop(name, None)
        names = {name, lm.name if lm else name}
        for cache in (self._labels, self._vectors):
            for key in [k for k in cache if k[0] in names]:
                cache.pop(key, None)  # type: ignore[arg-type]


def prune_work_folders(
    root: str | Path | None = None,
    *,
    prefixes: tuple[str, ...] = WORK_PREFIXES,
    max_age_s: float = WORK_MAX_AGE_S,
    now: float | None = None,
) -> list[Path]:
    """Remove the app's temp folders (`prefixes` under `root`, the system temp dir by default) last changed more than
    `max_age_s` ago; newer ones stay, as their users may still download, preview or push them. Returns those removed.

    Called as each export or control vector starts. Safe when requests run it together: a folder another request
    removed meanwhile is skipped.
    """
    root = Path(root or tempfile.gettempdir())
    now = time.time() if now is None else now
    removed = []
    for prefix in prefixes:
        for path in root.glob(f"{prefix}*"):
            try:
                old = path.is_dir() and not path.is_symlink() and now - path.stat().st_mtime > max_age_s
            except OSError:
                continue
            if old:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed
