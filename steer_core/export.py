"""The whole export: calibrate -> build -> write to a temp dir -> verify -> report -> move into place."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer_core import __version__
from steer_core.adapter.build import (
    BuiltAdapter,
    Mode,
    build_ablate,
    build_exact,
    build_portable,
    write_adapter,
    write_json,
)
from steer_core.adapter.card import model_card
from steer_core.adapter.merged import check_mergeable, write_gguf, write_merged, write_merged_card
from steer_core.adapter.record import CalibrationRecord, FitRecord, SteeringRecord, VectorRecord
from steer_core.adapter.targets import (
    Target,
    check_target,
    pad_rank,
    write_gguf_lora,
    write_modelfile,
)
from steer_core.check.scales import check_scales, check_scales_arg
from steer_core.check.verify import FidelityReport, load_peft, verify
from steer_core.constants import (
    CONTROL_VECTOR_FILENAME,
    DEFAULT_CALIBRATION_TOKENS,
    DEFAULT_VERIFY_TOKENS,
    ENGINE_SCALES,
    GGUF_LORA_FILENAME,
    MERGED_DIRNAME,
    MERGED_GGUF_FILENAME,
    MODEL_CARD_FILENAME,
    MODES,
    STEERING_JSON_FILENAME,
)
from steer_core.fit.calibrate import Calibration, Progress, Writers, calibrate
from steer_core.fit.refine import refine
from steer_core.model import LoadedModel
from steer_core.sites import architecture_for, num_layers
from steer_core.vectors.controlvector import save_control_vector
from steer_core.vectors.vector import SteeringVector, check_fits_model


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    report: FidelityReport
    record: SteeringRecord  # steering.json
    seconds: dict[str, float]

    @property
    def meta(self) -> dict[str, Any]:
        """steering.json as the JSON object written."""
        return self.record.to_dict()


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output {str(out)!r} exists and is not empty; choose another --out or remove it")


def export(
    lm: LoadedModel,
    vector: SteeringVector,
    out: str | Path,
    *,
    mode: Mode = "portable",
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    verify_tokens: int = DEFAULT_VERIFY_TOKENS,
    skip_bos: bool = False,
    refine_steps: int = 0,
    split_writers: bool = True,
    writer: Writers = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
    calibration: Calibration | None = None,
    target: str = "peft",
    engine_scales: Sequence[float] = ENGINE_SCALES,
) -> ExportResult:
    """Export `vector` as a verified PEFT adapter folder at `out`. Nothing is left at `out` if any step fails.

    `target` adds what that engine loads (adapter.targets): fireworks pads the rank to 4, llama.cpp writes a GGUF LoRA
    and the control vector, merged the base model with the adapter merged in (`merged/`, held to PEFT's logits),
    ollama that model as GGUF and a Modelfile. The PEFT folder is always there and verified.

    `engine_scales`: the LoRA scales (a llama-server request's per-adapter scale) checked against the hook at that
    multiple of the strength after verify, and the run around 1 that stays servable recorded (check.scales); empty
    to skip. Ablations have no strength and skip it.

    `writer`: which writer serves a one-site vector on a pre-norm model (calibrate: "auto" measures the site's own,
    block L+1's attention writer and the two splitting it; steer_core.fit.composite).

    `calibration` (portable mode) exports a calibration made earlier for this vector instead of making one (refined
    further if `refine_steps` asks).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if calibration_tokens < 256:
        raise ValueError(f"calibration tokens must be at least 256, got {calibration_tokens}")
    if refine_steps < 0:
        raise ValueError(f"refine steps must be 0 (no refinement) or more, got {refine_steps}")
    if engine_scales:
        check_scales_arg(engine_scales)
    model = lm.model
    check_fits_model(vector, int(model.config.get_text_config().hidden_size), num_layers(model))
    out = Path(out)
    _check_out(out, overwrite)
    engine = check_target(target, mode, model)
    for point in vector.points:
        point.writer()  # resid_pre 0 has no writer: fail before any work
    report = progress or (lambda _f, _m: None)
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    if calibration is not None and (mode != "portable" or {f.point for f in calibration.fits} != set(vector.points)):
        raise ValueError(
            f"a given calibration is for portable mode and this vector's sites "
            f"({', '.join(p.tl_name for p in vector.points)}); got mode {mode!r} and a calibration of "
            f"{', '.join(sorted({f.point.tl_name for f in calibration.fits}))}"
        )
    if mode == "portable":
        calibration = _calibration(lm, vector, calibration, calibration_tokens, skip_bos, split_writers, writer,
                                   refine_steps, report)  # fmt: skip
        built = build_portable(model, calibration, lm.base_model_id)
        seconds["calibrate"] = calibration.seconds
    elif mode == "exact":
        built = build_exact(model, vector, lm.base_model_id)
    else:
        if len(vector.points) != 1:
            raise ValueError(f"mode 'ablate' removes one direction; this vector has {len(vector.points)} sites")
        built = build_ablate(model, next(iter(vector.directions.values())), lm.base_model_id)
    if engine.min_rank > 1:
        built = pad_rank(built, engine.min_rank)
    if engine.merged:
        check_mergeable(model, built.modules, bool(built.config.lora_bias))

    report(0.72, "writing adapter")
    record = _record(lm, vector, mode, built, engine, skip_bos, calibration)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the adapter folder's mode
    try:
        write_adapter(built, vector, tmp)
        write_json(tmp / STEERING_JSON_FILENAME, record.to_dict())
        report(0.75, "verifying against hook steering on held-out text")
        t = time.perf_counter()
        adapted = load_peft(model, tmp, lm.base_model_id)  # one PEFT copy for verify and the scales
        fidelity = verify(model, lm.tokenizer, tmp, tokens=verify_tokens, base_model=lm.base_model_id,
                          peft_model=adapted)  # fmt: skip
        seconds["verify"] = time.perf_counter() - t
        scales = None
        if engine_scales and mode != "ablate":
            report(0.82, "checking the engine scales that stay servable")
            t = time.perf_counter()
            scales = check_scales(model, lm.tokenizer, tmp, fidelity, scales=engine_scales, peft_model=adapted,
                                  base_model=lm.base_model_id).to_dict()  # fmt: skip
            seconds["scales"] = time.perf_counter() - t
        del adapted
        seconds["total"] = time.perf_counter() - start
        target_files, target_notes = write_target_files(engine, lm, vector, tmp, skip_bos)
        merged, merged_files = _write_merged(engine, lm, tmp, record.replace(fidelity=fidelity.to_dict()), report)
        target_files += merged_files
        seconds["total"] = time.perf_counter() - start
        record = record.replace(
            fidelity=fidelity.to_dict(),
            merged=merged,
            scales=scales,
            target_files=tuple(target_files),
            notes=record.notes + tuple(target_notes),
            seconds={k: round(v, 2) for k, v in seconds.items()},
            # What this export wrote: a later push into the same repo removes these, and only these, when it no
            # longer writes them (steer_core.adapter.publish).
            files=tuple(sorted({p.name for p in tmp.iterdir()} | {STEERING_JSON_FILENAME, MODEL_CARD_FILENAME})),
        )
        write_json(tmp / STEERING_JSON_FILENAME, record.to_dict())
        (tmp / MODEL_CARD_FILENAME).write_text(model_card(record), encoding="utf-8")
        _check_out(out, overwrite)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(1.0, "done")
    return ExportResult(out, fidelity, record, seconds)


def _calibration(
    lm: LoadedModel,
    vector: SteeringVector,
    given: Calibration | None,
    tokens: int,
    skip_bos: bool,
    split_writers: bool,
    writer: Writers,
    refine_steps: int,
    report: Progress,
) -> Calibration:
    """The given calibration or a new one, refined if asked."""
    calibration = given or calibrate(
        lm.model,
        lm.tokenizer,
        vector,
        tokens=tokens,
        skip_bos=skip_bos,
        split_writers=split_writers,
        writer=writer,
        progress=lambda f, m: report((0.5 if refine_steps else 0.7) * f, m),
    )
    if not refine_steps:
        return calibration
    return refine(
        lm.model, lm.tokenizer, vector, calibration, steps=refine_steps, progress=lambda f, m: report(0.5 + 0.2 * f, m)
    )


def _record(
    lm: LoadedModel,
    vector: SteeringVector,
    mode: Mode,
    built: BuiltAdapter,
    engine: Target,
    skip_bos: bool,
    calibration: Calibration | None,
) -> SteeringRecord:
    """steering.json before verification: what was built, from what, and how it was calibrated."""
    record = SteeringRecord(
        steer_core_version=__version__,
        mode=mode,
        rank=built.config.r,
        target=engine.name,
        serve=engine.how,
        base_model=lm.base_model_id,
        model=lm.public_name,
        architecture=architecture_for(lm.model).family,
        skip_bos=skip_bos if mode != "ablate" else False,
        target_modules=tuple(built.modules),
        vector=VectorRecord(tuple(p.tl_name for p in vector.points), vector.norms(), vector.provenance),
        notes=tuple(built.notes + _sae_notes(vector, lm.base_model_id)),
    )
    if calibration is None:
        return record
    return record.replace(
        calibration=CalibrationRecord(
            tokens=calibration.tokens,
            seconds=round(calibration.seconds, 2),
            corpus=calibration.corpus,
            refine=calibration.refine,
            first_weight=calibration.first_weight,
            first_weight_held_in_kl={f"{w:g}": kl for w, kl in calibration.selection_kl.items()},
            post_norm_shares=calibration.shares,
            reused_statistics=calibration.reused_statistics,
            reused_tokens=calibration.reused_tokens,
            writer_choice=calibration.writer_choice,
        ),
        fits=tuple(
            FitRecord(
                module=f.module,
                point=f.point.tl_name,
                writer_layer=f.writer[0],
                writer_kind=f.writer[1],
                target=f.target,
                ridge=f.ridge,
                tokens=f.tokens,
                cv_rel_rmse=f.cv_rel_rmse,
                refined_steps=f.refined_steps,
                b_unscaled_norm=f.b_unscaled_norm,
                reads_steered=f.reads_steered,
            )
            for f in calibration.fits
        ),
    )


def write_target_files(
    engine: Target, lm: LoadedModel, vector: SteeringVector, folder: Path, skip_bos: bool
) -> tuple[list[str], list[str]]:
    """What the target engine loads besides the PEFT folder: (file names, notes). The merged model: _write_merged."""
    if not engine.gguf or engine.merged:
        return [], []
    files = [write_gguf_lora(folder, lm.model, folder / GGUF_LORA_FILENAME).name]
    notes = []
    if engine.name == "ollama":
        files.append(write_modelfile(folder, lm.base_model_id).name)
    else:
        try:
            if skip_bos:
                raise ValueError("llama.cpp adds a control vector at every position; --skip-bos cannot be written")
            files.append(save_control_vector(vector, folder / CONTROL_VECTOR_FILENAME).name)
        except ValueError as err:
            notes.append(f"no llama.cpp control vector: {err}")
    return files, notes


# The GGUF the ollama target writes: f16, half of f32's size (SmolLM2 135M: 270 MB, not 540 MB). Measured on the
# embedded SmolLM2 with feature #676's merged model in llama-server, 4 chat prompts x 24 greedy tokens against PEFT:
# f16 24/24 on all four, bf16 24, 24, 11, 24 (bf16 stores 7 mantissa bits to f16's 10, and these weights fit f16's
# range); tests/adapter/test_merged.py holds f16 to it.
GGUF_OUTTYPE = "f16"


def _write_merged(
    engine: Target, lm: LoadedModel, folder: Path, record: SteeringRecord, report: Progress
) -> tuple[dict[str, Any] | None, list[str]]:
    """The merged model (`merged/`, verified against PEFT, with its own card) for the merged targets; for ollama, that
    model as GGUF and a Modelfile instead (the safetensors copy is only the converter's input). steering.json's
    `merged` entry (None for other targets) and the names written."""
    if not engine.merged:
        return None, []
    report(0.9, "merging the adapter into a copy of the model and checking it against PEFT")
    t = time.perf_counter()
    out = folder / MERGED_DIRNAME
    fidelity = write_merged(lm.model, lm.tokenizer, folder, out, lm.base_model_id)
    entry: dict[str, Any] = {"path": MERGED_DIRNAME, "against_peft": fidelity.to_dict(), "merged_by": "peft"}
    if engine.name == "ollama":
        report(0.95, "converting the merged model to GGUF with llama.cpp's convert_hf_to_gguf.py")
        write_gguf(out, folder / MERGED_GGUF_FILENAME, GGUF_OUTTYPE)
        shutil.rmtree(out)
        modelfile = write_modelfile(folder, lm.base_model_id, MERGED_GGUF_FILENAME)
        entry.update(path=MERGED_GGUF_FILENAME, gguf_outtype=GGUF_OUTTYPE, converter="llama.cpp convert_hf_to_gguf.py")
        files = [MERGED_GGUF_FILENAME, modelfile.name]
    else:
        write_merged_card(out, record.replace(merged=entry), fidelity)
        files = [MERGED_DIRNAME]
    entry["seconds"] = round(time.perf_counter() - t, 2)
    return entry, files


def _sae_notes(vector: SteeringVector, model_id: str) -> list[str]:
    prov = vector.provenance
    if prov.get("source") != "sae" or prov.get("sae_model_matches", True):
        return []
    fvu = prov.get("sae_fvu_on_this_model", float("nan"))
    return [
        f"the SAE was trained on {prov['sae'].get('model_name')!r}, not on {model_id!r}; it reconstructs this "
        f"model's activations with fraction of variance unexplained {fvu:.3f}"
    ]
