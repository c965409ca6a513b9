"""steering.json as typed records: what an export made, how it was calibrated, and how faithful it measured.

Export builds a SteeringRecord and writes `to_dict()`; every reader (verify, the card, publish, the app) reads it back
with `read_record` / `from_dict`, so a new field is added in one place. `from_dict` reads folders written by earlier
versions too: a field they lack takes its default, and keys it does not know are kept in `extra` and written back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steer_core.constants import STEERING_JSON_FILENAME

if TYPE_CHECKING:  # steering.json is read without loading torch
    from steer_core.sites import Kind


def _known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the keys `cls` has fields for, the rest)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


@dataclass(frozen=True)
class FitRecord:
    """One writer's rank-1 fit (steer_core.fit.calibrate.WriterFit, as JSON)."""

    module: str
    point: str
    writer_layer: int
    writer_kind: Kind
    target: str = "one"
    ridge: float = 0.0
    tokens: int = 0
    cv_rel_rmse: float = float("nan")
    refined_steps: int = 0
    b_unscaled_norm: float = 0.0
    reads_steered: bool = True  # whether the writer reads the hook-steered pass (verify measures its fit there)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitRecord:
        return cls(**_known(cls, data)[0])


@dataclass(frozen=True)
class CalibrationRecord:
    tokens: int
    seconds: float
    corpus: dict[str, Any] = field(default_factory=dict)
    refine: dict[str, Any] | None = None
    first_weight: float = 1.0
    first_weight_held_in_kl: dict[str, float] = field(default_factory=dict)
    post_norm_shares: dict[str, Any] | None = None
    reused_statistics: bool = False  # the writers' input statistics were kept from an earlier export at the site
    reused_tokens: int = 0  # of `tokens`, those whose statistics were kept (a map's at the site, grown to these)
    # which writer serves a one-site vector and the KL it was chosen by (fit.composite); None where not offered
    writer_choice: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationRecord:
        return cls(**_known(cls, data)[0])


@dataclass(frozen=True)
class VectorRecord:
    points: tuple[str, ...]
    norms: dict[str, float]
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VectorRecord:
        known = _known(cls, data)[0]
        return cls(**{**known, "points": tuple(known.get("points", ())), "norms": known.get("norms", {})})


@dataclass(frozen=True)
class SteeringRecord:
    """steering.json. `fidelity` is verify's FidelityReport.to_dict(); `files` what this export wrote (publish removes
    only those from a repo); `calibration` and `fits` only for portable mode."""

    mode: str
    base_model: str
    vector: VectorRecord
    steer_core_version: str = ""
    rank: int = 1
    target: str = "peft"
    serve: str = ""
    model: str = ""
    architecture: str = ""
    skip_bos: bool = False
    target_modules: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    calibration: CalibrationRecord | None = None
    fits: tuple[FitRecord, ...] = ()
    fidelity: dict[str, Any] | None = None
    target_files: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    files: tuple[str, ...] | None = None
    # the merged-weights targets (adapter.merged): where the merged model is, its logits against PEFT's, the GGUF's
    # outtype; None for the other targets and for folders exported before them
    merged: dict[str, Any] | None = None
    # the engine scales checked after verify (check.scales.ScaleReport.to_dict()): fidelity per scale and the run
    # that stays servable; None for ablations and for folders exported before them
    scales: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of another version, written back as they were

    def __post_init__(self) -> None:
        if self.mode not in ("portable", "exact", "ablate"):
            raise ValueError(f"steering.json mode {self.mode!r} is not one of portable, exact, ablate")

    @property
    def top1(self) -> float | None:
        return float(self.fidelity["top1_agreement"]) if self.fidelity else None

    def replace(self, **changes: Any) -> SteeringRecord:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, in the key order exports have always written."""
        out: dict[str, Any] = {
            "steer_core_version": self.steer_core_version,
            "mode": self.mode,
            "rank": self.rank,
            "target": self.target,
            "serve": self.serve,
            "base_model": self.base_model,
            "model": self.model,
            "architecture": self.architecture,
            "skip_bos": self.skip_bos,
            "target_modules": list(self.target_modules),
            "vector": {**dataclasses.asdict(self.vector), "points": list(self.vector.points)},
            "notes": list(self.notes),
        }
        if self.calibration is not None:
            out["calibration"] = dataclasses.asdict(self.calibration)
            out["fits"] = [dataclasses.asdict(f) for f in self.fits]
        if self.fidelity is not None:
            out["fidelity"] = self.fidelity
            out["target_files"] = list(self.target_files)
        if self.seconds:
            out["seconds"] = self.seconds
        if self.files is not None:
            out["files"] = list(self.files)
        if self.merged is not None:
            out["merged"] = self.merged
        if self.scales is not None:
            out["scales"] = self.scales
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SteeringRecord:
        if not isinstance(data, dict) or "mode" not in data or "base_model" not in data:
            raise ValueError("steering.json needs at least 'mode' and 'base_model'; it was not written by steer_core")
        known, extra = _known(cls, data)
        calibration = known.get("calibration")
        return cls(
            **{
                **known,
                "vector": VectorRecord.from_dict(known.get("vector") or {}),
                "target_modules": tuple(known.get("target_modules", ())),
                "notes": tuple(known.get("notes", ())),
                "calibration": CalibrationRecord.from_dict(calibration) if calibration else None,
                "fits": tuple(FitRecord.from_dict(f) for f in known.get("fits", ())),
                "target_files": tuple(known.get("target_files", ())),
                "files": tuple(known["files"]) if isinstance(known.get("files"), list) else None,
                "extra": extra,
            }
        )


def read_json(path: Path) -> Any:
    """A JSON file of an adapter folder, or an error that names it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def read_record(folder: str | Path) -> SteeringRecord:
    """The steering.json of an adapter folder, or an error that says what is wrong with it."""
    path = Path(folder) / STEERING_JSON_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {STEERING_JSON_FILENAME}: not an adapter exported by steer_core")
    data = read_json(path)
    try:
        return SteeringRecord.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err
