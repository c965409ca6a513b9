"""Push a verified adapter folder to the Hugging Face Hub in one commit. The token is never logged or stored."""

from __future__ import annotations

import json
import math
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


def push(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False) -> str:
    """create_repo + one upload_folder commit; returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    check_repo_id(repo_id)
    meta = check_publishable(folder)
    # The card names the repo it lives in, so users can copy the load snippet as is.
    (folder / MODEL_CARD_FILENAME).write_text(model_card(meta, repo_id), encoding="utf-8")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=f"steer_core adapter ({meta['mode']}, top-1 {meta['fidelity']['top1_agreement']:.1%})",
    )
    return str(url)
