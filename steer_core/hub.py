"""The Hub as one visitor of a public Space meets it: whose token each request carries, and how large a model or an
SAE is before any of it downloads.

On a Space, HF_TOKEN is the owner's secret, there so the Space can run the gated models its owner curated. Every
library that reads the Hub (huggingface_hub, transformers, sae_lens) sends it on its own when it is in the
environment, so on a Space `take_owner_token` takes it out at startup and `Access` hands it back only for the repos the
owner curated. A visitor's own token (their Hugging Face sign-in, or one they type) serves that visitor; every other
request carries no token. Locally the user is the owner, and huggingface_hub's own default applies throughout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer_core.constants import ADAPTER_WEIGHTS_BIN_FILENAME, ADAPTER_WEIGHTS_FILENAME

log = logging.getLogger(__name__)

OWNER_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # both are read by huggingface_hub (the second is legacy)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz", ".gguf")
NO_TOKEN = False  # huggingface_hub's token=False: send no token, not even HF_TOKEN


def on_space() -> bool:
    """Whether this process runs as a Hugging Face Space (as Gradio decides it: SYSTEM=spaces and a SPACE_ID)."""
    return os.environ.get("SYSTEM") == "spaces" and bool(os.environ.get("SPACE_ID"))


def take_owner_token() -> str | None:
    """On a Space: remove the owner's token from the environment, so that no library sends it by itself, and return
    it for `Access`. Elsewhere: leave the environment alone and return None (huggingface_hub's default applies)."""
    if not on_space():
        return None
    tokens = [os.environ.pop(var, None) for var in OWNER_TOKEN_VARS]
    return next((t.strip() for t in tokens if t and t.strip()), None)


@dataclass(frozen=True)
class Access:
    """Whose token one request's Hub calls carry.

    `space`: the app runs as a public Space, so the owner's token (`owner`) reads only curated repos and never writes.
    `visitor`: the token of whoever made the request (OAuth sign-in or typed), used for their reads and their pushes.
    """

    space: bool = False
    owner: str | None = field(default=None, repr=False)
    visitor: str | None = field(default=None, repr=False)

    def read_token(self, repo_id: str, *, curated: bool) -> str | bool | None:
        """The token to read `repo_id` with: None (huggingface_hub's default) locally; on a Space the owner's for a
        repo the owner curated, else the visitor's own, else none at all."""
        if not self.space:
            return self.visitor or None
        if curated and self.owner:
            return self.owner
        return self.visitor or NO_TOKEN

    def write_token(self) -> str:
        """The token a push uses: the visitor's; locally also HF_TOKEN or the saved login. Never the Space owner's."""
        if self.visitor:
            return self.visitor
        if not self.space:
            from huggingface_hub import get_token

            if token := get_token():
                return token
        raise PermissionError(
            "pushing needs your own Hugging Face token: sign in with Hugging Face, or paste a write token"
            + ("" if self.space else ", or set HF_TOKEN")
        )

    def shared_read_token(self, repo_id: str, *, curated: bool) -> str | bool | None:
        """The token for reads whose result every visitor shares (registry SAEs, which sae_lens keeps in the shared Hub
        cache): never a visitor's own, or their private or gated files would serve everyone after them."""
        return dataclasses.replace(self, visitor=None).read_token(repo_id, curated=curated)

    @property
    def cache_dir(self) -> str | None:
        """Where reads with the visitor's own token download to on a Space: a folder of theirs, emptied after each
        load (`forget_download`). huggingface_hub serves a cached file when the Hub refuses a request (401, 403,
        404), so a private or gated file in the shared cache would reach whoever asks next. None: the shared cache."""
        if not (self.space and self.visitor):
            return None
        from huggingface_hub import constants

        return str(Path(constants.HF_HUB_CACHE).parent / "hub-visitors" / self.reader.removeprefix("visitor:"))

    @property
    def reader(self) -> str:
        """Who reads, for caches that must not hand one visitor's private repo to another: '' for everyone who reads
        without a token of their own, else a digest of the visitor's token (never the token itself)."""
        return "" if not self.visitor else "visitor:" + hashlib.sha256(self.visitor.encode()).hexdigest()[:16]

    @property
    def local_paths(self) -> bool:
        """Whether visitors may name files on this machine (model, SAE and adapter folders): not on a public Space,
        where they would read the server's disk (other visitors' downloads among them)."""
        return not self.space


@dataclass(frozen=True)
class RepoSize:
    """How much a Hub model or SAE holds, read from the Hub's metadata without downloading its weights."""

    repo_id: str
    parameters: int  # elements of every weight tensor
    how: str  # where the count came from: the Hub's own count, safetensors headers, or file sizes (an estimate)
    private: bool = False
    gated: bool = False


def hub_api(token: str | bool | None) -> Any:
    """huggingface_hub's client for the Hub HF_ENDPOINT names (read now, not at import: tests and scripts set it)."""
    from huggingface_hub import HfApi, constants

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or constants.ENDPOINT, token=token)


def model_size(repo_id: str, *, token: str | bool | None = None, revision: str | None = None) -> RepoSize:
    """Parameters of a Hub model: the Hub's own count when it has one, else the safetensors headers (HTTP range
    requests of a few kB), else the weight files' sizes at 2 bytes a parameter (an over-estimate for float32 files).

    Raises huggingface_hub's errors as they are (RepositoryNotFoundError for a private or missing repo without the
    right token, GatedRepoError, OfflineModeIsEnabled); callers turn them into their messages.
    """
    from huggingface_hub.errors import NotASafetensorsRepoError

    api = hub_api(token)
    info = api.model_info(repo_id, revision=revision, files_metadata=True)
    private, gated = bool(info.private), bool(info.gated)
    if gated:  # its metadata is public; its files are not, and a refused download would fall back to the cache
        api.auth_check(repo_id)
    if info.safetensors is not None and info.safetensors.total:
        return RepoSize(repo_id, int(info.safetensors.total), "the Hub's safetensors count", private, gated)
    try:
        meta = api.get_safetensors_metadata(repo_id, revision=revision)
        return RepoSize(repo_id, sum(meta.parameter_count.values()), "safetensors headers", private, gated)
    except NotASafetensorsRepoError:
        pass
    stored = sum(s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(WEIGHT_SUFFIXES))
    if not stored:
        raise LookupError(f"{repo_id} has no weight files this app can size ({', '.join(WEIGHT_SUFFIXES)})")
    return RepoSize(repo_id, stored // 2, "file sizes (estimated at 2 bytes a parameter)", private, gated)


def sae_size(release: str, sae_id: str, *, token: str | bool | None = None) -> RepoSize:
    """Weights of a registry SAE, from the files under its path in its repo: safetensors headers give the exact
    count; numpy files (Gemma Scope) are float32; other files are counted at 2 bytes a weight."""
    from huggingface_hub import RepoFolder

    from steer_core.sae.feature import registry_entry

    entry = registry_entry(release)
    if sae_id not in entry.saes_map:
        raise LookupError(f"sae_id {sae_id!r} is not in release {release!r}")
    repo_id, path = entry.repo_id, entry.saes_map[sae_id]
    api = hub_api(token)
    found = api.get_paths_info(repo_id, [path], expand=True)
    if not found:
        raise LookupError(f"{repo_id} has nothing at {path!r} (release {release!r}, sae_id {sae_id!r})")
    files = list(api.list_repo_tree(repo_id, path, recursive=True)) if isinstance(found[0], RepoFolder) else found
    elements, how = 0, "safetensors headers"
    for f in files:
        if isinstance(f, RepoFolder) or not f.path.endswith(WEIGHT_SUFFIXES):
            continue
        if f.path.endswith(".safetensors"):
            elements += sum(api.parse_safetensors_file_metadata(repo_id, f.path).parameter_count.values())
        else:
            elements += (f.size or 0) // (4 if f.path.endswith(".npz") else 2)
            how = "safetensors headers and file sizes"
    if not elements:
        raise LookupError(f"{repo_id}/{path} holds no weight files this app can size")
    return RepoSize(f"{repo_id}/{path}", elements, how)


def adapter_size(repo_id: str, *, token: str | bool | None = None) -> int:
    """Bytes of an adapter repo's weights (PEFT's file names), read from the Hub's metadata before downloading."""
    from huggingface_hub import RepoFile

    names = [ADAPTER_WEIGHTS_FILENAME, ADAPTER_WEIGHTS_BIN_FILENAME]
    found = hub_api(token).get_paths_info(repo_id, names)
    sizes = [f.size or 0 for f in found if isinstance(f, RepoFile)]
    if not sizes:
        raise LookupError(f"{repo_id} has no {' or '.join(names)}: not a PEFT adapter repo")
    return max(sizes)


def forget_download(repo_id: str, cache_dir: str | None) -> None:
    """Remove a repo's files from a visitor's own download folder (Access.cache_dir), once what it held is loaded."""
    if cache_dir:
        shutil.rmtree(Path(cache_dir) / f"models--{repo_id.replace('/', '--')}", ignore_errors=True)


def trim_cache(limit: int, keep: set[str]) -> list[str]:
    """Keep the shared Hub cache under `limit` bytes by deleting the least recently used repos not in `keep` (the
    curated ones, and what is loaded): on a Space, visitors' downloads would otherwise fill its disk."""
    from huggingface_hub import constants, scan_cache_dir

    if not Path(constants.HF_HUB_CACHE).is_dir():
        return []
    info = scan_cache_dir(constants.HF_HUB_CACHE)
    total, removed = info.size_on_disk, []
    for repo in sorted(info.repos, key=lambda r: r.last_accessed):
        if total <= limit:
            break
        if repo.repo_id in keep:
            continue
        shutil.rmtree(repo.repo_path, ignore_errors=True)  # the whole repo: its blobs, snapshots and refs
        total -= repo.size_on_disk
        removed.append(repo.repo_id)
    if removed:
        log.info("removed %s from the Hub cache to keep it under %d bytes", removed, limit)
    return removed


def download_sae(release: str, sae_id: str, *, token: str | bool | None = None) -> None:
    """Fetch a registry SAE's files into the Hub cache, so that sae_lens' own load then finds them there. Done apart
    from the load because the load must hold torch's global RNG (steer_core.ui.workspace), and a download must not."""
    from huggingface_hub import snapshot_download

    from steer_core.sae.feature import registry_entry

    entry = registry_entry(release)
    path = entry.saes_map[sae_id]
    snapshot_download(entry.repo_id, allow_patterns=[path, f"{path}/*"], token=token)


def local_parameters(path: str | Path) -> int | None:
    """Parameters of a local model folder (its safetensors headers) or GGUF file, without loading it; None when the
    weights are in another format."""
    path = Path(path)
    if path.suffix == ".gguf":
        import gguf

        return sum(int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    return total
