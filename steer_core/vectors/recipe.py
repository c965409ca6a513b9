"""A steering vector described by its source and strength, built against a loaded model.

The CLI and the app both describe what the user asked for as a VectorRecipe, so both resolve strengths, check
shapes and record provenance the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from steer_core.activations import median_norm
from steer_core.constants import SITES, STRENGTH_UNITS
from steer_core.model import LoadedModel
from steer_core.sae.feature import LoadedSAE
from steer_core.sites import HookPoint, Site, num_layers
from steer_core.vectors.contrastive import Method, Position
from steer_core.vectors.vector import SteeringVector, check_fits_model

Source = Literal["file", "sae", "contrastive", "control_vector"]
NOTE_POINTS = 4


@dataclass(frozen=True)
class VectorRecipe:
    """source "file": path + layer + site; "sae": features of an SAE folder, a registry (sae_release, sae_id), or
    (neither given) the model's embedded SAE;
    "contrastive": positive + negative prompts + layer + site (+ method, position); "control_vector": path to a
    llama.cpp / repeng GGUF (its layers are in the file; strength scales it like --control-vector-scaled).

    strength_unit "abs" multiplies the decoder row (Neuronpedia's convention) or the file's vector as given;
    "resid" / "writer" set the vector's norm to strength × the median norm of the residual stream / of what the
    site's writer adds, measured on the shipped calibration text.
    """

    source: Source
    strengths: tuple[float, ...] = (1.0,)
    strength_unit: str = "abs"
    path: str | None = None
    layer: int | None = None
    site: Site = "resid_post"
    sae_release: str | None = None
    sae_id: str | None = None
    features: tuple[int, ...] = ()
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    method: Method = "mean"
    position: Position = "last"

    def __post_init__(self) -> None:
        if self.source not in ("file", "sae", "contrastive", "control_vector"):
            raise ValueError(f"vector source {self.source!r} is not one of file, sae, contrastive, control_vector")
        if self.strength_unit not in STRENGTH_UNITS:
            raise ValueError(f"strength unit {self.strength_unit!r} is not one of {', '.join(STRENGTH_UNITS)}")
        if self.method not in ("mean", "pca") or self.position not in ("last", "mean"):
            raise ValueError(
                f"contrastive method {self.method!r} / position {self.position!r}: methods are mean, pca; positions "
                "last, mean"
            )
        if self.site not in SITES:
            raise ValueError(f"site {self.site!r} is not one of {', '.join(SITES)}")
        bad = [s for s in self.strengths if not math.isfinite(s)]
        if bad or not self.strengths:
            raise ValueError(f"strengths must be finite numbers, got {list(self.strengths)}")
        if self.source in ("file", "contrastive") and self.layer is None:
            raise ValueError(f"a {self.source} vector needs a layer")
        if self.source in ("sae", "control_vector") and self.layer is not None:
            raise ValueError(
                f"layer {self.layer} does not apply to a {self.source} vector: an SAE feature is added at the SAE's "
                "own hook point and a control vector carries its layers; a layer applies to file and"
                " contrastive vectors"
            )
        if self.source in ("file", "control_vector") and (not self.path or len(self.strengths) != 1):
            raise ValueError(f"a {self.source} vector needs a path and exactly one strength")
        if self.source == "control_vector" and self.strength_unit != "abs":
            raise ValueError("a control vector's strength multiplies it as given; use strength unit 'abs'")
        if self.source == "sae":
            if (self.sae_release is None) != (self.sae_id is None):
                raise ValueError("a registry SAE needs both a release and an sae id")
            if not self.features:
                raise ValueError("an SAE vector needs at least one feature index")
            if len(self.strengths) not in (1, len(self.features)):
                raise ValueError(f"{len(self.features)} features but {len(self.strengths)} strengths")

    def build(self, lm: LoadedModel, sae: LoadedSAE | None = None) -> SteeringVector:
        """The vector on this model; `sae` is the SAE of an "sae" recipe when the caller has it loaded already."""
        model, tokenizer = lm.model, lm.tokenizer
        d_model, n_layers = int(model.config.get_text_config().hidden_size), num_layers(model)
        if self.layer is not None and not 0 <= self.layer < n_layers:
            raise ValueError(f"layer {self.layer} is out of range: this model has layers 0..{n_layers - 1}")
        if self.source == "sae":
            return self._build_sae(lm, d_model, n_layers, sae)
        if self.source == "control_vector":
            from steer_core.vectors.controlvector import load_control_vector

            vector = load_control_vector(self.path, self.strengths[0])  # type: ignore[arg-type]
            check_fits_model(vector, d_model, n_layers)
            return vector
        if self.source == "file":
            from steer_core.vectors.vector import from_file

            raw = from_file(self.path, self.layer, self.site, 1.0)  # type: ignore[arg-type]
        else:
            from steer_core.vectors.contrastive import contrastive_vector

            point = HookPoint(self.layer, self.site)  # type: ignore[arg-type]
            raw = contrastive_vector(
                lm, self.positive, self.negative, point, method=self.method, position=self.position
            )
        check_fits_model(raw, d_model, n_layers)
        (point, v), strength = next(iter(raw.directions.items())), self.strengths[0]
        factor = strength
        if self.strength_unit != "abs":
            factor *= median_norm(model, tokenizer, point, self.strength_unit) / float(v.norm())  # type: ignore[arg-type]
        vector = raw.scaled(factor)
        vector.provenance.update(strength=strength, strength_unit=self.strength_unit)
        return vector

    def _build_sae(self, lm: LoadedModel, d_model: int, n_layers: int, sae: LoadedSAE | None) -> SteeringVector:
        from steer_core.sae.feature import check_fits, load_sae, reconstruction_fvu, same_model
        from steer_core.sae.labels import known_labels
        from steer_core.vectors.vector import from_features

        if sae is None:
            sae = load_sae(path=self.path, release=self.sae_release, sae_id=self.sae_id, model=lm.name)
        check_fits(sae.source, d_model, n_layers)
        strengths = list(self.strengths) * (len(self.features) if len(self.strengths) == 1 else 1)
        if self.strength_unit != "abs":
            ref = median_norm(lm.model, lm.tokenizer, sae.source.point, self.strength_unit)  # type: ignore[arg-type]
            strengths = [
                s * ref / float(sae.decoder_row(f).norm()) for f, s in zip(self.features, strengths, strict=True)
            ]
        vector = from_features(sae, list(self.features), strengths)
        vector.provenance.update(strength_unit=self.strength_unit, strength_given=list(self.strengths))
        # What each feature means, where the SAE's labels are at hand (shipped, or cached by the app's step 2): an
        # adapter's card carries it, and others find shared adapters by it (adapter.shared). Never computed here.
        if (labels := known_labels(sae, lm.model)) is not None:
            for f in vector.provenance["features"]:
                if f["index"] in labels.labels:
                    f["label"] = labels[f["index"]].name()
        # An SAE trained on another model (say the base model of this instruct model) may still steer, but the user
        # must see how well it describes this model's activations.
        vector.provenance["sae_model_matches"] = same_model(sae.source.model_name, lm.base_model_id)
        vector.provenance["sae_fvu_on_this_model"] = reconstruction_fvu(sae, lm.model, lm.tokenizer)
        return vector


def file_recipe(path: str, strengths: tuple[float, ...], unit: str, *, layer: int, site: Site) -> VectorRecipe:
    """A vector file, as the app's upload and the CLI's --vector take it: a llama.cpp / repeng control vector
    (.gguf) names its own layers and is scaled as given, so `layer` and `unit` apply to the other formats only."""
    if path.lower().endswith(".gguf"):
        return VectorRecipe("control_vector", strengths, "abs", path=path)
    return VectorRecipe("file", strengths, unit, path=path, layer=layer, site=site)


def strength_note(lm: LoadedModel, vector: SteeringVector) -> str:
    """Where the vector steers and how strong it is against the residual stream there, whatever unit set it.

    A strength means different things per unit (0.5 "abs" on a decoder row is often a whisper, 0.5 "resid" a
    shout), so users see the one scale that compares: the vector's norm over the site's median residual norm.
    """
    unit = vector.provenance.get("strength_unit", "abs")
    items = list(vector.directions.items())
    parts = []
    for point, v in items[:NOTE_POINTS]:  # each site costs a forward pass; control vectors can have dozens
        norm, ref = float(v.norm()), median_norm(lm.model, lm.tokenizer, point, "resid")
        parts.append(f"{point.tl_name}: norm {norm:.4g} = {norm / ref:.3g}× the median residual norm there ({ref:.4g})")
    if len(items) > NOTE_POINTS:
        parts.append(f"and {len(items) - NOTE_POINTS} more sites")
    return f"steering (strength unit {unit!r}) " + "; ".join(parts)
