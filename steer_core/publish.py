"""Push a verified adapter folder to the Hugging Face Hub in one commit. The token is never logged or stored."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from steer_core.adapter import check_tensors
from steer_core.card import model_card
from steer_core.constants import ADAPTER_WEIGHTS_FILENAME, MODEL_CARD_FILENAME, STEERING_JSON_FILENAME

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def check_repo_id(repo_id: str) -> str:
    if not _REPO_RE.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ValueError(f"repo id {repo_id!r} is not valid; use USER/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def check_publishable(folder: Path) -> dict:
    """Only verified, non-empty, finite adapters leave this machine."""
    from safetensors.torch import load_file

    meta_path = folder / STEERING_JSON_FILENAME
    if not meta_path.is_file():
        raise ValueError(f"{folder} has no {STEERING_JSON_FILENAME}; export it with steer_core first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    fidelity = meta.get("fidelity")
    if not fidelity or not all(math.isfinite(fidelity[k]) for k in ("top1_agreement", "kl_hook_adapter")):
        raise ValueError(f"{folder} was not verified (no finite fidelity report); refusing to push it")
    check_tensors(load_file(str(folder / ADAPTER_WEIGHTS_FILENAME)))
    return meta


class PushError(ValueError):
    """The Hub refused or failed a push: what happened, what was left on the Hub, and that the local adapter stays."""


def push(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False) -> str:
    """create_repo + one upload_folder commit (atomic on the Hub: all files or none); returns the repo URL.

    A failure becomes one PushError that never contains the token. A repo this call created is deleted again when
    the commit fails, so no empty repo is left behind; an existing repo keeps its earlier commits untouched.
    HF_ENDPOINT, when set, is the Hub to push to (as huggingface_hub reads it).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    check_repo_id(repo_id)
    meta = check_publishable(folder)
    # The card names the repo it lives in, so users can copy the load snippet as is.
    (folder / MODEL_CARD_FILENAME).write_text(model_card(meta, repo_id), encoding="utf-8")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    created, left = False, "nothing was pushed"
    try:
        try:
            url = str(api.create_repo(repo_id, private=private, exist_ok=False, repo_type="model"))
            created = True
        except HfHubHTTPError as err:
            if _status(err) != 409:  # 409: it exists already, and this push adds a commit to it
                raise
            url = f"{api.endpoint}/{repo_id}"
        try:
            api.upload_folder(
                folder_path=str(folder),
                repo_id=repo_id,
                repo_type="model",
                commit_message=f"steer_core adapter ({meta['mode']}, top-1 {meta['fidelity']['top1_agreement']:.1%})",
            )
        except Exception:
            left = "no commit was made"
            if created:
                left = _delete(api, repo_id)
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
    return url


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _delete(api, repo_id: str) -> str:
    try:
        api.delete_repo(repo_id, repo_type="model")
        return "the repo created for it was deleted again"
    except Exception:
        return f"the repo created for it ({repo_id}) is empty and could not be deleted: delete it by hand"
