"""The receiving side of sharing: find the adapters others shared for the loaded model, open one, check it here, and
write it for another engine, as it is.

- `find`: adapter.shared's list, with the visitor's own Hub access (none at all for an anonymous visitor of a Space).
- `open_adapter`: the adapter's files at one pinned commit, into a work folder of this server's (pruned after an hour
  like an export's), each file sized from the repo's listing before it downloads (hub.download_small, with the caps a
  served preview has), then read through `Workspace.served_adapter`, so what is opened is what the preview serves.
  What it is decides what the page can do with it: one of ours (steering.json and the hook vector), ours without its
  steering.json, or a plain LoRA from elsewhere.
- `own_vector`: the hook the preview compares the adapter with: its stored vector (steering_vector.safetensors), not
  re-derived, so it needs no SAE; a plain LoRA has none, and the hook column says so.
- `verify_here`: check.verify on the opened folder, the held-out report re-run on this server.
- `derive`: the adapter as it is (no refit) for another engine: export's own target writers (adapter.targets), and
  steering.json's `derived_from` says which repo and commit it came from.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from steer_core.adapter.record import SteeringRecord
from steer_core.adapter.served import ServedAdapter
from steer_core.adapter.shared import SharedAdapter, find_shared
from steer_core.constants import (
    ADAPTER_CONFIG_FILENAME,
    ADAPTER_WEIGHTS_BIN_FILENAME,
    ADAPTER_WEIGHTS_FILENAME,
    DEFAULT_VERIFY_TOKENS,
    MODEL_CARD_FILENAME,
    STEERING_JSON_FILENAME,
    STEERING_VECTOR_FILENAME,
)
from steer_core.hub import Access, check_repo_id, download_small, hub_api
from steer_core.model import LoadedModel
from steer_core.ui.limits import Limits
from steer_core.ui.workspace import WORK_PREFIXES, Workspace, hub_errors
from steer_core.vectors.vector import SteeringVector

Kind = Literal["ours", "no_record", "plain"]
SHARED_TAG = "steer-core"  # adapter.card.TAG: a repo the Hub tags with it was shared as one of ours
ADAPTER_DIRNAME = "adapter"


@dataclass(frozen=True)
class Opened:
    """A shared adapter opened here: which repo, at which commit, its files in `folder` (a work folder), and what it
    is. Held in the visitor's session (a gr.State, which a request cannot write)."""

    repo: str
    commit: str
    folder: str
    kind: Kind
    record: SteeringRecord | None  # steering.json, for "ours"
    base_model: str  # the base model it was made for, as it says ("" where a plain LoRA names none)
    has_vector: bool = False  # steering_vector.safetensors: the hook it stands for, which the preview steers with

    def strength(self) -> tuple[float, str] | None:
        """(strength, unit) as the author gave it, for the form's strength field; None for a mix of several
        strengths or a recipe that names none."""
        prov = self.record.vector.provenance if self.record else {}
        given, unit = prov.get("strength_given"), prov.get("strength_unit")
        if not (isinstance(given, list) and len(given) == 1 and isinstance(unit, str)):
            return None
        value = given[0]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        return float(value), unit

    def files(self) -> Path:
        """The opened folder, or an error when it was pruned (an hour after opening, as an export's)."""
        path = Path(self.folder)
        if not path.is_dir():
            raise FileNotFoundError(f"{self.repo}'s files were cleaned up (they are kept for an hour): open it again")
        return path

    def ours(self, doing: str) -> SteeringRecord:
        """steering.json, or an error saying why `doing` needs it."""
        if self.record is None:
            what = "has no steering.json" if self.kind == "no_record" else "is a plain LoRA, not exported by steer_core"
            raise ValueError(f"{self.repo} {what}: {doing} needs its steering.json and stored hook vector")
        return self.record


def find(base_model: str, words: str, access: Access, *, api: Any = None) -> list[SharedAdapter]:
    """The shared adapters of `base_model` whose labels or repo id hold every one of `words`, read as this visitor:
    with their own token (their private adapters too), else none on a Space (public adapters only)."""
    token = access.read_token(base_model, curated=False)
    with hub_errors(base_model, access, "a base model with shared adapters"):
        return find_shared(base_model, words, token=token, api=api)


def open_adapter(workspace: Workspace, lm: LoadedModel, repo: str, access: Access, limits: Limits) -> Opened:
    """Download `repo`'s adapter files at its current commit into a work folder and read them as the preview does;
    an error when it was made for another base model than `lm`'s or its steering.json is damaged."""
    repo = check_repo_id((repo or "").strip(), "a shared adapter repo")
    folder, commit, tags = _download(repo, access, limits, workspace.hub_limits)
    try:
        adapter = _read(workspace, folder, repo, access, limits)
        made_for = adapter.record.base_model if adapter.record else adapter.base_model
        if made_for and made_for.casefold() != lm.base_model_id.casefold():
            raise ValueError(
                f"{repo} was made for base model {made_for}, not for the model loaded here ({lm.base_model_id}): load "
                f"{made_for} in step 1 to open it, or open one of the adapters listed for {lm.base_model_id}"
            )
    except BaseException:
        shutil.rmtree(folder.parent, ignore_errors=True)
        raise
    kind: Kind = (
        "ours" if adapter.record else "no_record" if adapter.vector is not None or SHARED_TAG in tags else "plain"
    )
    return Opened(repo, commit, str(folder), kind, adapter.record, made_for, adapter.vector is not None)


def _download(repo: str, access: Access, limits: Limits, hub_limits: Any) -> tuple[Path, str, list[str]]:
    """(the folder, the commit, the repo's tags): the adapter's files at the commit the listing names, each refused
    over its cap before it downloads (the caps Workspace.served_adapter reads a Hub adapter with)."""
    token = access.read_token(repo, curated=False)
    with hub_errors(repo, access, "an adapter"):
        info = hub_api(token).model_info(repo, files_metadata=True)
    commit = str(info.sha)
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    weights_cap = limits.adapter_bytes if access.space else sys.maxsize  # Workspace.served_adapter's rule
    weights = next((f for f in (ADAPTER_WEIGHTS_FILENAME, ADAPTER_WEIGHTS_BIN_FILENAME) if f in sizes), None)
    caps = {
        ADAPTER_CONFIG_FILENAME: hub_limits.config_bytes,
        STEERING_JSON_FILENAME: hub_limits.config_bytes,
        STEERING_VECTOR_FILENAME: hub_limits.vector_bytes,
        **({weights: weights_cap} if weights else {}),
    }
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIXES[0]))  # an export's prefix: pruned and bounded with them
    folder, cache = work / ADAPTER_DIRNAME, work / ".download"
    folder.mkdir()
    try:
        with hub_errors(repo, access, "an adapter"):
            for name, cap in caps.items():
                if name in sizes:
                    got = download_small(repo, name, revision=commit, token=token, folder=cache, size=sizes[name],
                                         cap=cap)  # fmt: skip
                    shutil.copyfile(got, folder / name)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # huggingface_hub's own layout of the same files
    return folder, commit, [t for t in getattr(info, "tags", None) or [] if isinstance(t, str)]


def _read(workspace: Workspace, folder: Path, repo: str, access: Access, limits: Limits) -> ServedAdapter:
    """The downloaded folder read as the preview reads an adapter, steering.json first, so that a damaged one is said
    to be what is wrong; messages name the repo, not this server's folder."""
    from steer_core.adapter.record import read_record

    try:
        if (folder / STEERING_JSON_FILENAME).is_file():
            try:
                read_record(folder)
            except ValueError as err:
                said = str(err).replace(str(folder / STEERING_JSON_FILENAME), f"its {STEERING_JSON_FILENAME}")
                raise ValueError(
                    f"{repo}'s {STEERING_JSON_FILENAME} is damaged, so neither its recipe nor its author's report can "
                    f"be read ({said}); its author can export it again"
                ) from err
        return workspace.served_adapter(str(folder), access, limits)
    except ValueError as err:
        raise ValueError(str(err).replace(str(folder), repo)) from err


def own_vector(adapter: ServedAdapter, lm: LoadedModel) -> tuple[SteeringVector | None, str]:
    """(the hook vector the adapter stands for, or None; why the hook column is empty when it is None). The stored
    vector, not one built again from its recipe: that needs no SAE, and it is the vector the author verified."""
    from steer_core.sites import num_layers
    from steer_core.vectors.vector import check_fits_model

    vector = adapter.vector
    if vector is None and adapter.record is None:
        return None, (
            f"(no hook: {adapter.source} is a plain LoRA, not exported by steer_core, so it carries no steering vector "
            "to compare it with; its served text is beside the unsteered one)"
        )
    if vector is None:
        return None, f"(no hook: {adapter.source} has no {STEERING_VECTOR_FILENAME}, the hook vector it stands for)"
    check_fits_model(vector, int(lm.model.config.get_text_config().hidden_size), num_layers(lm.model))
    return vector, ""


def verify_here(lm: LoadedModel, opened: Opened, *, tokens: int = DEFAULT_VERIFY_TOKENS) -> dict[str, Any]:
    """The held-out report (check.verify) of the opened adapter against its stored vector, on this server and its
    dtype, as a dict (FidelityReport.to_dict(), the shape steering.json's `fidelity` has)."""
    from steer_core.check.verify import verify

    opened.ours("verifying")
    return verify(lm.model, lm.tokenizer, opened.files(), tokens=tokens, base_model=lm.base_model_id).to_dict()


def derive_targets() -> tuple[str, ...]:
    """The engines a shared adapter can be written for as it is: every target but the PEFT folder it already is and
    the merged ones (the whole model, which is not an adapter's to write here)."""
    from steer_core.adapter.targets import TARGETS

    return tuple(name for name, t in TARGETS.items() if name != "peft" and not t.merged)


def derive(lm: LoadedModel, opened: Opened, target: str) -> tuple[Path, SteeringRecord]:
    """The opened adapter written for `target` in a new work folder, with no refit: rank padded with zeros
    (fireworks), or llama.cpp's GGUF LoRA and control vector, by export's own writers. steering.json keeps the
    author's report (the function is the same) and gains `derived_from` (repo, commit, target) and a note that the
    card shows. (folder, its steering.json)."""
    from steer_core.adapter.build import BuiltAdapter, write_adapter, write_json
    from steer_core.adapter.card import model_card
    from steer_core.adapter.folder import read_folder
    from steer_core.adapter.targets import check_target, pad_rank
    from steer_core.export import write_target_files

    record = opened.ours("exporting it for another engine")
    if target not in derive_targets():
        raise ValueError(f"target {target!r} is not one of {', '.join(derive_targets())}")
    engine = check_target(target, record.mode, lm.model)  # a LoRA bias, or an architecture llama.cpp lacks
    source = opened.files()
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIXES[0]))
    out = work / ADAPTER_DIRNAME
    try:
        shutil.copytree(source, out)
        files = read_folder(out, ours=True).checked(lm.base_model_id)
        record, vector = files.steering()
        rank = record.rank
        if engine.min_rank > 1:
            from peft import LoraConfig

            built = BuiltAdapter(record.mode, LoraConfig.from_pretrained(str(out)), files.tensors,  # type: ignore[arg-type]
                                 list(record.target_modules))  # fmt: skip
            padded = pad_rank(built, engine.min_rank)
            write_adapter(padded, vector, out)
            rank, padding = padded.config.r, padded.notes[len(built.notes) :]
        else:
            padding = []
        written, notes = write_target_files(engine, lm, vector, out, record.skip_bos)
        derived = {"repo": opened.repo, "commit": opened.commit, "target": engine.name, "refit": False}
        record = record.replace(
            rank=rank,
            target=engine.name,
            serve=engine.how,
            target_files=tuple(written),
            notes=(
                *record.notes,
                *padding,
                *notes,
                f"derived from {opened.repo} at commit {opened.commit[:12]}: that adapter as it is, written for "
                f"{engine.name} with no refit; the fidelity report is its author's",
            ),
            files=tuple(sorted({p.name for p in out.iterdir()} | {STEERING_JSON_FILENAME, MODEL_CARD_FILENAME})),
            extra={**record.extra, "derived_from": derived},
        )
        write_json(out / STEERING_JSON_FILENAME, record.to_dict())
        (out / MODEL_CARD_FILENAME).write_text(model_card(record), encoding="utf-8")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out, record
