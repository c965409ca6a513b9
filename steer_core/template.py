"""Chat templates and tokenizer regexes from repos a visitor names, run under limits.

A chat template is a jinja program that the model's repo ships, and transformers renders it in jinja's
ImmutableSandboxedEnvironment. The sandbox keeps a template away from Python's internals, not from the machine's
memory and time: it caps `range` at 100,000 items but not `'a' * 20000000000`, a string doubled in a loop,
`'a'.ljust(10**10)`, `'x'|center(10**10)`, `tojson(indent=10**10)`, `lipsum(10**9)`, `10**(10**10)`, two nested
`range(100000)` loops or a macro that calls itself twice. Any of those freezes or kills a shared server.

`render_chat` therefore renders in a small worker process, with transformers' own code (so the text is byte for byte
what `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` returns), under:

- memory: the worker's address space is capped (RLIMIT_AS) at what it had before rendering plus `RENDER_MEMORY`, so
  a big allocation fails at once with a MemoryError inside the worker;
- time: the caller waits `RENDER_SECONDS` of wall-clock time, then kills the worker and starts a new one (a
  per-request RLIMIT_CPU also ends a worker whose caller died);
- size: the template's length, and the rendered text's (`RENDER_CHARS` plus what the messages bring).

A refusal is a ValueError naming the limit. Errors the template raises itself (`raise_exception`, an undefined
variable) keep their jinja2 type and message, as apply_chat_template raised them before.

Why a process and not a hardened in-process sandbox: the in-process route needs every string-, list- and int-growing
operation intercepted (binops, `~` concatenation, which the sandbox cannot intercept, each string method and filter
with a width or count argument, `format` specs, tojson's indent, lipsum, list repetition), and time cannot be bounded
in-process at all: one C-level operation (`10**(10**10)`, a 1 GB `replace`) never returns to the interpreter, and a
trace function that checks a deadline (sys.settrace) makes every render 5 times slower (55 -> 300 µs). Measured on 2
busy CPU cores, SmolLM2's and Gemma 3-it's real templates on a 4-turn chat: apply_chat_template in-process 55-120 µs
per render, `render_chat` 90-150 µs more (a JSON round trip through a pipe), so the few thousand conversations an
export formats cost 0.3-0.5 s more. A worker costs ~70 MB and ~1 s of CPU to start (importing transformers), once per
process and after each kill.

Constructs the real templates use, from their parsed ASTs (SmolLM2-Instruct, Gemma 2-it, Gemma 3-it, Llama 3.2-Instruct,
Qwen2.5-Instruct; tests/test_template.py holds them): `for` with `loop.first`, `loop.last`, `loop.index0`; `if`,
`set` (`set messages = messages[1:]`), inline `x if c else y`; subscripts, slices and attribute access on messages;
`+` on strings, `-` and `%` on loop indices; `==`, `!=`, `in`, `and`, `or`, `not`; the tests `defined`, `none`,
`mapping`, `iterable`; the filters `trim` and `tojson` (with `indent=4`); the globals `raise_exception` and
`strftime_now`; the variables `bos_token`, `messages`, `add_generation_prompt`, `tools`, `date_string`. Llama 3.1's
builtin-tools branch adds the filters `reject`, `join`, `items`, `length`. None uses macros, `namespace`, `~`, `*`,
`**`, string methods or a loop that is not over the messages or tools.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RENDER_SECONDS = 2.0  # a real template renders in well under a millisecond
RENDER_MEMORY = 256 * 2**20  # bytes the worker may allocate beyond its own footprint, per render
RENDER_CHARS = 1_000_000  # rendered characters beyond the messages' own: templates add markers, not text
TEMPLATE_CHARS = 100_000  # the longest real templates (tool-use ones) are ~20k characters
WORKERS = 2  # renders at once; each worker is a process of ~70 MB
_START_SECONDS = 120.0  # importing transformers in a fresh worker, on a busy 2-core machine
_ROOT = str(Path(__file__).resolve().parent.parent)  # so the worker imports this file however steer_core was found


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, generation: bool) -> str:
    """The tokenizer's chat template applied to `messages`, exactly as
    `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)` renders it, but in a
    worker process with bounded memory and time. A ValueError names the limit a template exceeds."""
    template = tokenizer.get_chat_template()  # a repo's dict of named templates resolves here, as in transformers
    if len(template) > TEMPLATE_CHARS:
        raise ValueError(
            f"the model's chat template has {len(template):,} characters: this server renders templates of up to "
            f"{TEMPLATE_CHARS:,}"
        )
    if not messages:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    variables = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    # An export renders the same shipped conversations thousands of times (12,174 renders in a tiny model's export of
    # 4,096 calibration tokens, 2.3 s of its 2.8 s through the worker): the same request gives the same text, except
    # from a template that reads the clock. Plain text messages key the cache as they are; others are not cached.
    key = _cache_key(template, messages, generation, variables)
    if key is not None and (text := _CACHE.get(key)) is not None:
        return text
    request = {"template": template, "messages": list(messages), "generation": generation, "variables": variables}
    payload = json.dumps(request, default=_refuse_type).encode() + b"\n"
    text = _POOL.render(payload, RENDER_CHARS + len(payload))
    if key is not None:
        _CACHE.put(key, text)
    return text


def _cache_key(
    template: str, messages: Sequence[Mapping[str, Any]], generation: bool, variables: dict[str, str]
) -> tuple | None:
    if "strftime_now" in template or any(set(m) != {"role", "content"} for m in messages):
        return None
    turns = tuple((m["role"], m["content"]) for m in messages)
    if not all(isinstance(x, str) for turn in turns for x in turn) or sum(len(c) for _, c in turns) > CACHED_CHARS:
        return None
    return template, turns, generation, tuple(sorted(variables.items()))


class _Renders:
    """Recent renders by request, at most `chars` characters of messages and text together (the template is shared
    by reference); one lock, held only to look up or put."""

    def __init__(self, chars: int) -> None:
        self._chars, self._used, self._lock = chars, 0, threading.Lock()
        self._texts: OrderedDict[tuple, str] = OrderedDict()

    @staticmethod
    def _size(key: tuple, text: str) -> int:
        return len(text) + sum(len(content) for _role, content in key[1])

    def get(self, key: tuple) -> str | None:
        with self._lock:
            if (text := self._texts.get(key)) is not None:
                self._texts.move_to_end(key)
            return text

    def put(self, key: tuple, text: str) -> None:
        with self._lock:
            if key in self._texts:
                return
            self._texts[key] = text
            self._used += self._size(key, text)
            while self._used > self._chars:
                old, old_text = self._texts.popitem(last=False)
                self._used -= self._size(old, old_text)


CACHED_RENDER_CHARS = 32 * 2**20  # ~32 MB of text: an export's ~3,100 distinct corpus conversations take ~6M
CACHED_CHARS = 16_384  # a longer conversation (a visitor's long prompt) is rendered, not kept
_CACHE = _Renders(CACHED_RENDER_CHARS)


# The regexes in the tokenizer.json files (pre-tokenizer `Split`, normalizer `Replace`) of the popular models. The
# `tokenizers` library runs a file's regexes with Oniguruma, a backtracking engine, on the visitor's prompt: `(a+)+b`
# takes 0.1 s on 22 `a`s and panics (PanicException, a BaseException) at 24, and a pattern just under Oniguruma's
# retry limit costs that at every position. Each pattern here was timed on 80k-character runs of each character class
# (letters, mixed case, digits, spaces, newlines, apostrophes, punctuation): under 0.11 s, linear (GPT-2's checked to
# 1.3M characters: 0.25 s).
VETTED_PATTERNS: dict[str, str] = {
    # GPT-2's own pattern, spelled out as a Split by some converted tokenizers
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "GPT-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "cl100k (GPT-4, Llama 3, OLMo 2)",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "Qwen2 (Qwen2, Qwen2.5, Qwen3, DeepSeek-R1 distills)",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "o200k (GPT-4o, gpt-oss)",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "Tekken (Mistral NeMo, Mistral Small 3)",
    r"\p{N}{1,3}": "digit groups (DeepSeek V3)",
    r" {2,}": "runs of spaces (SentencePiece conversions: T5, ALBERT, XLM-R)",
}
REPLACEMENT_CHARS = 16  # a Replace or Prepend writes "▁" or " ": a long one multiplies every prompt's size


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse (ValueError naming the pattern) a fast tokenizer whose normalizer, pre-tokenizer, decoder or
    post-processor runs a regex that is not one of VETTED_PATTERNS, or replaces text with more than REPLACEMENT_CHARS
    characters. Built-in steps (ByteLevel with its GPT-2 regex, Metaspace, Digits, Whitespace, NFC, literal-string
    Split and Replace) are code, not data, and pass. A slow tokenizer's regexes are transformers' own code and pass."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return
    for part in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        component = getattr(backend, part, None)
        if component is not None:
            _check_component(part.replace("_", "-"), json.loads(component.__getstate__()))


def _check_component(where: str, node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _check_component(where, item)
        return
    if not isinstance(node, dict):
        return
    pattern = node.get("pattern")
    if isinstance(pattern, dict) and "Regex" in pattern:
        regex = str(pattern["Regex"])
        if regex not in VETTED_PATTERNS:
            shown = regex if len(regex) <= 200 else regex[:200] + "…"
            raise ValueError(
                f"the tokenizer's {where} runs the regex {shown!r}, which this server has not vetted (a regex from a "
                f"repo can backtrack for hours on a prompt): it takes the patterns of GPT-2, Llama 3, Qwen2, GPT-4o, "
                f"Mistral and SentencePiece tokenizers"
            )
    for key in ("content", "prepend"):
        value = node.get(key)
        if node.get("type") in ("Replace", "Prepend") and isinstance(value, str) and len(value) > REPLACEMENT_CHARS:
            raise ValueError(
                f"the tokenizer's {where} writes {len(value):,} characters for each match of "
                f"{node.get('pattern', 'the text')!r}: this server takes up to {REPLACEMENT_CHARS}"
            )
    for value in node.values():
        _check_component(where, value)


def warm_up() -> None:
    """Start every rendering worker now and wait until each is ready, so that no render waits ~1 s for one to start
    (an app calls it at startup; after a kill, the replacement starts at once by itself)."""
    _POOL.warm_up()


def _refuse_type(value: Any) -> Any:
    raise TypeError(f"chat messages must hold plain text, numbers, lists and dicts, got {type(value).__name__}")


class _Worker:
    """One rendering process, spoken to in JSON lines over its stdin and stdout. JSON, not pickle: the worker runs
    hostile templates, so nothing it answers may become code here."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        code = "import sys; sys.path.insert(0, sys.argv[1]); from steer_core.template import _serve; _serve()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, _ROOT, str(RENDER_MEMORY), str(math.ceil(RENDER_SECONDS) + 2)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C in a terminal goes to the app, which then closes the worker's stdin
        )
        self.ready = False
        self._buffer = b""

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            started = self._read_line(_START_SECONDS, 64) == b"ready"
        except ValueError:  # it exited
            started = False
        if not started:
            self.kill()
            raise RuntimeError(f"the chat template renderer did not start (exit code {self.proc.poll()})")
        self.ready = True

    def request(self, payload: bytes, limit: int) -> dict:
        """The worker's answer, or a ValueError when it runs out of time, answers too much or dies."""
        self.wait_ready()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(payload)
            self.proc.stdin.flush()
        except OSError as e:
            self.kill()
            raise RuntimeError(f"the chat template renderer stopped: {e}") from None
        # JSON escapes at most 6 bytes a character (\uXXXX), plus the envelope
        line = self._read_line(RENDER_SECONDS, 6 * limit + 4096)
        if line is None:
            self.kill()
            raise ValueError(
                f"the model's chat template needed more than {RENDER_SECONDS:g} s to render: this server refuses it"
            )
        return json.loads(line)

    def _read_line(self, seconds: float, most: int) -> bytes | None:
        """One line from the worker within `seconds`; None on timeout. Too long a line, or the worker's death, is a
        ValueError."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = _now() + seconds
        while b"\n" not in self._buffer:
            if len(self._buffer) > most:
                self.kill()
                raise ValueError(
                    f"the model's chat template wrote more than {most // 6:,} characters: this server refuses it"
                )
            left = deadline - _now()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                code = self.proc.wait()
                raise ValueError(
                    f"the model's chat template stopped its renderer (exit code {code}; a render may use "
                    f"{RENDER_MEMORY // 2**20} MB and {RENDER_SECONDS:g} s): this server refuses it"
                )
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe and pipe.close()


def _now() -> float:
    import time

    return time.monotonic()


class _Pool:
    """Up to WORKERS workers, each rendering one request at a time; a killed worker is replaced at once, so its
    successor imports while nobody waits."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._idle: list[_Worker] = []
        self._count = 0
        self._cond = threading.Condition()

    def render(self, payload: bytes, limit: int) -> str:
        worker = self._acquire()
        try:
            answer = worker.request(payload, limit)
        finally:
            self._release(worker)
        if "text" in answer:
            return str(answer["text"])
        raise _error(answer)

    def warm_up(self) -> None:
        held: list[_Worker] = []
        try:
            for _ in range(self._size):
                held.append(self._acquire())
                held[-1].wait_ready()
        finally:
            for worker in held:
                self._release(worker)

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                while not self._idle and self._count >= self._size:
                    self._cond.wait()
                if not self._idle:
                    break
                worker = self._idle.pop()
                if worker.alive():
                    return worker
                worker.kill()  # ended while idle (its CPU backstop, or killed from outside): replace it
                self._count -= 1
            self._count += 1
        try:
            return _Worker()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker) -> None:
        if not worker.alive():
            worker.kill()  # reaps it and closes its pipes
            try:
                worker = _Worker()
            except OSError:
                with self._cond:
                    self._count -= 1
                    self._cond.notify()
                return
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for worker in idle:
            worker.kill()


_POOL = _Pool(WORKERS)
atexit.register(_POOL.close)


def _error(answer: Mapping[str, Any]) -> Exception:
    """The exception a worker's refusal stands for: jinja2's own types for the template's own errors."""
    import jinja2

    kind, message = str(answer.get("type", "")), str(answer.get("message", ""))
    if kind == "MemoryError":
        return ValueError(
            f"the model's chat template needed more than {RENDER_MEMORY // 2**20} MB to render: this server refuses it"
        )
    if kind == "RecursionError":
        return ValueError(f"the model's chat template recursed too deep to render ({message}): this server refuses it")
    if kind == "TooLong":
        return ValueError(message)
    if kind == "TemplateSyntaxError":
        return jinja2.TemplateSyntaxError(message, int(answer.get("lineno") or 1))
    cls = getattr(jinja2.exceptions, kind, None)
    if isinstance(cls, type) and issubclass(cls, jinja2.TemplateError):
        return cls(message)
    builtin = {e.__name__: e for e in (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError)}
    return builtin.get(kind, ValueError)(message)


def _serve() -> None:
    """The worker's loop: one JSON request a line in, one JSON answer a line out, until stdin closes."""
    memory, cpu_seconds = int(sys.argv[2]), int(sys.argv[3])
    # The answers get their own copy of stdout: a library that prints must not corrupt them
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    from transformers.utils.chat_template_utils import _normalize_chat_messages, render_jinja_template

    _cap_memory(memory)
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        used = resource.getrusage(resource.RUSAGE_SELF)
        # Kills this process (SIGXCPU) if a render outlives its caller, who would otherwise have killed it
        soft = math.ceil(used.ru_utime + used.ru_stime) + cpu_seconds
        resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))
        try:
            # (rendered chats, generation indices); transformers annotates it as a str
            rendered: Any = render_jinja_template(
                conversations=[_normalize_chat_messages(request["messages"])],
                chat_template=request["template"],
                add_generation_prompt=request["generation"],
                **request["variables"],
            )
            text = rendered[0][0]
            limit = RENDER_CHARS + len(line)
            if len(text) > limit:
                answer: dict[str, Any] = {
                    "type": "TooLong",
                    "message": f"the model's chat template wrote {len(text):,} characters, more than the "
                    f"{limit:,} this server takes",
                }
            else:
                answer = {"text": text}
        except MemoryError:
            answer = {"type": "MemoryError", "message": ""}
        except Exception as e:
            answer = {"type": type(e).__name__, "message": str(e)[:2000], "lineno": getattr(e, "lineno", None)}
        out.write(json.dumps(answer).encode() + b"\n")
        out.flush()


def _cap_memory(extra: int) -> None:
    """Cap this process's address space at its size now plus `extra` bytes (Linux; elsewhere only time is capped)."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # the app gone: die quietly instead of raising on every write
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (OSError, StopIteration, ValueError):
        return
