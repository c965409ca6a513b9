"""SAE features (via sae_lens): load an SAE, check it fits the model, read decoder rows with provenance."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from steer_core.constants import LABELS_FILENAME, SAE_CONFIG_FILENAME, SAE_WEIGHTS_FILENAME
from steer_core.provenance import file_provenance
from steer_core.sites import HookPoint, parse_hook_name

if TYPE_CHECKING:
    from sae_lens import SAE


def _sae_lens() -> Any:
    try:
        import sae_lens
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("SAE features need sae_lens: pip install sae-lens") from err
    return sae_lens


@dataclass(frozen=True)
class SAESource:
    """Where an SAE came from; copied into every exported adapter's steering.json."""

    hook_name: str
    point: HookPoint
    d_in: int
    d_sae: int
    model_name: str | None = None
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None
    neuronpedia_id: str | None = None

    def neuronpedia_url(self, feature: int) -> str | None:
        if not self.neuronpedia_id:
            return None
        return f"https://www.neuronpedia.org/{self.neuronpedia_id}/{feature}"

    def provenance(self) -> dict[str, Any]:
        """What steering.json records: the registry entry, `embedded:NAME`, or a folder named by its weights' hash
        (steer_core.provenance), never the folder's path."""
        out = dataclasses.asdict(self) | {"point": self.point.tl_name, "path": None}
        if is_embedded_sae(self.path):
            out["folder"] = f"embedded:{Path(str(self.path)).name}"
        elif self.path:
            named = file_provenance(Path(self.path) / SAE_WEIGHTS_FILENAME, "sae")
            out |= {"folder": named["file"].removesuffix(".safetensors"), "sha256": named["sha256"]}
        return out

    def describe(self) -> str:
        if self.release:
            where = f"{self.release}/{self.sae_id}"
        elif self.path and Path(self.path).parent == _EMBEDDED_DIR:
            where = f"embedded:{Path(self.path).name}"  # not this machine's install path (screens, steering.json)
        else:
            where = str(self.path)
        return f"SAE {where} at {self.hook_name}"


@dataclass
class LoadedSAE:
    sae: SAE
    source: SAESource

    @property
    def decoder(self) -> Tensor:
        """Float[Tensor, "d_sae d_in"]: one direction per feature, in the residual stream's own basis."""
        return self.sae.W_dec.detach()

    def decoder_row(self, feature: int) -> Tensor:
        check_feature(self.source, feature)
        return self.decoder[feature].float().clone()


def check_feature(source: SAESource, feature: int) -> None:
    if not 0 <= feature < source.d_sae:
        raise ValueError(f"feature {feature} is out of range for {source.describe()}: valid are 0..{source.d_sae - 1}")


def _source_from_sae(sae: SAE, **provenance: str | None) -> SAESource:
    meta = sae.cfg.metadata
    hook_name = meta.hook_name
    if not hook_name:
        raise ValueError("the SAE's metadata has no hook_name, so its layer and site are unknown")
    if getattr(sae.cfg, "reshape_activations", "none") != "none":
        raise ValueError(f"SAE at {hook_name} reads {sae.cfg.reshape_activations}, not the residual stream")
    return SAESource(
        hook_name=hook_name,
        point=parse_hook_name(hook_name),
        d_in=int(sae.cfg.d_in),
        d_sae=int(sae.cfg.d_sae),
        model_name=meta.model_name,
        neuronpedia_id=meta.neuronpedia_id,
        **provenance,
    )


def load_sae_from_disk(path: str | Path) -> LoadedSAE:
    """An SAE in SAE Lens format: a folder with cfg.json and sae_weights.safetensors."""
    folder = Path(path)
    missing = [f for f in (SAE_CONFIG_FILENAME, SAE_WEIGHTS_FILENAME) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an SAE Lens folder: missing {', '.join(missing)}")
    sae = _sae_lens().SAE.load_from_disk(str(folder))
    return LoadedSAE(sae, _source_from_sae(sae, path=str(folder)))


@lru_cache(maxsize=1)
def registry() -> dict[str, Any]:
    """The sae_lens registry: a YAML file inside the package, so it is read offline."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:  # pragma: no cover - depends on the environment
        return {}
    return dict(get_pretrained_saes_directory())


def registry_entry(release: str) -> Any:
    """The registry's entry of a release: repo_id, saes_map (sae_id -> path in the repo), model."""
    directory = registry()
    if release not in directory:
        near = sorted(r for r in directory if release.split("-")[0] in r)[:10]
        raise LookupError(f"SAE release {release!r} is not in the sae_lens registry; similar: {near}")
    return directory[release]


def load_sae_from_registry(release: str, sae_id: str) -> LoadedSAE:
    """An SAE from the sae_lens pretrained registry (downloads from the Hub)."""
    _sae_lens()
    ids = registry_entry(release).saes_map
    if sae_id not in ids:
        raise LookupError(f"sae_id {sae_id!r} is not in release {release!r}; some valid ids: {sorted(ids)[:10]}")
    sae = _sae_lens().SAE.from_pretrained(release, sae_id)
    return LoadedSAE(sae, _source_from_sae(sae, release=release, sae_id=sae_id))


_EMBEDDED_DIR = Path(str(files("steer_core").joinpath("data", "saes")))


@dataclass(frozen=True)
class EmbeddedSAE:
    """An SAE the project trained and ships (scripts/train_sae.py), so features work offline."""

    name: str  # folder under steer_core/data/saes/
    model: str  # the EMBEDDED_MODELS name it was trained on
    # a feature that search finds and that visibly steers (README example), the app's first selection: 676 "dog",
    # the concept newcomers try first; 4 of 6 answers steered at 0.5x in scripts.concept_benchmark
    default_feature: int
    default_strength: float  # in units of the layer's median residual norm

    @property
    def path(self) -> Path:
        return _EMBEDDED_DIR / self.name

    @property
    def labels_path(self) -> Path:
        return self.path / LABELS_FILENAME


EMBEDDED_SAES: dict[str, EmbeddedSAE] = {
    "smollm2-135m-instruct-res-L15": EmbeddedSAE(
        "smollm2-135m-instruct-res-L15", "smollm2-135m-instruct", default_feature=676, default_strength=0.5
    ),
}


def is_embedded_sae(path: str | Path | None) -> bool:
    """Whether a folder is one of the SAEs this package ships (as opposed to one a user typed)."""
    return bool(path) and Path(str(path)).resolve().parent == _EMBEDDED_DIR.resolve()


def embedded_sae_for(model_name: str) -> EmbeddedSAE | None:
    """The shipped SAE for an embedded model (by its short name or upstream Hub id), if there is one."""
    from steer_core.model import EMBEDDED_MODELS

    for spec in EMBEDDED_SAES.values():
        if model_name in (spec.model, EMBEDDED_MODELS[spec.model].hub_id):
            return spec
    return None


def load_sae(
    *, path: str | Path | None = None, release: str | None = None, sae_id: str | None = None, model: str | None = None
) -> LoadedSAE:
    """A local folder, a registry (release, sae_id), or else the embedded SAE of `model`."""
    if path:
        return load_sae_from_disk(path)
    if release or sae_id:
        if not (release and sae_id):
            raise ValueError("a registry SAE needs both a release and an sae_id")
        return load_sae_from_registry(release, sae_id)
    spec = embedded_sae_for(model or "")
    if spec is None:
        have = ", ".join(f"{s.model} ({s.name})" for s in EMBEDDED_SAES.values())
        raise ValueError(
            f"model {model!r} has no embedded SAE (embedded: {have}); give an SAE folder or a registry release and id"
        )
    return load_sae_from_disk(spec.path)


def check_fits(source: SAESource, d_model: int, n_layers: int) -> None:
    """The SAE must read vectors of the model's width at a layer the model has."""
    if source.d_in != d_model:
        raise ValueError(f"{source.describe()} has d_in={source.d_in}, but the model's hidden size is {d_model}")
    if source.point.layer >= n_layers:
        raise ValueError(f"{source.describe()} is at layer {source.point.layer}; the model has 0..{n_layers - 1}")


def top_features_by_cosine(sae: LoadedSAE, vector: Tensor, k: int = 10) -> list[tuple[int, float]]:
    """The SAE features whose decoder directions point most nearly along `vector` (cosine similarity)."""
    dec = sae.decoder.float()
    v = vector.float().to(dec.device)
    cos = (dec @ v) / (dec.norm(dim=-1) * v.norm()).clamp_min(1e-12)
    top = torch.topk(cos, min(k, len(cos)))
    return [(int(i), float(c)) for c, i in zip(top.values, top.indices, strict=True)]


def same_model(sae_model: str | None, model_id: str) -> bool:
    """Whether an SAE's metadata model_name names this model (TransformerLens names such as gpt2-small included)."""
    if not sae_model:
        return False
    aliases = {"gpt2-small": "gpt2"}
    a = aliases.get(sae_model.lower(), sae_model.lower()).rsplit("/", 1)[-1]
    b = model_id.lower().rsplit("/", 1)[-1]
    return a == b


def sae_unit(source: SAESource) -> Literal["resid", "writer"]:
    """Whether the SAE reads the residual stream itself or what one writer adds to it."""
    return "resid" if source.point.site in ("resid_pre", "resid_post") else "writer"


def reconstruction_fvu(sae: LoadedSAE, model: Any, tokenizer: Any, *, tokens: int = 2048) -> float:
    """Fraction of variance the SAE leaves unexplained on this model's activations at its hook (held-out text).

    Position 0 is left out: its massive attention-sink activations are not what an SAE is trained on.
    """
    from steer_core.activations import site_activations

    x = site_activations(model, tokenizer, sae.source.point, sae_unit(sae.source), split="heldout", tokens=tokens)
    with torch.no_grad():
        recon = sae.sae(x.to(sae.decoder.device, sae.decoder.dtype)).float().cpu()
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
