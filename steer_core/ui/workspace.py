"""What one server loads once and shares between all its requests: models, SAEs, feature labels, built vectors.

Requests never share steering (hooks are gated per request, see steer_core.hooks); they share only read-only
weights and these caches. What a server may hold is bounded by its hardware (steer_core.hardware.Budget): a model or
SAE is sized from the Hub's metadata before it downloads and refused when it cannot fit, and each cache drops its
least recently used entries to make room for a new one. Loads take a lock of their own per model or SAE, so one
visitor's slow download never holds up another visitor's preview of what is already loaded.

Who may read what is `steer_core.hub.Access`: a model read with a visitor's own token (a private repo of theirs) is
kept for that visitor only. The server's files on disk (the temp folders of exports and control vectors) are pruned
by age, so a server that runs for weeks does not fill its disk.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any, Generic, TypeVar

from torch import Tensor

from steer_core.constants import LABELS_FILENAME, SAE_CONFIG_FILENAME
from steer_core.generate import GLOBAL_RNG_TURN as RNG_TURN
from steer_core.hardware import Budget, current_budget, format_bytes
from steer_core.hub import Access, forget_download
from steer_core.model import EMBEDDED_MODELS, LoadedModel, is_local, load_model
from steer_core.sae.feature import LoadedSAE, check_fits, is_embedded_sae, load_sae
from steer_core.sae.labels import FeatureLabels, labels_for
from steer_core.sites import HookPoint, num_layers
from steer_core.ui.catalog import (
    SAEChoice,
    curated_parameters,
    curated_repos,
    embedded_choice,
    is_curated_release,
    is_curated_repo,
)
from steer_core.vectors.recipe import VectorRecipe
from steer_core.vectors.vector import SteeringVector

log = logging.getLogger(__name__)

MAX_VECTORS = 64  # built vectors are a few kB each: a count bounds them
WORK_PREFIXES = ("steer-export-", "steer-cv-")  # the app's temp folders: an export's adapter and zip; a control vector
WORK_MAX_AGE_S = 3600.0  # an hour to download, preview as served, or push an export before its folder goes

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BudgetCache(OrderedDict, Generic[K, V]):
    """An OrderedDict whose values' total size (`sizer`, in bytes) stays within `budget`: putting one in drops the
    least recently used others first; `pinned` keys are never dropped. Reading with `get` marks an entry as used."""

    def __init__(self, budget: int, sizer: Callable[[Any], int], pinned: tuple[Hashable, ...] = ()) -> None:
        super().__init__()
        self.budget, self.sizer, self.pinned = budget, sizer, set(pinned)
        self.sizes: dict[Hashable, int] = {}

    def __setitem__(self, key: K, value: V) -> None:
        self.make_room(size := self.sizer(value), keep=key)
        super().__setitem__(key, value)
        self.sizes[key] = size

    def __delitem__(self, key: K) -> None:
        super().__delitem__(key)
        self.sizes.pop(key, None)

    def pop(self, key: K, *default: Any) -> Any:  # OrderedDict.pop does not call __delitem__
        self.sizes.pop(key, None)
        return super().pop(key, *default)

    def get(self, key: K, default: Any = None) -> Any:
        if key not in self:
            return default
        self.move_to_end(key)
        return super().__getitem__(key)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def make_room(self, size: int, keep: Hashable = None) -> list[Hashable]:
        """Drop least recently used entries until `size` more bytes fit (as far as unpinned entries allow)."""
        dropped = []
        for key in list(self):
            if self.total + size <= self.budget:
                break
            if key != keep and key not in self.pinned:
                super().pop(key)
                self.sizes.pop(key, None)
                dropped.append(key)
        if dropped:
            log.info("dropped %s to make room for %s", dropped, format_bytes(size))
        return dropped


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(lm: LoadedModel) -> int:
    return tensor_bytes(chain(lm.model.parameters(), lm.model.buffers()))


def sae_bytes(sae: LoadedSAE) -> int:
    return tensor_bytes(sae.sae.state_dict().values())


def labels_bytes(labels: FeatureLabels) -> int:
    """An estimate: Python strings and tuples take about twice their characters, plus each label's objects."""
    text = sum(len(c.render()) + sum(map(len, lab.promoted)) for lab in labels.labels.values() for c in lab.contexts)
    return 2 * text + 400 * len(labels.labels)


class Workspace:
    def __init__(
        self,
        loader: Callable[..., LoadedModel] = load_model,
        *,
        budget: Budget | None = None,
        pinned: tuple[str, ...] = (),
        sae_loader: Callable[..., LoadedSAE] = load_sae,
        disk_budget: int | None = None,
    ) -> None:
        self.loader, self.sae_loader = loader, sae_loader
        self.disk_budget = disk_budget  # bytes of the shared Hub cache (a Space's disk); None: leave the cache alone
        self.budget = budget or current_budget(gpu=False)
        # Shared entries are keyed by name; a visitor's private model by (name, reader): see `model`.
        self.models: BudgetCache[Any, LoadedModel] = BudgetCache(self.budget.models, model_bytes, pinned)
        self._saes: BudgetCache[tuple, LoadedSAE] = BudgetCache(self.budget.saes, sae_bytes)
        self._labels: BudgetCache[tuple, FeatureLabels] = BudgetCache(self.budget.labels, labels_bytes)
        self._vectors: OrderedDict[tuple[str, VectorRecipe], SteeringVector] = OrderedDict()
        self._guard = threading.Lock()  # held only to look up or insert, never while loading
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self._norm_lock = threading.Lock()

    @contextmanager
    def _loading(self, key: Hashable) -> Iterator[None]:
        """One load per key at a time; loads of other keys (and look-ups) go on meanwhile."""
        with self._guard:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def _lookup(self, cache: BudgetCache, *keys: Hashable) -> Any:
        with self._guard:
            for key in keys:
                if (value := cache.get(key)) is not None:
                    return value
        return None

    def _store(self, cache: BudgetCache, key: Hashable, value: Any) -> Any:
        with self._guard:
            cache[key] = value
            return value

    # ---- models ----

    def model(self, name: str, access: Access | None = None, *, load: bool = True) -> LoadedModel:
        """The loaded model `name`, loading it (once) when `load`; else a LookupError says to load it first."""
        name, access = name.strip(), access or Access()
        if not name:
            raise ValueError("no model chosen: pick one from the list or type a Hub id or a local folder")
        private_key = (name, access.reader)
        if (lm := self._lookup(self.models, name, private_key)) is not None:
            return lm
        if not load:
            raise LookupError(f"model {name!r} is not loaded yet: load it first (step 1, 'Load model')")
        with self._loading(("model", name)):  # by name: two visitors asking for one public model load it once
            if (lm := self._lookup(self.models, name, private_key)) is not None:
                return lm
            shared, token, need = self._check_model(name, access)
            with self._guard:
                room = self.budget.models - sum(self.models.sizes.get(k, 0) for k in self.models.pinned)
                if need > room:
                    raise ValueError(
                        f"{name} takes {format_bytes(need)}, more than the {format_bytes(room)} this server has for "
                        "models besides its default one; pick a smaller model"
                    )
                self.models.make_room(need)
            own = access.cache_dir if access.visitor and token == access.visitor else None
            try:
                lm = self.loader(name, token=token, **({"cache_dir": own} if own else {}))
            finally:
                forget_download(name, own)  # their private files never stay where another visitor could be served
            if (size := model_bytes(lm)) > self.budget.models:  # a source that could not be sized beforehand
                raise ValueError(
                    f"{name} takes {format_bytes(size)} loaded, more than the {format_bytes(self.budget.models)} "
                    "this server holds models in; pick a smaller model"
                )
            stored = self._store(self.models, name if shared else private_key, lm)
        self._trim_disk()
        return stored

    def _check_model(self, name: str, access: Access) -> tuple[bool, str | bool | None, int]:
        """Before anything downloads: whether the model may be shared with every visitor, the token that reads it,
        and the bytes it will take (a ValueError or LookupError says why it cannot load)."""
        from steer_core.hub import local_parameters

        if name in EMBEDDED_MODELS:
            spec = EMBEDDED_MODELS[name]
            token = access.read_token(spec.hub_id, curated=True)  # without its package it comes from the Hub
            return True, token, self.budget.check_model(name, curated_parameters(name) or 0)
        if is_local(name):
            if not access.local_paths:
                raise ValueError(
                    f"{name!r} is a path on this server, which a public Space does not read for its visitors: give a "
                    "Hub model id, or pick one of the listed models"
                )
            parameters = local_parameters(name)
            return True, None, self.budget.check_model(name, parameters) if parameters else 0
        curated = is_curated_repo(name)
        token = access.read_token(name, curated=curated)
        size = _hub_size(name, token, access)
        if size is None:  # offline: nothing downloads; a curated model's known size, or the loaded size, is checked
            known = curated_parameters(name)
            return True, token, self.budget.check_model(name, known) if known else 0
        shared = curated or not (size.private or size.gated)
        return shared, token, self.budget.check_model(name, size.parameters)

    # ---- SAEs and their labels ----

    def sae(
        self, choice: SAEChoice, lm: LoadedModel | None = None, access: Access | None = None, *, load: bool = True
    ) -> LoadedSAE:
        """Load (once) the SAE behind a choice; with `lm`, also check that it reads vectors this model has.

        `load=False` (the preview lane) still loads local folders, which take a second, but not registry SAEs, which
        download: those load in the load lane first (a LookupError says so)."""
        access = access or Access()
        if choice.path and not choice.available_offline and choice.label.startswith("embedded:"):
            raise FileNotFoundError(
                f"the embedded SAE is not in this install ({choice.path} has no {SAE_CONFIG_FILENAME}); reinstall "
                "steer_core, or give an SAE folder or a registry SAE"
            )
        key = _sae_key(choice)
        sae = self._lookup(self._saes, key)
        if sae is None:
            if choice.release and not load:
                raise LookupError(
                    f"SAE {choice.release} / {choice.sae_id} is not loaded yet: pick it in step 2 (it downloads there)"
                )
            with self._loading(("sae", key)):
                sae = self._lookup(self._saes, key) or self._load_sae(choice, access)
        if lm is not None:
            check_fits(sae.source, int(lm.model.config.get_text_config().hidden_size), num_layers(lm.model))
        return sae

    def _load_sae(self, choice: SAEChoice, access: Access) -> LoadedSAE:
        from steer_core.hub import local_parameters

        if choice.release and choice.sae_id:
            name = f"{choice.release} / {choice.sae_id}"
            elements = _sae_hub_size(choice.release, choice.sae_id, access)
        else:
            assert choice.path
            if not access.local_paths and not is_embedded_sae(choice.path):
                raise ValueError(
                    f"{choice.path!r} is a folder on this server, which a public Space does not read for its visitors: "
                    "pick a registry SAE or the embedded one"
                )
            name, elements = choice.path, local_parameters(choice.path)
        need = self.budget.check_sae(name, elements) if elements else 0
        with self._guard:
            self._saes.make_room(need)
        if choice.release and choice.sae_id and elements is not None:  # online: download first, holding nothing
            _download_sae(choice.release, choice.sae_id, access)
        # Loading an SAE initialises its weights from torch's global RNG first; a sampled preview running meanwhile
        # would then not follow its seed. Loads take the sampled previews' turn (the download is done by now).
        with RNG_TURN:
            sae = self.sae_loader(path=choice.path, release=choice.release, sae_id=choice.sae_id)
        stored = self._store(self._saes, _sae_key(choice), sae)
        self._trim_disk()
        return stored

    def _trim_disk(self) -> None:
        """With a disk budget (a Space's), drop the least recently used downloads that nothing loaded holds."""
        if self.disk_budget is None:
            return
        from steer_core.hub import trim_cache
        from steer_core.sae.feature import registry_entry

        with self._guard:
            held = {k if isinstance(k, str) else k[0] for k in self.models}
            held |= {registry_entry(r).repo_id for _p, r, _i in self._saes if r}
        trim_cache(self.disk_budget, held | curated_repos())

    def labels(
        self, choice: SAEChoice, lm: LoadedModel, access: Access | None = None, *, compute: bool = True
    ) -> FeatureLabels:
        """The SAE's shipped labels if its folder has them, else labels computed once on this model (a minute for a
        registry SAE: with `compute=False` a LookupError says they are not ready instead)."""
        key = (lm.name, _sae_key(choice))
        if (labels := self._lookup(self._labels, key)) is not None:
            return labels
        sae = self.sae(choice, lm, access, load=compute)
        shipped = sae.source.path and (Path(sae.source.path) / LABELS_FILENAME).is_file()
        if not compute and not shipped and choice.release:
            raise LookupError(f"the labels of {choice.label} are not computed yet: pick the SAE in step 2 first")
        with self._loading(("labels", key)):
            if (labels := self._lookup(self._labels, key)) is not None:
                return labels
            return self._store(self._labels, key, labels_for(sae, lm.model, lm.tokenizer))

    # ---- vectors and norms ----

    def vector(
        self, lm: LoadedModel, recipe: VectorRecipe, access: Access | None = None, *, load: bool = True
    ) -> SteeringVector:
        """Build once per (model, recipe): a build measures norms and the SAE's fit on this model (seconds)."""
        key = (lm.name, recipe)
        with self._guard:
            if key in self._vectors:
                self._vectors.move_to_end(key)
                return self._vectors[key]
        sae = None
        if recipe.source == "sae":
            choice = recipe_choice(recipe, lm)
            sae = self.sae(choice, lm, access, load=load) if choice is not None else None
        # A build draws nothing from the global RNG, unless it has to load an SAE itself (see _load_sae).
        with RNG_TURN if recipe.source == "sae" and sae is None else contextlib.nullcontext():
            vector = recipe.build(lm, sae=sae)
        with self._guard:
            self._vectors[key] = vector
            while len(self._vectors) > MAX_VECTORS:
                self._vectors.popitem(last=False)
        return vector

    def resid_norm(self, lm: LoadedModel, point: HookPoint) -> float:
        """Median residual-stream norm at `point`, to show any strength as a multiple of it."""
        from steer_core.activations import median_norm

        with self._norm_lock:  # one measurement at a time; median_norm remembers it per model
            return median_norm(lm.model, lm.tokenizer, point, "resid")

    def forget_model(self, name: str) -> None:
        """Drop a model and everything derived from it (used by tests that swap models under one name)."""
        with self._guard:
            lm = self.models.pop(name, None)
            for key in [k for k in self.models if isinstance(k, tuple) and k[0] == name]:
                self.models.pop(key, None)
            names = {name, lm.name if lm else name}
            for cache in (self._labels, self._vectors):
                for key in [k for k in cache if k[0] in names]:
                    cache.pop(key, None)


def _sae_key(choice: SAEChoice) -> tuple:
    return (choice.path, choice.release, choice.sae_id)


def recipe_choice(recipe: VectorRecipe, lm: LoadedModel) -> SAEChoice | None:
    """The SAE a recipe of source "sae" reads: a folder, a registry entry, or the model's embedded SAE."""
    if recipe.path:
        return SAEChoice(f"folder: {recipe.path}", path=recipe.path)
    if recipe.sae_release and recipe.sae_id:
        return SAEChoice(f"{recipe.sae_release} / {recipe.sae_id}", release=recipe.sae_release, sae_id=recipe.sae_id)
    return embedded_choice(lm.name)


def _hub_error(name: str, err: Exception, access: Access) -> Exception:
    """huggingface_hub's errors, said for a visitor: which repo, and what would let them read it."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError):
        who = "the Space owner's HF_TOKEN" if access.space and is_curated_repo(name) else "a token of an account that"
        return LookupError(f"{name} is gated on the Hub: it loads with {who} has accepted its licence")
    if isinstance(err, RepositoryNotFoundError):
        hint = (
            "; sign in with Hugging Face to load a private repo of yours" if access.space and not access.visitor else ""
        )
        return LookupError(f"{name} is not a model on the Hub that this server may read (missing or private){hint}")
    return LookupError(f"could not read {name} from the Hub ({type(err).__name__}: {str(err)[:120]}); try again later")


@contextmanager
def _hub_errors(name: str, access: Access) -> Iterator[None]:
    """Hub and network errors said for a visitor (_hub_error); LookupErrors of our own, and offline mode (which
    callers treat as "nothing will download"), pass as they are."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        yield
    except (LookupError, OfflineModeIsEnabled):
        raise
    except Exception as err:  # network and Hub errors: refuse with a message, never load blind
        raise _hub_error(name, err, access) from err


def _hub_size(name: str, token: str | bool | None, access: Access) -> Any:
    """The model's size from the Hub; None offline, where nothing downloads."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    from steer_core.hub import model_size

    try:
        with _hub_errors(name, access):
            return model_size(name, token=token)
    except OfflineModeIsEnabled:
        return None


def _sae_repo(release: str, access: Access) -> tuple[str, str | bool | None]:
    """A registry SAE's repo and the token to read it with: shared by every visitor after, so never a visitor's own
    (Access.shared_read_token)."""
    from steer_core.sae.feature import registry_entry

    repo = registry_entry(release).repo_id
    return repo, access.shared_read_token(repo, curated=is_curated_release(release))


def _sae_hub_size(release: str, sae_id: str, access: Access) -> int | None:
    """The SAE's weights from the Hub; None offline, where nothing downloads."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    from steer_core.hub import sae_size

    repo, token = _sae_repo(release, access)
    try:
        with _hub_errors(repo, access):
            return sae_size(release, sae_id, token=token).parameters
    except OfflineModeIsEnabled:
        return None


def _download_sae(release: str, sae_id: str, access: Access) -> None:
    from steer_core.hub import download_sae

    repo, token = _sae_repo(release, access)
    with _hub_errors(repo, access):
        download_sae(release, sae_id, token=token)


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


def is_work_folder(path: str | Path, root: str | Path | None = None) -> bool:
    """Whether `path` lies inside one of the app's own temp folders (an export a visitor made here)."""
    root = Path(root or tempfile.gettempdir()).resolve()
    try:
        rel = Path(path).resolve().relative_to(root)
    except ValueError:
        return False
    return bool(rel.parts) and rel.parts[0].startswith(WORK_PREFIXES)
