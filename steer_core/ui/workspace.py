"""What one server loads once and shares between all its requests: models, SAEs, feature labels, built vectors.

Requests never share steering (hooks are gated per request, see steer_core.hooks); they share only read-only
weights and these caches. What a server may hold is bounded by its hardware (steer_core.hardware.Budget): a model or
SAE is admitted on what it will cost before it downloads (steer_core.hub.admit_model: its config built on the meta
device, every file it reads sized from the repo's listing, the commit pinned and loaded) and refused when it cannot
fit; loads in flight reserve what they were admitted for, so loads that run together cannot overfill the budget; and
each cache drops its least recently used entries to make room for a new one. Loads take a lock of their own per model
or SAE, held only while a load of it runs, so one visitor's slow download never holds up another visitor's preview
of what is already loaded.

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
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Generic, TypeVar

from torch import Tensor

from steer_core.adapter.served import ServedAdapter
from steer_core.constants import DEFAULT_MAX_DOC_TOKENS, LABELS_FILENAME, SAE_CONFIG_FILENAME
from steer_core.generate import GLOBAL_RNG_TURN as RNG_TURN
from steer_core.hardware import Budget, current_budget, format_bytes
from steer_core.hub import HUB_LIMITS, Access, HubLimits, check_repo_id, forget_download, forget_partial
from steer_core.model import EMBEDDED_MODELS, LoadedModel, is_local, load_model
from steer_core.sae.feature import LoadedSAE, check_fits, is_embedded_sae, load_sae
from steer_core.sae.labels import FeatureLabels, labels_for
from steer_core.sites import HookPoint, num_layers
from steer_core.template import check_tokenizer
from steer_core.ui.catalog import (
    SAEChoice,
    curated_parameters,
    curated_repos,
    embedded_choice,
    is_curated_release,
    is_curated_repo,
)
from steer_core.ui.limits import SERVER_LIMITS, Limits
from steer_core.vectors.recipe import VectorRecipe
from steer_core.vectors.vector import SteeringVector

log = logging.getLogger(__name__)

MAX_VECTORS = 64  # built vectors are a few kB each: a count bounds them
WORK_PREFIXES = ("steer-export-", "steer-cv-")  # the app's temp folders: an export's adapter and zip; a control vector
WORK_MAX_AGE_S = 3600.0  # an hour to download, preview as served, or push an export before its folder goes
WORK_QUOTA = 2 * 10**9  # bytes of those folders, all visitors together (an export's zip and GGUFs are kB to MB)
MAX_PATH_CHARS = 4096  # a local folder's name (PATH_MAX): longer names are refused before the disk is asked
# An export's peak working memory for a model's vocabulary, in vocabulary-wide float32 tensors of one verify batch
# (steer_core/check/verify.py: heldout_batches sizes its batches so that one such tensor stays near 1.5e8 floats;
# _three_passes holds the base, hook and adapter logits and their log-softmaxes, and _Totals.add and _Effect.add make
# three or four temporaries of the same size). Ten of them is 5.4 GB for Gemma 3's 262k vocabulary (537 MB each),
# what docs/space.md measured (4-6 GB above what was loaded).
EXPORT_VOCAB_TENSORS = 10
VERIFY_BATCH_FLOATS = 1.5e8  # verify.heldout_batches' bound on a batch's vocabulary-wide logits

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


def export_peak_bytes(vocab: int) -> int:
    """An export's working memory for a vocabulary of `vocab` tokens (EXPORT_VOCAB_TENSORS): verify's batches hold
    at most 8 documents of DEFAULT_MAX_DOC_TOKENS, fewer for a larger vocabulary (its heldout_batches' rule), and at
    least one, so past 586k tokens a tensor grows with the vocabulary."""
    if vocab <= 0:
        return 0
    batch = max(1, min(8, int(VERIFY_BATCH_FLOATS // (vocab * DEFAULT_MAX_DOC_TOKENS))))
    return EXPORT_VOCAB_TENSORS * 4 * batch * DEFAULT_MAX_DOC_TOKENS * vocab


def model_vocab(lm: LoadedModel) -> int:
    return int(getattr(lm.model.config.get_text_config(), "vocab_size", 0) or 0)


def sae_bytes(sae: LoadedSAE) -> int:
    return tensor_bytes(sae.sae.state_dict().values())


def labels_bytes(labels: FeatureLabels) -> int:
    """An estimate: Python strings and tuples take about twice their characters, plus each label's objects."""
    text = sum(len(c.render()) + sum(map(len, lab.promoted)) for lab in labels.labels.values() for c in lab.contexts)
    return 2 * text + 400 * len(labels.labels)


class _KeyLock:
    """A load's lock and how many requests hold or wait for it: the entry goes when the last one leaves."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0


@dataclass(frozen=True)
class _Admitted:
    """What _check_model found: whether every visitor may share the model, the token that reads it, the bytes it will
    take (its weights, and what an export's peak on its vocabulary needs beyond the requests' memory), and the commit
    to load (None: not a Hub model, or offline)."""

    shared: bool
    token: str | bool | None
    need: int
    revision: str | None = None


class Workspace:
    def __init__(
        self,
        loader: Callable[..., LoadedModel] = load_model,
        *,
        budget: Budget | None = None,
        pinned: tuple[str, ...] = (),
        sae_loader: Callable[..., LoadedSAE] = load_sae,
        disk_budget: int | None = None,
        hub_limits: HubLimits = HUB_LIMITS,
    ) -> None:
        self.loader, self.sae_loader = loader, sae_loader
        self.disk_budget = disk_budget  # bytes of the shared Hub cache (a Space's disk); None: leave the cache alone
        self.budget = budget or current_budget(gpu=False)
        self.hub_limits = hub_limits
        # Shared entries are keyed by name; a visitor's private model by (name, reader): see `model`. A model's size
        # is its weights and what an export's peak on its vocabulary needs beyond the requests' memory.
        self.models: BudgetCache[Any, LoadedModel] = BudgetCache(self.budget.models, self.model_cost, pinned)
        self._saes: BudgetCache[tuple, LoadedSAE] = BudgetCache(self.budget.saes, sae_bytes)
        self._labels: BudgetCache[tuple, FeatureLabels] = BudgetCache(self.budget.labels, labels_bytes)
        self._vectors: OrderedDict[tuple[str, VectorRecipe], SteeringVector] = OrderedDict()
        self._guard = threading.Lock()  # held only to look up or insert, never while loading
        self._key_locks: dict[Hashable, _KeyLock] = {}  # loads in flight only
        self._reserved: dict[object, int] = {}  # bytes admitted for each model load in flight
        self._norm_lock = threading.Lock()

    @property
    def requests_memory(self) -> int:
        """What the budget leaves the requests themselves: memory past models, SAEs and labels."""
        return self.budget.memory - self.budget.models - self.budget.saes - self.budget.labels

    def export_reserve(self, vocab: int) -> int:
        """What an export on a model of this vocabulary needs beyond the requests' memory (0 for every curated model):
        a vocabulary of millions of tokens would need tens of GB. Counted with the model's size, so a server that
        loaded it can still run its export (exports run one at a time)."""
        return max(0, export_peak_bytes(vocab) - self.requests_memory)

    def model_cost(self, lm: LoadedModel) -> int:
        return model_bytes(lm) + self.export_reserve(model_vocab(lm))

    @property
    def reserved(self) -> int:
        """Bytes admitted for the model loads in flight."""
        with self._guard:
            return sum(self._reserved.values())

    @contextmanager
    def _loading(self, key: Hashable) -> Iterator[None]:
        """One load per key at a time; loads of other keys (and look-ups) go on meanwhile. The key's entry lasts
        while a load of it runs or waits, no longer: names a visitor sends do not pile up."""
        with self._guard:
            entry = self._key_locks.get(key) or self._key_locks.setdefault(key, _KeyLock())
            entry.holders += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._guard:
                entry.holders -= 1
                if entry.holders == 0:
                    del self._key_locks[key]

    @contextmanager
    def _reserving(self, name: str, need: int) -> Iterator[None]:
        """Hold `need` bytes of the models' budget while `name` loads: room is made now (dropping least recently used
        models), and every other load's check counts it, so loads in flight together never exceed the budget."""
        ticket = object()
        with self._guard:
            pinned = sum(self.models.sizes.get(k, 0) for k in self.models.pinned)
            others = sum(self._reserved.values())
            room = self.budget.models - pinned - others
            if need > room:
                busy = f" ({format_bytes(others)} of it held by loads in flight: try again once they finish)"
                raise ValueError(
                    f"{name} takes {format_bytes(need)}, more than the {format_bytes(room)} this server has for "
                    f"models besides its default one{busy if others else ''}; pick a smaller model"
                )
            self.models.make_room(need + others)
            self._reserved[ticket] = need
        try:
            yield
        finally:
            with self._guard:
                del self._reserved[ticket]

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
        check_model_name(name, access)  # before any lock, cache entry or request is made for it
        private_key = (name, access.reader)
        if (lm := self._lookup(self.models, name, private_key)) is not None:
            return lm
        if not load:
            raise LookupError(f"model {name!r} is not loaded yet: load it first (step 1, 'Load model')")
        with self._loading(("model", name)):  # by name: two visitors asking for one public model load it once
            if (lm := self._lookup(self.models, name, private_key)) is not None:
                return lm
            admitted = self._check_model(name, access)
            own = access.cache_dir if access.visitor and admitted.token == access.visitor else None
            hub = {"cache_dir": own} if own else {}
            hub |= {"revision": admitted.revision} if admitted.revision else {}
            with self._reserving(name, admitted.need):
                try:
                    lm = self.loader(name, token=admitted.token, **hub)
                    if access.space and name not in EMBEDDED_MODELS and not is_curated_repo(name):
                        check_tokenizer(lm.tokenizer)  # its regexes run on every visitor's prompt
                except BaseException:
                    forget_partial(name)  # what a failed download left behind, which nothing will finish
                    self._trim_disk()
                    raise
                finally:
                    forget_download(name, own)  # their private files never stay where another visitor could be served
                if (size := self.model_cost(lm)) > self.budget.models:  # a source that could not be sized beforehand
                    raise ValueError(
                        f"{name} takes {format_bytes(size)} loaded, more than the {format_bytes(self.budget.models)} "
                        "this server holds models in; pick a smaller model"
                    )
                with self._guard:  # room for it beside the other loads in flight, which still hold their share
                    self.models.make_room(size + sum(v for k, v in self._reserved.items()) - admitted.need)
                    self.models[name if admitted.shared else private_key] = lm
                    stored = lm
        self._trim_disk()
        return stored

    def _check_model(self, name: str, access: Access) -> _Admitted:
        """Before anything downloads: whether the model may be shared with every visitor, the token that reads it,
        the bytes it will take and the commit to load (a ValueError or LookupError says why it cannot load)."""
        from steer_core.hub import local_parameters

        if name in EMBEDDED_MODELS:
            spec = EMBEDDED_MODELS[name]
            token = access.read_token(spec.hub_id, curated=True)  # without its package it comes from the Hub
            return _Admitted(True, token, self.budget.check_model(name, curated_parameters(name) or 0))
        if is_local(name):
            if not access.local_paths:
                raise ValueError(_server_path(name))
            parameters = local_parameters(name)
            return _Admitted(True, None, self.budget.check_model(name, parameters) if parameters else 0)
        curated = is_curated_repo(name)
        token = access.read_token(name, curated=curated)
        admission = _hub_admission(name, token, access, self.hub_limits, lambda n: self.budget.check_model(name, n))
        if (
            admission is None
        ):  # offline: nothing downloads; a curated model's known size, or the loaded size, is checked
            known = curated_parameters(name)
            return _Admitted(True, token, self.budget.check_model(name, known) if known else 0)
        shared = curated or not (admission.private or admission.gated)
        need = self.budget.check_model(name, admission.parameters)
        if (extra := self.export_reserve(admission.vocab)) and need + extra > self.budget.models:
            raise ValueError(
                f"{name}'s vocabulary of {admission.vocab:,} tokens makes an export's working memory about "
                f"{format_bytes(export_peak_bytes(admission.vocab))}: with its {format_bytes(need)} of weights that is "
                f"more than this server holds ({format_bytes(self.budget.models)} for models, "
                f"{format_bytes(self.requests_memory)} for requests); pick a model with a smaller vocabulary"
            )
        return _Admitted(shared, token, need + extra, admission.revision)

    def served_adapter(self, source: str, access: Access, limits: Limits = SERVER_LIMITS) -> ServedAdapter:
        """An adapter to serve beside the hook: a Hub repo (read as the visitor, never with the Space owner's token:
        its listing first, each file within its cap, the weights within limits.adapter_bytes on a Space, at one
        pinned commit), or on a Space only a folder this app exported; locally any folder."""
        from steer_core.adapter.served import read_adapter, read_hub_adapter

        source = source.strip()
        if not source:
            raise ValueError("no adapter given: type a Hub adapter repo (namespace/name) or an exported folder")
        if len(source) > MAX_PATH_CHARS:
            raise ValueError(f"the adapter's name has {len(source)} characters: give a Hub repo id or a folder")
        if is_local(source):
            if not access.local_paths and not is_work_folder(source):
                raise ValueError(
                    f"{source!r} is a path on this server; give a Hub repo, or export an adapter here first"
                )
            return read_adapter(source)
        if access.local_paths and source.startswith(("/", ".", "~")):
            raise FileNotFoundError(f"adapter folder {source!r} does not exist")
        check_repo_id(source, "a Hub adapter repo")
        token = access.read_token(source, curated=False)
        own = access.cache_dir if access.visitor and token == access.visitor else None
        weights = limits.adapter_bytes if access.space else None
        try:
            with hub_errors(source, access, "an adapter"):
                return read_hub_adapter(
                    source, token=token, cache_dir=own, weights_bytes=weights, limits=self.hub_limits
                )
        finally:
            forget_download(source, own)

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
                sae = self._lookup(self._saes, key) or self._load_sae(choice, access, lm)
        if lm is not None:
            check_fits(sae.source, int(lm.model.config.get_text_config().hidden_size), num_layers(lm.model))
        return sae

    def _load_sae(self, choice: SAEChoice, access: Access, lm: LoadedModel | None = None) -> LoadedSAE:
        from steer_core.hub import local_parameters

        revision = None
        if choice.release and choice.sae_id:
            name = f"{choice.release} / {choice.sae_id}"
            fits = (int(lm.model.config.get_text_config().hidden_size), num_layers(lm.model)) if lm else (None, None)
            admission = _sae_admission(choice.release, choice.sae_id, access, self.hub_limits, *fits)
            elements = admission.elements if admission else None
            revision = admission.revision if admission else None
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
            _download_sae(choice.release, choice.sae_id, access, revision)
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


def check_model_name(name: str, access: Access) -> None:
    """A model name is an embedded model, a Hub id, or (where this server reads its own disk) a local path; anything
    else is refused before any lock, cache entry or request is made for it."""
    if name in EMBEDDED_MODELS:
        return
    if len(name) > MAX_PATH_CHARS:
        raise ValueError(f"the model's name has {len(name)} characters: give a Hub model id (namespace/name)")
    if not access.local_paths and (name.startswith(("/", ".", "~", "\\")) or name.count("/") > 1):
        raise ValueError(_server_path(name))
    if access.local_paths and is_local(name):
        return
    if access.local_paths and name.startswith(("/", ".", "~")):
        raise LookupError(f"model folder {name!r} does not exist: give an existing folder, a .gguf file or a Hub id")
    check_repo_id(name)


def _server_path(name: str) -> str:
    shown = name if len(name) <= 80 else name[:80] + "..."
    return (
        f"{shown!r} is a path on this server, which a public Space does not read for its visitors: give a Hub model "
        "id, or pick one of the listed models"
    )


def _hub_error(name: str, err: Exception, access: Access, what: str = "a model") -> Exception:
    """huggingface_hub's errors, said for a visitor: which repo, and what would let them read it."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError):
        who = "the Space owner's HF_TOKEN" if access.space and is_curated_repo(name) else "a token of an account that"
        return LookupError(f"{name} is gated on the Hub: it loads with {who} has accepted its licence")
    if isinstance(err, RepositoryNotFoundError):
        hint = (
            "; sign in with Hugging Face to load a private repo of yours" if access.space and not access.visitor else ""
        )
        return LookupError(f"{name} is not {what} on the Hub that this server may read (missing or private){hint}")
    return LookupError(f"could not read {name} from the Hub ({type(err).__name__}: {str(err)[:120]}); try again later")


@contextmanager
def hub_errors(name: str, access: Access, what: str = "a model") -> Iterator[None]:
    """Hub and network errors said for a visitor (_hub_error); our own refusals (ValueError, LookupError), and
    offline mode (which callers treat as "nothing will download"), pass as they are."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        yield
    except (LookupError, ValueError, OfflineModeIsEnabled):
        raise
    except Exception as err:  # network and Hub errors: refuse with a message, never load blind
        raise _hub_error(name, err, access, what) from err


def _hub_admission(
    name: str, token: str | bool | None, access: Access, limits: HubLimits, check: Callable[[int], object]
) -> Any:
    """The model's admission (steer_core.hub.admit_model); None offline, where nothing downloads."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    from steer_core.hub import admit_model

    try:
        with hub_errors(name, access):
            return admit_model(name, token=token, limits=limits, check=check)
    except OfflineModeIsEnabled:
        return None


def _sae_repo(release: str, access: Access) -> tuple[str, str | bool | None]:
    """A registry SAE's repo and the token to read it with: shared by every visitor after, so never a visitor's own
    (Access.shared_read_token)."""
    from steer_core.sae.feature import registry_entry

    repo = registry_entry(release).repo_id
    return repo, access.shared_read_token(repo, curated=is_curated_release(release))


def _sae_admission(
    release: str, sae_id: str, access: Access, limits: HubLimits, d_model: int | None, n_layers: int | None
) -> Any:
    """The SAE's admission from the Hub (steer_core.hub.admit_sae); None offline, where nothing downloads."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    from steer_core.hub import admit_sae

    repo, token = _sae_repo(release, access)
    try:
        with hub_errors(repo, access, "an SAE repo"):
            return admit_sae(release, sae_id, token=token, limits=limits, d_model=d_model, n_layers=n_layers)
    except OfflineModeIsEnabled:
        return None


def _download_sae(release: str, sae_id: str, access: Access, revision: str | None) -> None:
    from steer_core.hub import download_sae

    repo, token = _sae_repo(release, access)
    with hub_errors(repo, access, "an SAE repo"):
        download_sae(release, sae_id, token=token, revision=revision)


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


def make_work_room(root: str | Path | None = None, *, quota: int = WORK_QUOTA) -> None:
    """Before an export or a control vector: prune the folders past their hour, then refuse to write another while
    what is left holds `quota` bytes (every visitor's together), so a run of exports cannot fill the server's disk."""
    from steer_core.ui.gate import folder_bytes

    prune_work_folders(root)
    root = Path(root or tempfile.gettempdir())
    used = sum(folder_bytes(p) for prefix in WORK_PREFIXES for p in root.glob(f"{prefix}*"))
    if used >= quota:
        raise ValueError(
            f"this server's space for exports is full ({format_bytes(used)} of {format_bytes(quota)}, each kept an "
            "hour for its download and push): try again later"
        )


def is_work_folder(path: str | Path, root: str | Path | None = None) -> bool:
    """Whether `path` lies inside one of the app's own temp folders (an export a visitor made here)."""
    root = Path(root or tempfile.gettempdir()).resolve()
    try:
        rel = Path(path).resolve().relative_to(root)
    except ValueError:
        return False
    return bool(rel.parts) and rel.parts[0].startswith(WORK_PREFIXES)
