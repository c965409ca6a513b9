"""The Hub as one visitor of a public Space meets it: whose token each request carries, and what a model, an SAE or
an adapter will cost before any of it downloads.

On a Space, HF_TOKEN is the owner's secret, there so the Space can run the gated models its owner curated. Every
library that reads the Hub (huggingface_hub, transformers, sae_lens) sends it on its own when it is in the
environment, so on a Space `take_owner_token` takes it out at startup and `Access` hands it back only for the repos the
owner curated. A visitor's own token (their Hugging Face sign-in, or one they type) serves that visitor; every other
request carries no token. Locally the user is the owner, and huggingface_hub's own default applies throughout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer_core.constants import ADAPTER_WEIGHTS_BIN_FILENAME, ADAPTER_WEIGHTS_FILENAME

log = logging.getLogger(__name__)

OWNER_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # both are read by huggingface_hub (the second is legacy)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz", ".gguf")
NO_TOKEN = False  # huggingface_hub's token=False: send no token, not even HF_TOKEN
REPO_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-/")
REPO_ID_MAX = 96 + 1 + 96  # namespace/name, each at most 96 characters (huggingface_hub's validate_repo_id)
# Files at a model repo's root that no load reads (transformers reads its config, weights and tokenizer files there):
# they are not capped, so a model card with large images does not refuse a model.
_NEVER_READ_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".pdf", ".mp4", ".gitattributes")
_NEVER_READ_PREFIXES = ("LICENSE", "NOTICE", "USE_POLICY")
_TEMPLATE_DIR = "additional_chat_templates/"  # transformers' CHAT_TEMPLATE_DIR: the one folder a tokenizer reads


def on_space() -> bool:
    """Whether this process runs as a Hugging Face Space (as Gradio decides it: SYSTEM=spaces and a SPACE_ID)."""
    return os.environ.get("SYSTEM") == "spaces" and bool(os.environ.get("SPACE_ID"))


def take_owner_token(public: bool | None = None) -> str | None:
    """On a public server (a Space by default; steer_core.ui.exposure decides for the app): remove the owner's token
    from the environment, so that no library sends it by itself, return it for `Access`, and have huggingface_hub
    send no token it finds by itself (a saved login) either. Elsewhere: leave the environment alone and return None
    (huggingface_hub's default applies)."""
    if not (on_space() if public is None else public):
        return None
    tokens = [os.environ.pop(var, None) for var in OWNER_TOKEN_VARS]
    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"  # read when huggingface_hub is first imported
    from huggingface_hub import constants

    constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True  # and here, where it was imported already
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


@dataclass(frozen=True)
class HubLimits:
    """What a repo a visitor names may make this server download besides its weights (which the memory budget bounds
    through the parameter count), read from the Hub's file listing before anything downloads."""

    config_bytes: int = 2**20  # config.json, an SAE's cfg.json, adapter_config.json, steering.json: real ones are kB
    file_bytes: int = 64 * 2**20  # each other file a load reads: tokenizer.json is the largest (Gemma 3's, 33 MB)
    text_bytes: int = 128 * 2**20  # all of those together
    vector_bytes: int = 16 * 2**20  # an adapter's steering_vector.safetensors: as an uploaded vector file
    # The least a repo's weights may weigh per parameter its config declares: 4-bit weights ship half a byte. Less
    # means transformers would make up (and initialise) the missing weights, at the full size, in memory.
    min_bytes_per_parameter: float = 0.5

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not value > 0:
                raise ValueError(f"hub limit {name} must be positive, got {value!r}")


HUB_LIMITS = HubLimits()


def check_repo_id(name: str, what: str = "a Hub model id") -> str:
    """`name` when it is a Hub repo id (namespace/name of letters, digits, '_', '.', '-'); else a ValueError that says
    what is valid. Checked before any lock, cache entry or request is made for the name."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    shown = name if len(name) <= 80 else f"{name[:80]}... ({len(name)} characters)"
    valid = f"{what} is namespace/name: letters, digits, '_', '.' and '-', at most 96 characters each"
    if not name or len(name) > REPO_ID_MAX or not REPO_ID_CHARS.issuperset(name):
        raise ValueError(f"{shown!r} is not {what}: {valid}")
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ValueError(f"{shown!r} is not {what}: {valid} ({err})") from err
    return name


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


# ---- admission: what a repo will cost, from its listing and its config, before its weights download ----


@dataclass(frozen=True)
class Admission:
    """A Hub model admitted on what it will cost: the commit that was checked (load exactly that one) and the
    parameters it will take, the larger of what its config declares and what its files ship."""

    repo_id: str
    revision: str  # the commit sha the listing and the config were read at
    parameters: int  # admitted: max(declared, shipped)
    declared: int  # the model its config.json builds (parameters and buffers), counted on the meta device
    shipped: int  # what the weight files hold (model_size's ways), or their bytes / 4 where that is more
    how: str
    vocab: int  # the text model's vocabulary (an export's working memory grows with it)
    private: bool = False
    gated: bool = False


def _never_read(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(_NEVER_READ_SUFFIXES) or name.upper().startswith(_NEVER_READ_PREFIXES)


def model_files(sizes: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(the weight files transformers downloads, every other file a load may read), each {path: bytes}, from a repo
    listing: root-level safetensors (else root-level .bin) are the weights; every other root-level file but docs and
    images, and the extra chat templates, may be read. Files in other folders (Llama's original/consolidated.00.pth)
    are never downloaded by a load, so they cost nothing."""
    root = {p: n for p, n in sizes.items() if "/" not in p}
    weights = {p: n for p, n in root.items() if p.endswith(".safetensors")}
    weights = weights or {p: n for p, n in root.items() if p.endswith(".bin")}
    read = {p: n for p, n in root.items() if not p.endswith(WEIGHT_SUFFIXES) and not _never_read(p)}
    read |= {p: n for p, n in sizes.items() if p.startswith(_TEMPLATE_DIR)}
    return weights, read


def check_files(repo_id: str, files: dict[str, int], limits: HubLimits, *, configs: tuple[str, ...] = ()) -> None:
    """Each file within its cap (`configs` within config_bytes, others within file_bytes) and all within text_bytes;
    else a ValueError naming the file, its size and the cap."""
    from steer_core.hardware import format_bytes

    for path, size in sorted(files.items()):
        cap = limits.config_bytes if path.rsplit("/", 1)[-1] in configs else limits.file_bytes
        if size > cap:
            raise ValueError(
                f"{repo_id}'s {path} is {format_bytes(size)}: this server downloads such a file up to "
                f"{format_bytes(cap)} (real ones are far smaller); pick another repo"
            )
    if (total := sum(files.values())) > limits.text_bytes:
        raise ValueError(
            f"{repo_id}'s files besides its weights come to {format_bytes(total)} ({len(files)} files): this server "
            f"downloads up to {format_bytes(limits.text_bytes)} of them; pick another repo"
        )


def download_small(
    repo_id: str, path: str, *, revision: str, token: str | bool | None, folder: str | Path, size: int, cap: int
) -> Path:
    """One small file of a repo at `revision`, into `folder` (a temporary folder of the caller's: nothing of it stays
    in a cache another visitor reads), after the listing said it is at most `cap` bytes."""
    from huggingface_hub import hf_hub_download

    from steer_core.hardware import format_bytes

    if size > cap:
        raise ValueError(f"{repo_id}'s {path} is {format_bytes(size)}: this server reads it up to {format_bytes(cap)}")
    return Path(hf_hub_download(repo_id, path, revision=revision, token=token, cache_dir=str(folder)))


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} is not valid JSON ({type(err).__name__}: {str(err)[:120]})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} is not a JSON object")
    return data


# The largest value each setting of a config may declare before a model is built from it: far above every model this
# app could hold, and low enough that building the model on the meta device (no memory: shapes only, ~0.03 s for a
# 6.7B Llama, 1.3 s the first time as transformers imports the family's code) cannot itself take long.
_CONFIG_BOUNDS = {
    "layers": (("num_hidden_layers", "n_layer", "num_layers", "n_layers"), 1024),
    "widths": (
        (
            "hidden_size",
            "n_embd",
            "d_model",
            "intermediate_size",
            "n_inner",
            "ffn_dim",
            "moe_intermediate_size",
            "head_dim",
            "d_ff",
        ),
        2**17,
    ),
    "heads": (("num_attention_heads", "num_key_value_heads", "n_head", "num_heads"), 2**12),
    "vocabulary": (("vocab_size",), 2**22),
    "experts": (("num_local_experts", "num_experts", "n_routed_experts"), 1024),
    "positions": (("max_position_embeddings", "n_positions", "n_ctx", "sliding_window"), 2**24),
}
_MAX_MODULE_BLOCKS = 2**16  # layers x experts: the modules the meta build makes one by one


def check_config_bounds(config: dict[str, Any], where: str) -> None:
    """A cheap guard before a config builds anything: every size setting (nested configs too) within _CONFIG_BOUNDS."""
    layers = experts = 1
    stack: list[tuple[dict[str, Any], int]] = [(config, 0)]
    while stack:
        node, depth = stack.pop()
        for key, value in node.items():
            if isinstance(value, dict) and depth < 4:
                stack.append((value, depth + 1))
                continue
            for what, (keys, bound) in _CONFIG_BOUNDS.items():
                if key not in keys or value is None:
                    continue
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= bound:
                    raise ValueError(
                        f"{where} declares {key}={str(value)[:40]}: this server builds models with {what} up to "
                        f"{bound:,} only"
                    )
                layers = max(layers, value) if what == "layers" else layers
                experts = max(experts, value) if what == "experts" else experts
    if layers * experts > _MAX_MODULE_BLOCKS:
        raise ValueError(
            f"{where} declares {layers} layers of {experts} experts: this server builds up to "
            f"{_MAX_MODULE_BLOCKS:,} such blocks"
        )


def declared_parameters(folder: Path, where: str) -> tuple[int, int]:
    """(parameters and buffers' elements, vocabulary) of the model `folder`/config.json builds, counted by building it
    on the meta device: shapes only, no memory, exactly what AutoModelForCausalLM.from_pretrained would allocate.
    Never with remote code. torch.device("meta") and not accelerate's init_empty_weights, which patches nn.Module for
    every thread while it runs (a concurrent load would build its model empty)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    check_config_bounds(read_json_file(folder / "config.json", f"{where}'s config.json"), f"{where}'s config.json")
    start = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as err:  # transformers raises many kinds for a config it cannot build
        said = str(err).replace(str(folder), "config.json")[:160]  # not this server's temp folder
        raise ValueError(
            f"{where}'s config.json does not describe a causal language model transformers builds without remote code "
            f"({type(err).__name__}: {said})"
        ) from err
    count = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    vocab = int(getattr(config.get_text_config(), "vocab_size", 0) or 0)
    log.info("%s's config builds %d parameters (meta build %.2f s)", where, count, time.perf_counter() - start)
    return int(count), vocab


def admit_model(
    repo_id: str,
    *,
    token: str | bool | None = None,
    limits: HubLimits = HUB_LIMITS,
    check: Callable[[int], object] | None = None,
) -> Admission:
    """A Hub model's cost before its weights download: the listing with every file's size (at the commit it is at,
    which the load must then pin), each file a load reads within `limits`, its weights sized (model_size's ways), its
    config.json read with a size cap and built on the meta device. `check(parameters)` (a budget's, raising
    ValueError) sees the shipped count first, so a model too large as shipped is refused before its config is read,
    and then the admitted count. Refused (ValueError) when a file is over its cap, or when its weights are far smaller
    than its config declares: transformers would allocate and initialise the missing ones.

    Raises huggingface_hub's errors as model_size does."""
    from steer_core.hardware import format_bytes

    api = hub_api(token)
    info = api.model_info(repo_id, files_metadata=True)
    private, gated = bool(info.private), bool(info.gated)
    if gated:
        api.auth_check(repo_id)
    sha = str(info.sha)
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    if "config.json" not in sizes:
        raise ValueError(f"{repo_id} has no config.json: not a transformers model repo")
    weights, read = model_files(sizes)
    check_files(repo_id, read, limits, configs=("config.json",))
    stored = sum(weights.values())
    shipped = _shipped(api, repo_id, info, sha, sizes)
    counted = max(shipped.parameters, stored // 4)  # 4 bytes a parameter at most: more bytes are downloaded anyway
    if check is not None:
        check(counted)
    with tempfile.TemporaryDirectory(prefix="steer-config-") as tmp:
        path = download_small(
            repo_id, "config.json", revision=sha, token=token, folder=tmp, size=sizes["config.json"],
            cap=limits.config_bytes,
        )  # fmt: skip
        declared, vocab = declared_parameters(path.parent, repo_id)
    if stored < declared * limits.min_bytes_per_parameter:
        raise ValueError(
            f"{repo_id}'s config.json declares {declared / 1e9:.2f}B parameters, but its weight files hold "
            f"{format_bytes(stored)} (at least {format_bytes(declared * limits.min_bytes_per_parameter)} even in "
            "4-bit): transformers would make up the missing weights in memory; this server loads only repos that "
            "ship their weights"
        )
    parameters = max(declared, counted)
    if check is not None:
        check(parameters)
    how = "its config.json (built on the meta device)" if parameters == declared else shipped.how
    return Admission(repo_id, sha, parameters, declared, counted, how, vocab, private, gated)


def _shipped(api: Any, repo_id: str, info: Any, sha: str, sizes: dict[str, int]) -> RepoSize:
    from huggingface_hub.errors import NotASafetensorsRepoError

    if info.safetensors is not None and info.safetensors.total:
        return RepoSize(repo_id, int(info.safetensors.total), "the Hub's safetensors count")
    try:
        meta = api.get_safetensors_metadata(repo_id, revision=sha)
        return RepoSize(repo_id, sum(meta.parameter_count.values()), "safetensors headers")
    except NotASafetensorsRepoError:
        pass
    stored = sum(n for p, n in sizes.items() if p.endswith(WEIGHT_SUFFIXES))
    return RepoSize(repo_id, stored // 2, "file sizes (estimated at 2 bytes a parameter)")


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


@dataclass(frozen=True)
class SAEAdmission:
    """A registry SAE admitted before its weights download: the commit checked, its weights, and what its config
    (and weight headers) say it reads."""

    name: str  # "release / sae_id"
    repo_id: str
    path: str  # its file or folder in the repo
    revision: str
    elements: int  # weights: the headers' count, or the files' bytes / 4 where that is more
    d_in: int | None  # None where neither a config nor a header says (numpy weights without a config)
    layer: int | None


_SAE_CONFIGS = ("cfg.json", "config.json")  # sae_lens' own format; Gemma Scope 2's
_D_IN_TENSORS = {"w_enc": 0, "W_enc": 0, "w_dec": 1, "W_dec": 1}  # which axis of which weight is d_in


def admit_sae(
    release: str,
    sae_id: str,
    *,
    token: str | bool | None = None,
    limits: HubLimits = HUB_LIMITS,
    d_model: int | None = None,
    n_layers: int | None = None,
) -> SAEAdmission:
    """A registry SAE's cost and fit before its weights download: every file under its path listed with its size at
    one commit (weights sized from their headers, every other file within `limits`), its config read with a size cap,
    and, given the model's `d_model` and `n_layers`, its d_in and hook layer checked against them (a ValueError, as
    feature.check_fits words it, before anything large downloads)."""
    from huggingface_hub import RepoFolder

    from steer_core.sae.feature import registry_entry

    entry = registry_entry(release)
    if sae_id not in entry.saes_map:
        raise LookupError(f"sae_id {sae_id!r} is not in release {release!r}")
    repo_id, path, name = entry.repo_id, entry.saes_map[sae_id], f"{release} / {sae_id}"
    api = hub_api(token)
    sha = str(api.model_info(repo_id).sha)
    found = api.get_paths_info(repo_id, [path], expand=True, revision=sha)
    if not found:
        raise LookupError(f"{repo_id} has nothing at {path!r} (release {release!r}, sae_id {sae_id!r})")
    listed = (
        api.list_repo_tree(repo_id, path, recursive=True, revision=sha) if isinstance(found[0], RepoFolder) else found
    )
    sizes = {f.path: int(f.size or 0) for f in listed if not isinstance(f, RepoFolder)}
    weights = {p: n for p, n in sizes.items() if p.endswith(WEIGHT_SUFFIXES)}
    check_files(f"SAE {name}", {p: n for p, n in sizes.items() if p not in weights}, limits, configs=_SAE_CONFIGS)
    elements, d_in = 0, None
    for file in sorted(weights):
        if file.endswith(".safetensors"):
            meta = api.parse_safetensors_file_metadata(repo_id, file, revision=sha)
            elements += sum(meta.parameter_count.values())
            for tensor, axis in _D_IN_TENSORS.items():
                if tensor in meta.tensors and len(meta.tensors[tensor].shape) == 2 and d_in is None:
                    d_in = int(meta.tensors[tensor].shape[axis])
        else:
            elements += weights[file] // (4 if file.endswith(".npz") else 2)
    if not elements:
        raise LookupError(f"{repo_id}/{path} holds no weight files this app can size")
    elements = max(elements, sum(weights.values()) // 4)
    config: dict[str, Any] = {}
    configs = [p for p in sizes if p.rsplit("/", 1)[-1] in _SAE_CONFIGS]
    if configs:
        with tempfile.TemporaryDirectory(prefix="steer-sae-config-") as tmp:
            file = sorted(configs, key=len)[0]
            local = download_small(
                repo_id, file, revision=sha, token=token, folder=tmp, size=sizes[file], cap=limits.config_bytes
            )
            config = read_json_file(local, f"SAE {name}'s {file.rsplit('/', 1)[-1]}")
    if isinstance(config.get("d_in"), int):
        d_in = int(config["d_in"])
    layer = _sae_layer(config, path)
    where = f"SAE {name}"
    if d_model is not None and d_in is not None and d_in != d_model:
        raise ValueError(f"{where} has d_in={d_in}, but the model's hidden size is {d_model}")
    if n_layers is not None and layer is not None and layer >= n_layers:
        raise ValueError(f"{where} is at layer {layer}; the model has 0..{n_layers - 1}")
    return SAEAdmission(name, repo_id, path, sha, elements, d_in, layer)


def _sae_layer(config: dict[str, Any], path: str) -> int | None:
    """The layer an SAE reads: its config's hook_layer or layer, else the number in its hook name (sae_lens'
    blocks.N.hook_..., Gemma Scope 2's model.layers.N.output), else in its path (layer_N)."""
    meta: dict[str, Any] = config["metadata"] if isinstance(config.get("metadata"), dict) else {}
    for key in ("hook_layer", "layer"):
        if isinstance(value := config.get(key, meta.get(key)), int) and not isinstance(value, bool):
            return value
    texts = [config.get(k, meta.get(k)) for k in ("hook_name", "hook_point", "hf_hook_point_in")] + [path]
    for text in texts:
        # short strings only, and a pattern with no nested repetition: linear in what it reads
        if isinstance(text, str) and (found := re.search(r"(?:blocks|layers|layer)[._](\d{1,4})", text[:300])):
            return int(found.group(1))
    return None


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


def forget_partial(repo_id: str) -> list[Path]:
    """Remove the unfinished downloads (`*.incomplete` blobs) a failed load of `repo_id` left in the shared Hub cache:
    nothing resumes them, and each can be as large as the file it was meant to be."""
    from huggingface_hub import constants

    blobs = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "blobs"
    removed = sorted(blobs.glob("*.incomplete")) if blobs.is_dir() else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


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


def download_sae(release: str, sae_id: str, *, token: str | bool | None = None, revision: str | None = None) -> None:
    """Fetch a registry SAE's files (at `revision`, the commit admit_sae checked) into the Hub cache, so that sae_lens'
    own load then finds them there. Done apart from the load because the load must hold torch's global RNG
    (steer_core.ui.workspace), and a download must not."""
    from huggingface_hub import snapshot_download

    from steer_core.sae.feature import registry_entry

    entry = registry_entry(release)
    path = entry.saes_map[sae_id]
    snapshot_download(entry.repo_id, allow_patterns=[path, f"{path}/*"], token=token, revision=revision)


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
