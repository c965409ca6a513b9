"""Push a verified adapter folder to the Hugging Face Hub in one commit. The token is never logged or stored.

A push into a repo that exists is planned first (`plan_push`) and needs the user's say-so: it replaces our files there,
removes only the files an earlier export of ours wrote and this one does not (a GGUF of a llama.cpp export, say), and
keeps everything else, a README the repo's owner wrote included (our card then goes up as STEERING.md).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer_core.adapter.build import check_tensors
from steer_core.adapter.card import model_card
from steer_core.adapter.folder import read_folder
from steer_core.adapter.record import SteeringRecord
from steer_core.constants import (
    ADAPTER_CONFIG_FILENAME,
    ADAPTER_WEIGHTS_FILENAME,
    CARD_BESIDE_README,
    CONTROL_VECTOR_FILENAME,
    GGUF_LORA_FILENAME,
    MODEL_CARD_FILENAME,
    MODELFILE_FILENAME,
    STEERING_JSON_FILENAME,
    STEERING_VECTOR_FILENAME,
)
from steer_core.hub import hub_api

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# What exports wrote before steering.json listed its files: an earlier export's files are these, where it has them.
EXPORT_FILES = (
    ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME, STEERING_JSON_FILENAME, STEERING_VECTOR_FILENAME,
    MODEL_CARD_FILENAME, GGUF_LORA_FILENAME, CONTROL_VECTOR_FILENAME, MODELFILE_FILENAME,
)  # fmt: skip


def check_repo_id(repo_id: str) -> str:
    if not _REPO_RE.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ValueError(f"repo id {repo_id!r} is not valid; use USER/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def check_publishable(folder: Path) -> SteeringRecord:
    """Only verified, non-empty, finite adapters leave this machine."""
    if not (folder / STEERING_JSON_FILENAME).is_file():
        raise ValueError(f"{folder} has no {STEERING_JSON_FILENAME}; export it with steer_core first")
    files = read_folder(folder)
    record = files.steering_record()
    fidelity = record.fidelity
    if not fidelity or not all(math.isfinite(fidelity[k]) for k in ("top1_agreement", "kl_hook_adapter")):
        raise ValueError(f"{folder} was not verified (no finite fidelity report); refusing to push it")
    check_tensors(files.tensors)
    return record


class PushError(ValueError):
    """The Hub refused or failed a push: what happened, what was left on the Hub, and that the local adapter stays."""


class RepoExistsError(PushError):
    """The repo exists and the push was not allowed to update it; `plan` says what updating would do."""

    def __init__(self, plan: PushPlan) -> None:
        super().__init__(
            plan.describe() + " To push into it, confirm the update (--update-existing on the command line)."
        )
        self.plan = plan


@dataclass(frozen=True)
class PushPlan:
    """What a push does to its repo, decided before anything is written."""

    repo_id: str
    exists: bool
    private: bool | None  # the existing repo's visibility; None for a repo the push creates
    upload: dict[str, str]  # name in the repo -> file in the adapter folder
    replace: tuple[str, ...] = ()  # files already in the repo that this push overwrites
    delete: tuple[str, ...] = ()  # files an earlier export of ours wrote and this one does not
    keep: tuple[str, ...] = ()  # the repo's other files: not ours, untouched

    def describe(self) -> str:
        if not self.exists:
            return f"{self.repo_id} does not exist yet: this push creates it with {len(self.upload)} files."
        visibility = {True: " (private)", False: " (public)", None: ""}[self.private]
        parts = [f"{self.repo_id} exists already{visibility}."]
        if self.replace:
            parts.append(f"Pushing into it replaces {', '.join(self.replace)}.")
        if self.delete:
            parts.append(f"It removes {', '.join(self.delete)}, which an earlier export wrote and this one does not.")
        if self.keep:
            parts.append(f"It keeps {', '.join(self.keep)}.")
        if CARD_BESIDE_README in self.upload:
            parts.append(f"The repo's own README stays; the adapter's card goes up as {CARD_BESIDE_README}.")
        return " ".join(parts)


@dataclass(frozen=True)
class PushResult:
    url: str
    plan: PushPlan
    private: bool  # the repo's visibility after the push, as the Hub reports it

    def describe(self, asked_private: bool) -> str:
        """For the user, after the URL: new or updated, what changed there, and the repo's real visibility."""
        parts = [f"{'updated' if self.plan.exists else 'new'} {'private' if self.private else 'public'} repo"]
        if self.plan.exists and self.plan.delete:
            parts.append(f"removed {', '.join(self.plan.delete)} (from an earlier export)")
        if self.plan.exists and self.plan.keep:
            parts.append(f"kept {', '.join(self.plan.keep)}")
        if CARD_BESIDE_README in self.plan.upload:
            parts.append(f"its own README kept, the card is {CARD_BESIDE_README}")
        if asked_private and not self.private:
            parts.append(
                f"⚠️ {self.plan.repo_id} is PUBLIC: it existed as a public repo, and 'private' applies only to a repo "
                "the push creates; make it private in its settings on the Hub if it should be"
            )
        return "; ".join(parts)


def check_push_target(repo_id: str, *, token: str | None, update_existing: bool) -> None:
    """Before a long export whose end is a push: refuse a repo that exists, unless updating it was asked for."""
    from huggingface_hub.errors import RepositoryNotFoundError

    check_repo_id(repo_id)
    try:
        hub_api(token).repo_info(repo_id, repo_type="model")
    except RepositoryNotFoundError:
        return
    if not update_existing:
        raise RepoExistsError(PushPlan(repo_id, True, None, {}))


def plan_push(folder: str | Path, repo_id: str, *, token: str | None = None, api: Any = None) -> PushPlan:
    """Look at the repo (if it exists) and decide what a push of `folder` writes, replaces, removes and keeps."""
    from huggingface_hub.errors import RepositoryNotFoundError

    folder = Path(folder)
    api = api or hub_api(token)
    ours = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    try:
        info = api.repo_info(repo_id, repo_type="model")
    except RepositoryNotFoundError:
        return PushPlan(repo_id, False, None, {name: name for name in ours})
    files = set(api.list_repo_files(repo_id, repo_type="model"))
    earlier = _earlier_export_files(api, repo_id, files)
    upload = {name: name for name in ours}
    if MODEL_CARD_FILENAME in files and MODEL_CARD_FILENAME not in earlier:
        upload[CARD_BESIDE_README] = upload.pop(MODEL_CARD_FILENAME)
    return PushPlan(
        repo_id,
        True,
        bool(info.private),
        upload,
        replace=tuple(sorted(files & set(upload))),
        delete=tuple(sorted((earlier & files) - set(upload))),
        keep=tuple(sorted(files - earlier - set(upload) - {".gitattributes"})),
    )


def _earlier_export_files(api: Any, repo_id: str, files: set[str]) -> set[str]:
    """The files an earlier steer_core export put in the repo: those its steering.json lists, or (exports from before
    that list) our usual names present there. None when the repo holds no export of ours."""
    if STEERING_JSON_FILENAME not in files:
        return set()
    with tempfile.TemporaryDirectory() as tmp:
        path = api.hf_hub_download(repo_id, STEERING_JSON_FILENAME, repo_type="model", cache_dir=tmp)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            record = SteeringRecord.from_dict(data) if "steer_core_version" in data else None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
            return set()
    if record is None:
        return set()
    return set(record.files) if record.files is not None else set(EXPORT_FILES) & files


def push(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    update_existing: bool = False,
) -> PushResult:
    """Plan, then create_repo (when new) + one commit that adds this export's files and removes an earlier export's
    leftovers (atomic on the Hub: all of it or nothing).

    A repo that exists is only updated with `update_existing` (else RepoExistsError, with the plan). A failure
    becomes one PushError that never contains the token; a repo this call created is deleted again when the commit
    fails, so no empty repo is left behind; an existing repo keeps its earlier commits untouched. HF_ENDPOINT, when
    set, is the Hub to push to (as huggingface_hub reads it).
    """
    from huggingface_hub import CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    check_repo_id(repo_id)
    record = check_publishable(folder)
    api = hub_api(token)
    created, left = False, "nothing was pushed"
    try:
        plan = plan_push(folder, repo_id, api=api)
        if plan.exists and not update_existing:
            raise RepoExistsError(plan)
        # The card names the repo it lives in, so users can copy the load snippet as is.
        (folder / MODEL_CARD_FILENAME).write_text(model_card(record, repo_id), encoding="utf-8")
        with tempfile.TemporaryDirectory(prefix="steer-push-") as staged:
            operations = _stage(folder, plan, record, Path(staged))
            operations += [CommitOperationDelete(path_in_repo=name) for name in plan.delete]
            if not plan.exists:
                try:
                    api.create_repo(repo_id, private=private, exist_ok=False, repo_type="model")
                    created = True
                except HfHubHTTPError as err:
                    if _status(err) == 409:  # made meanwhile, or private where this token cannot see it
                        raise PushError(f"{repo_id} exists, but this token cannot read it: {left}") from err
                    raise
            try:
                api.create_commit(
                    repo_id,
                    operations,
                    commit_message=f"steer_core adapter ({record.mode}, top-1 {record.top1:.1%})",
                    repo_type="model",
                )
            except Exception:
                left = "no commit was made"
                if created:
                    left = _delete(api, repo_id)
                raise
        info = api.repo_info(repo_id, repo_type="model")
    except PushError:
        raise
    except HfHubHTTPError as err:
        status = _status(err)
        if status in (401, 403):
            why = f"the Hub refused the token ({status}): it is expired, revoked or cannot write to {repo_id}"
        else:
            why = f"the Hub failed the push ({status}: {_first_line(err)})"
        raise PushError(f"{why}; {left}. The adapter stays at {folder}; push it again when that is fixed.") from err
    except Exception as err:  # transport errors: OSError, or httpx's own, which are not OSErrors
        if not isinstance(err, OSError) and not type(err).__module__.startswith(("httpx", "httpcore")):
            raise
        unreachable = f"could not reach the Hub ({type(err).__name__})"
        raise PushError(f"{unreachable}; {left}. The adapter stays at {folder}.") from err
    return PushResult(f"{api.endpoint}/{repo_id}", plan, bool(info.private))


def _stage(folder: Path, plan: PushPlan, record: SteeringRecord, staged: Path) -> list[Any]:
    """Copies of the files as they go up: steering.json lists them, so the next push knows which were ours."""
    from huggingface_hub import CommitOperationAdd

    operations = []
    for name, local in sorted(plan.upload.items()):
        target = staged / name
        if local == STEERING_JSON_FILENAME:
            listed = record.replace(files=tuple(sorted(plan.upload))).to_dict()
            target.write_text(json.dumps(listed, indent=2), encoding="utf-8")
        else:
            shutil.copyfile(folder / local, target)
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(target)))
    return operations


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _delete(api: Any, repo_id: str) -> str:
    try:
        api.delete_repo(repo_id, repo_type="model")
        return "the repo created for it was deleted again"
    except Exception:
        return f"the repo created for it ({repo_id}) is empty and could not be deleted: delete it by hand"
