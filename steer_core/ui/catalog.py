"""What the app offers: curated models, and for a model the SAEs that read it (the embedded one, registry releases).

The sae_lens registry is a YAML file inside the sae_lens package, so the choices are listed offline; only loading a
registry SAE reaches the Hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from steer_core.constants import SAE_CONFIG_FILENAME, SAE_WEIGHTS_FILENAME
from steer_core.hardware import Budget, format_bytes
from steer_core.model import EMBEDDED_MODELS, embedded_installed
from steer_core.sae.feature import EMBEDDED_SAES, embedded_sae_for, registry, registry_entry, same_model

_RESIDUAL = re.compile(r"(^|[-_])(res|resid)([-_]|$)")


@dataclass(frozen=True)
class CuratedModel:
    model_id: str  # what load_model takes: an embedded name or a Hub id
    label: str
    sae_releases: tuple[str, ...] = ()  # registry releases offered first (residual-stream SAEs)
    parameters: int = 0  # as the Hub's safetensors metadata counts them: what the hardware check needs, offline
    gated: bool = False  # the Hub asks for the licence to be accepted: on a Space, the owner's HF_TOKEN reads it


CURATED_MODELS: tuple[CuratedModel, ...] = (
    CuratedModel(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct (embedded, offline, with its own SAE)", (), 134_515_008
    ),
    CuratedModel(
        "gemma-3-270m", "Gemma 3 270M (embedded, offline)", ("gemma-scope-2-270m-pt-res",), 268_098_176, gated=True
    ),  # gated upstream: read from the Hub only where its package is missing
    CuratedModel(
        "google/gemma-3-270m-it",
        "Gemma 3 270M-it + Gemma Scope 2",
        ("gemma-scope-2-270m-it-res", "gemma-scope-2-270m-pt-res"),
        268_098_176,
        gated=True,
    ),
    CuratedModel(
        "google/gemma-2-2b", "Gemma 2 2B + Gemma Scope", ("gemma-scope-2b-pt-res-canonical",), 2_614_341_888, True
    ),
    CuratedModel("meta-llama/Llama-3.1-8B", "Llama 3.1 8B + Llama Scope", ("llama_scope_lxr_8x",), 8_030_261_248, True),
    CuratedModel(
        "meta-llama/Llama-3.1-8B-Instruct",
        "Llama 3.1 8B-Instruct + Goodfire / Llama Scope",
        ("goodfire-llama-3.1-8b-instruct", "llama-3.1-8b-instruct-andyrdt", "llama_scope_lxr_8x"),
        8_030_261_248,
        gated=True,
    ),
    CuratedModel("gpt2", "GPT-2 small + gpt2-small-res-jb", ("gpt2-small-res-jb",), 124_439_808),
)


@dataclass(frozen=True)
class SAEChoice:
    """One SAE the user can pick: a local folder (the embedded SAE, or one they typed) or a registry entry."""

    label: str
    path: str | None = None
    release: str | None = None
    sae_id: str | None = None
    trained_on: str | None = None  # the model the SAE was trained on, as the registry or the embedded spec says
    neuronpedia_id: str | None = None

    def __post_init__(self) -> None:
        registry = self.release is not None or self.sae_id is not None
        if bool(self.path) == registry or (registry and not (self.release and self.sae_id)):
            raise ValueError(f"SAE choice {self.label!r} needs either a folder or a registry release and sae_id")

    @property
    def available_offline(self) -> bool:
        return self.path is not None and (Path(self.path) / SAE_CONFIG_FILENAME).is_file()

    def neuronpedia_url(self, feature: int) -> str | None:
        return f"https://www.neuronpedia.org/{self.neuronpedia_id}/{feature}" if self.neuronpedia_id else None


def model_choices(budget: Budget | None = None, *, gated_readable: bool = True) -> list[tuple[str, str]]:
    """(label, model id) pairs for the model dropdown, embedded models first. With a budget, each label says when
    this hardware cannot hold the model; `gated_readable` False marks the gated ones this server cannot read."""
    out = []
    for m in CURATED_MODELS:
        label = m.label
        if budget is not None and m.parameters and budget.model_bytes(m.parameters) > budget.models:
            label += f" · too large here ({format_bytes(budget.model_bytes(m.parameters))} in {budget.dtype_name})"
        elif m.gated and not gated_readable and not embedded_installed(m.model_id):
            label += " · gated: needs the Space owner's HF_TOKEN"
        out.append((label, m.model_id))
    return out


def curated_repos() -> set[str]:
    """The Hub repos the app's owner chose: the curated models, the embedded models' upstreams, and the repos of the
    curated SAE releases (as opposed to the ones a visitor types)."""
    directory = registry()
    saes = {directory[r].repo_id for m in CURATED_MODELS for r in m.sae_releases if r in directory}
    return {m.model_id for m in CURATED_MODELS} | {m.hub_id for m in EMBEDDED_MODELS.values()} | saes


def is_curated_repo(repo_id: str) -> bool:
    return repo_id in curated_repos()


def is_curated_release(release: str) -> bool:
    return any(release in m.sae_releases for m in CURATED_MODELS)


def curated_parameters(model_id: str) -> int | None:
    return next((m.parameters for m in CURATED_MODELS if m.model_id == model_id and m.parameters), None)


def _curated(model_name: str) -> CuratedModel | None:
    for m in CURATED_MODELS:
        if model_name == m.model_id:
            return m
    return None


def _hub_id(model_name: str) -> str:
    spec = EMBEDDED_MODELS.get(model_name)
    return spec.hub_id if spec else model_name


def registry_releases(model_name: str) -> list[str]:
    """Registry releases for this model: the curated ones for a curated model, else every residual-stream release
    whose model matches by name (attention, MLP and transcoder releases are left out: they do not read the residual
    stream the steering writes to)."""
    directory = registry()
    curated = _curated(model_name)
    if curated and curated.sae_releases:
        return [r for r in curated.sae_releases if r in directory]
    hub_id = _hub_id(model_name)
    return sorted(
        r for r, v in directory.items() if same_model(v.model, hub_id) and _RESIDUAL.search(r) and "transcoder" not in r
    )


def registry_choices(release: str) -> list[SAEChoice]:
    entry = registry_entry(release)
    np_ids = entry.neuronpedia_id or {}
    return [
        SAEChoice(
            f"{release} / {sae_id}",
            release=release,
            sae_id=sae_id,
            trained_on=entry.model,
            neuronpedia_id=np_ids.get(sae_id),
        )
        for sae_id in entry.saes_map
    ]


def embedded_choice(model_name: str) -> SAEChoice | None:
    spec = embedded_sae_for(model_name)
    if spec is None:
        return None
    return SAEChoice(f"embedded: {spec.name} (offline)", path=str(spec.path), trained_on=spec.model)


def sae_choices(model_name: str) -> list[SAEChoice]:
    """Every SAE offered for `model_name`: its embedded SAE first, then registry SAEs (which need the Hub)."""
    out = [c for c in [embedded_choice(model_name)] if c is not None]
    for release in registry_releases(model_name):
        out += registry_choices(release)
    return out


def folder_choice(path: str) -> SAEChoice:
    """An SAE folder the user typed (SAE Lens format)."""
    path = path.strip()
    if not path:
        raise ValueError(
            f"the SAE folder is empty; type the path of a folder with {SAE_CONFIG_FILENAME} and {SAE_WEIGHTS_FILENAME}"
        )
    return SAEChoice(f"folder: {path}", path=path)


def find_choice(model_name: str, label: str) -> SAEChoice:
    """The choice behind a dropdown label; every registry SAE is accepted, not only this model's."""
    for choice in sae_choices(model_name):
        if choice.label == label:
            return choice
    if label.startswith("embedded: "):
        for spec in EMBEDDED_SAES.values():
            if label == f"embedded: {spec.name} (offline)":
                return SAEChoice(label, path=str(spec.path), trained_on=spec.model)
    if label.startswith("folder: "):
        return folder_choice(label.removeprefix("folder: "))
    if " / " in label:
        release, sae_id = (s.strip() for s in label.split(" / ", 1))
        for choice in registry_choices(release):
            if choice.sae_id == sae_id:
                return choice
        raise LookupError(f"sae_id {sae_id!r} is not in release {release!r}")
    raise LookupError(
        f"SAE {label!r} is not offered for {model_name!r}; pick one from the list, or type 'RELEASE / SAE_ID' or a "
        "folder"
    )
