"""Many of our adapters in one stock engine, chosen per request: the engine's command, each adapter's id or name, and
how a client picks one (`python -m steer_core serve`).

`plan` builds all of it from the folders without starting anything; `run` prints it and hands the process to the
engine. No server of our own: llama-server routes GGUF LoRAs per request (`"lora": [{"id", "scale"}]`), vLLM routes
PEFT folders by name (`"model": NAME`). vLLM has no per-request scale, so strengths become separate adapters
(`write_variants`: lora_B times s, which at rank 1 costs one vector per module).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from steer_core.constants import ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME, cache_dir

Engine = Literal["llama.cpp", "vllm"]
ENGINES: tuple[Engine, ...] = ("llama.cpp", "vllm")
GGUF_FILENAME = "adapter.gguf"
DEFAULT_PORTS = {"llama.cpp": 8080, "vllm": 8000}
# vLLM accepts only these for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks, 0.33)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
EXAMPLE_PROMPT = "Describe something you like."


@dataclass(frozen=True)
class ServedAdapter:
    """One adapter as a client names it: llama.cpp's `id` (its place in --lora order), or vLLM's model name."""

    key: int | str
    folder: Path  # what the engine loads (for a vLLM strength variant: the variant's folder)
    source: Path  # the folder the user gave
    scale: float = 1.0  # vLLM variants: lora_B times this; llama.cpp: 1, the scale is per request


@dataclass(frozen=True)
class ServePlan:
    engine: Engine
    argv: tuple[str, ...]
    adapters: tuple[ServedAdapter, ...]
    base: str
    host: str
    port: int
    scales: tuple[float, ...] = (1.0,)
    examples: str = field(default="", compare=False)

    @property
    def variants(self) -> tuple[ServedAdapter, ...]:
        """vLLM's strength variants, which `write_variants` must write before the engine starts."""
        return tuple(a for a in self.adapters if self.engine == "vllm" and a.scale != 1.0)

    def describe(self) -> str:
        lines = ["command:", "  " + shlex.join(self.argv), "adapters:"]
        for a in self.adapters:
            what = f"{a.source}" + (f" (lora_B × {a.scale:g}: {a.folder})" if a in self.variants else "")
            label = f"id {a.key}" if self.engine == "llama.cpp" else f"model {a.key!r}"
            lines.append(f"  {label}: {what}")
        return "\n".join([*lines, "requests:", self.examples])


def _base_of(folder: Path, config: dict, record_model: str | None) -> str | None:
    named = config.get("base_model_name_or_path")
    return str(named) if named else record_model


def sanitize(name: str) -> str:
    """A vLLM adapter name: its --lora-modules parser splits `name=path` at '=' and takes a ',' for JSON, and clients
    put the name in JSON and URLs, so only letters, digits and . _ - @ are kept."""
    clean = re.sub(r"[^A-Za-z0-9._@-]+", "-", name).strip("-.")
    return clean or "adapter"


def _scale_name(s: float) -> str:
    return f"{s:g}"


def plan(
    engine: str,
    folders: Sequence[str | Path],
    *,
    base: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    scales: Sequence[float] = (1.0,),
    binary: str | None = None,
    variants_dir: str | Path | None = None,
    extra: Sequence[str] = (),
) -> ServePlan:
    """The engine's command with every folder's adapter loaded once, each adapter's id or name, and request examples;
    or a ValueError naming the folder that cannot be served and why. `extra` is passed to the engine as is."""
    from steer_core.adapter.folder import read_folder

    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    if not folders:
        raise ValueError("give at least one adapter folder")
    scales = tuple(float(s) for s in scales) or (1.0,)
    if any(s < 0 or s != s for s in scales):
        raise ValueError(f"scales {scales} must be numbers ≥ 0")
    paths = [Path(f) for f in folders]
    if len(set(p.resolve() for p in paths)) != len(paths):
        raise ValueError(f"a folder is given twice: {', '.join(map(str, paths))}")
    bases: list[tuple[Path, str | None]] = []
    ranks = []
    for p in paths:
        read = read_folder(p, ours=False)
        record_model = read.record.model or read.record.base_model if read.record else None
        bases.append((p, _base_of(p, read.config, record_model)))
        ranks.append(int(read.config.get("r") or 1))
        if engine == "llama.cpp" and not (p / GGUF_FILENAME).is_file():
            raise ValueError(
                f"{p / GGUF_FILENAME} is missing: llama-server loads a GGUF LoRA; export the adapter with "
                "--target llama.cpp (or ollama), which writes it next to the PEFT folder"
            )
    known = [(p, b) for p, b in bases if b]
    for p, b in known[1:]:
        if b != known[0][1]:
            raise ValueError(
                f"the adapters were made for different base models: {known[0][0]} for {known[0][1]!r}, {p} for "
                f"{b!r}; one engine serves one base model, so serve each set on its own"
            )
    folder_base = known[0][1] if known else None
    port = DEFAULT_PORTS[engine] if port is None else int(port)
    if engine == "llama.cpp":
        if not base:
            raise ValueError(
                "llama-server needs the base model as a GGUF file (--base BASE.gguf), converted from "
                f"{folder_base or 'the base model'} by llama.cpp's convert_hf_to_gguf.py"
            )
        adapters = tuple(ServedAdapter(i, p / GGUF_FILENAME, p) for i, p in enumerate(paths))
        exe = binary or _llama_server()
        argv = [exe, "-m", base]
        for a in adapters:
            argv += ["--lora", str(a.folder)]
        # -np 1: on b11434, parallel slots serving requests with different "lora" lists stalled (4 requests, 4 slots:
        # none finished in 60 s; one slot: 4 requests queued and done in 6 s). Later flags in `extra` override it.
        argv += ["--lora-init-without-apply", "-np", "1", "--host", host, "--port", str(port), *extra]
    else:
        base = base or folder_base
        if not base:
            raise ValueError(
                "no folder names its base model (adapter_config.json base_model_name_or_path): give --base"
            )
        into = Path(variants_dir) if variants_dir else cache_dir() / "serve-variants"
        names: set[str] = set()
        served = []
        for p in paths:
            name = _unique(sanitize(p.resolve().name), names)
            for s in scales:
                if s == 1.0:
                    served.append(ServedAdapter(name, p, p))
                else:
                    variant = _unique(f"{name}@{_scale_name(s)}", names)
                    served.append(ServedAdapter(variant, into / variant, p, s))
        adapters = tuple(served)
        rank = next((r for r in VLLM_RANKS if r >= max(ranks)), max(ranks))
        argv = [binary or "vllm", "serve", base, "--enable-lora", "--max-lora-rank", str(rank), "--max-loras",
                str(len(adapters)), "--lora-modules", *(f"{a.key}={a.folder}" for a in adapters), "--host", host,
                "--port", str(port), *extra]  # fmt: skip
    out = ServePlan(engine, tuple(argv), adapters, base, host, port, scales)
    return _with_examples(out)


def _unique(name: str, taken: set[str]) -> str:
    out, n = name, 2
    while out in taken:
        out, n = f"{name}-{n}", n + 1
    taken.add(out)
    return out


def _llama_server() -> str:
    """llama-server on PATH, else the one scripts/llama_cpp.sh built, else the bare name (the error comes at exec)."""
    found = shutil.which("llama-server")
    if found:
        return found
    built = sorted((cache_dir() / "llama.cpp").glob("*/build/bin/llama-server"))
    return str(built[-1]) if built else "llama-server"


def lora_field(plan: ServePlan, scales: dict[int, float]) -> list[dict[str, float | int]]:
    """llama-server's per-request `lora` list, with EVERY loaded id listed, at 0 where unasked. Measured on the build
    scripts/llama_cpp.sh makes (tests/adapter/test_serve.py): an id left out of a non-empty list is at 0, but an empty
    list, or none, applies every adapter at 1.0 in spite of --lora-init-without-apply (llama.cpp #28674); so the
    unsteered model is every id at 0, and listing every id keeps a request's meaning whatever the build does."""
    return [{"id": int(a.key), "scale": float(scales.get(int(a.key), 0.0))} for a in plan.adapters]


def _with_examples(p: ServePlan) -> ServePlan:
    url = f"http://{'127.0.0.1' if p.host in ('0.0.0.0', '::') else p.host}:{p.port}"
    messages = [{"role": "user", "content": EXAMPLE_PROMPT}]
    lines = []
    if p.engine == "llama.cpp":
        first = int(p.adapters[0].key)
        s = p.scales[0] if p.scales != (1.0,) else 0.5
        lora = lora_field(p, {first: s})
        body = {"messages": messages, "max_tokens": 40, "temperature": 0, "lora": lora}
        lines += [
            f"  # id {first} at scale {s:g}, every other id at 0. List EVERY id with its scale in every request:",
            '  # "lora": [] or no "lora" applies EVERY adapter at 1.0 (llama.cpp #28674); unsteered = every id at 0.',
            f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{json.dumps(body)}'",
            "  # Python:",
            "  from openai import OpenAI",
            f'  client = OpenAI(base_url="{url}/v1", api_key="none")',
            f'  client.chat.completions.create(model="any", messages={messages!r}, max_tokens=40,',
            f"                                 extra_body={{'lora': {lora!r}}})",
        ]
    else:
        name = str(p.adapters[0].key)
        body = {"model": name, "messages": messages, "max_tokens": 40, "temperature": 0}
        lines += [
            f'  # the adapter by name; the base model unsteered: "model": "{p.base}"',
            f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{json.dumps(body)}'",
            "  # Python:",
            "  from openai import OpenAI",
            f'  client = OpenAI(base_url="{url}/v1", api_key="none")',
            f'  client.chat.completions.create(model="{name}", messages={messages!r}, max_tokens=40)',
        ]
    return ServePlan(p.engine, p.argv, p.adapters, p.base, p.host, p.port, p.scales, "\n".join(lines))


def write_variants(p: ServePlan) -> list[Path]:
    """vLLM's strength variants: each a PEFT folder with its source's config and lora_B (and a LoRA bias) times its
    scale, so that the variant adds s times what its source adds. Rewritten each time, as the source may have
    changed."""
    from safetensors.torch import save_file

    from steer_core.adapter.folder import read_folder

    written = []
    for a in p.variants:
        read = read_folder(a.source, ours=False)
        a.folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: (t * a.scale if ".lora_B." in k else t).contiguous() for k, t in read.tensors.items()}
        save_file(tensors, str(a.folder / ADAPTER_WEIGHTS_FILENAME))
        (a.folder / ADAPTER_CONFIG_FILENAME).write_text(json.dumps(read.config, indent=2))
        (a.folder / "README.md").write_text(f"{a.source} with lora_B × {a.scale:g}, written by steer_core serve\n")
        written.append(a.folder)
    return written


def run(p: ServePlan, *, print_only: bool = False) -> int:
    """Print the command, the adapters and the request examples; then replace this process with the engine."""
    print(p.describe(), flush=True)  # noqa: T201  (a command's output, for whoever starts the engine; not the app)
    write_variants(p)
    if print_only:
        return 0
    sys.stdout.flush()
    os.execvp(p.argv[0], list(p.argv))
    return 0  # not reached: execvp returns only by raising


def start(argv: Sequence[str], url: str, *, seconds: float = 300.0) -> subprocess.Popen:
    """Start an engine in the background and return it once `url`/health answers 200: for tests and benchmarks, where
    `run` hands this process over to the engine instead. Its log goes to a temp file whose tail an early exit
    reports (a pipe nobody reads would stall a server that logs much)."""
    with tempfile.TemporaryFile() as log:  # the engine keeps its own descriptor of it once this one is closed
        proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                if proc.poll() is not None:
                    log.seek(0)
                    tail = log.read()[-2000:].decode(errors="replace")
                    raise RuntimeError(f"{argv[0]} exited with {proc.returncode}: {tail}") from None
                time.sleep(0.5)
    proc.terminate()
    proc.wait(timeout=30)
    raise RuntimeError(f"{argv[0]} did not answer {url}/health in {seconds:g} s")
