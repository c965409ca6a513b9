"""Steering vectors: what to add, where, and where it came from."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from steer_core.provenance import file_provenance
from steer_core.sae.feature import LoadedSAE, check_feature
from steer_core.sites import HookPoint, Site


def _point_key(point: HookPoint) -> str:
    return f"{point.layer}.{point.site}"


def _parse_point_key(key: str) -> HookPoint:
    layer, site = key.split(".", 1)
    return HookPoint(int(layer), site)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SteeringVector:
    """Vectors to add to the residual stream, one per HookPoint, plus JSON-able provenance.

    `directions` maps each point to a Float[Tensor, "d_model"]. Ablation uses the same type: there each vector
    is the direction to remove (its norm is ignored).
    """

    directions: dict[HookPoint, Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise ValueError("a steering vector needs at least one (layer, site)")
        widths = {v.shape for v in self.directions.values()}
        if len(widths) != 1 or len(next(iter(widths))) != 1:
            raise ValueError(f"every vector must be 1-D and of one width; got shapes {sorted(map(tuple, widths))}")
        for point, v in self.directions.items():
            if not torch.isfinite(v).all():
                raise ValueError(f"the vector at {point.tl_name} has non-finite entries")

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    @property
    def points(self) -> list[HookPoint]:
        return sorted(self.directions)

    @property
    def first_block(self) -> int:
        """The first block whose computation the steering changes: its earliest site's writer. The blocks before it
        are the same steered or not, so passes that differ only in steering can share them."""
        return min(p.writer()[0] for p in self.directions)

    def norms(self) -> dict[str, float]:
        return {p.tl_name: float(v.norm()) for p, v in sorted(self.directions.items())}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SteeringVector:
        moved = {p: v.to(device=device, dtype=dtype) for p, v in self.directions.items()}
        return dataclasses.replace(self, directions=moved)

    def scaled(self, factor: float) -> SteeringVector:
        return dataclasses.replace(self, directions={p: v * factor for p, v in self.directions.items()})

    def __add__(self, other: SteeringVector) -> SteeringVector:
        merged = dict(self.directions)
        for p, v in other.directions.items():
            merged[p] = merged[p] + v if p in merged else v
        parts = [self.provenance, other.provenance]
        return SteeringVector(merged, {"combined": parts})

    def same_as(self, other: SteeringVector, rtol: float = 1e-4) -> bool:
        """The same sites and directions (to float32 rounding: a saved vector is float32)."""
        return set(self.directions) == set(other.directions) and all(
            torch.allclose(v.float().cpu(), other.directions[p].float().cpu(), rtol=rtol, atol=rtol * float(v.norm()))
            for p, v in self.directions.items()
        )

    def save(self, path: str | Path) -> None:
        tensors = {_point_key(p): v.detach().float().cpu().contiguous() for p, v in self.directions.items()}
        save_file(tensors, str(path), metadata={"provenance": json.dumps(self.provenance)})

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            directions = {_parse_point_key(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return cls(directions, json.loads(meta.get("provenance", "{}")))


def _check_strength(strength: float) -> float:
    if not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength!r}")
    return float(strength)


def from_features(sae: LoadedSAE, features: Sequence[int], strengths: Sequence[float]) -> SteeringVector:
    """Sum of strength × decoder row (the Neuronpedia convention: strength is the absolute coefficient)."""
    if not features:
        raise ValueError("give at least one feature index")
    if len(strengths) == 1 and len(features) > 1:
        strengths = list(strengths) * len(features)
    if len(strengths) != len(features):
        raise ValueError(f"{len(features)} features but {len(strengths)} strengths: give one, or one per feature")
    total = torch.zeros(sae.source.d_in)
    for feature, strength in zip(features, strengths, strict=True):
        check_feature(sae.source, feature)
        total += _check_strength(strength) * sae.decoder_row(feature)
    provenance = {
        "source": "sae",
        "sae": sae.source.provenance(),
        "features": [
            {
                "index": f,
                "strength": float(s),
                "decoder_norm": float(sae.decoder_row(f).norm()),
                "url": sae.source.neuronpedia_url(f),
            }
            for f, s in zip(features, strengths, strict=True)
        ],
    }
    return SteeringVector({sae.source.point: total}, provenance)


def read_vector_file(path: str | Path) -> Tensor:
    """One 1-D tensor from .safetensors (exactly one tensor), .pt/.pth or .npy."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"vector file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            if len(keys) != 1:
                raise ValueError(f"{p} holds {len(keys)} tensors ({keys[:5]}); expected exactly one 1-D tensor")
            tensor = f.get_tensor(keys[0])
    elif suffix in (".pt", ".pth"):
        tensor = torch.load(p, map_location="cpu", weights_only=True)
    elif suffix == ".npy":
        import numpy as np

        tensor = torch.from_numpy(np.load(p, allow_pickle=False))
    else:
        raise ValueError(f"vector file {p.name!r}: unsupported extension; use .safetensors, .pt or .npy")
    if not isinstance(tensor, Tensor) or tensor.ndim != 1:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"{p} must hold one 1-D tensor of length d_model, got {shape}")
    return tensor.float()


def from_file(path: str | Path, layer: int, site: Site, strength: float = 1.0) -> SteeringVector:
    """A raw vector, multiplied by `strength` as given."""
    point = HookPoint(layer, site)
    v = read_vector_file(path) * _check_strength(strength)
    return SteeringVector(
        {point: v}, {"source": "file", **file_provenance(path, "vector"), "strength": float(strength)}
    )


def check_fits_model(vector: SteeringVector, d_model: int, n_layers: int) -> None:
    if vector.d_model != d_model:
        raise ValueError(f"the vector has length {vector.d_model}, but the model's hidden size is {d_model}")
    for p in vector.points:
        if p.layer >= n_layers:
            raise ValueError(f"{p.tl_name}: layer {p.layer} is out of range; the model has layers 0..{n_layers - 1}")
