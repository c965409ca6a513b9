"""What one request to a shared server may ask for: each bound refused at once, with the limit named.

A preview costs a few seconds; without bounds one visitor's request could cost minutes of every visitor's CPU (a
thousand contrastive prompts, a search of a pasted essay, a million calibration tokens) or the server's memory (an
upload of gigabytes). The command line is the user's own machine and is not bounded here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from steer_core.hardware import format_bytes


@dataclass(frozen=True)
class Limits:
    contrastive_prompts: int = 64  # per side: mean differences settle within tens of pairs (CAA uses dozens)
    prompt_tokens: int = 256  # per contrastive prompt, and a preview's prompt: one forward pass each
    search_words: int = 8  # each word costs two probes of the model (steer_core.sae.search)
    search_chars: int = 200
    upload_bytes: int = 16 * 2**20  # a vector is kB; a 80-layer 8192-wide control vector 2.6 MB
    adapter_bytes: int = 64 * 2**20  # a Hub adapter served in a preview: ours are kB; rank 16 on a 7B's writers ~40 MB
    max_new_tokens: int = 256
    calibration_tokens: int = 65_536  # the export slider's top: ~8 min of a 2-core CPU on the 135M model
    refine_steps: int = 300
    features: int = 16  # features mixed into one vector

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be a whole number of at least 1, got {value!r}")

    def check_count(self, what: str, value: float, limit: int, *, at_least: int = 0) -> int:
        """`value` as an int, or a ValueError naming the bound it misses."""
        if not (isinstance(value, int | float) and math.isfinite(value)) or value != int(value):
            raise ValueError(f"{what} must be a whole number, got {value!r}")
        if not at_least <= int(value) <= limit:
            raise ValueError(f"{what} must be between {at_least} and {limit} on this server, got {int(value)}")
        return int(value)

    def check_prompts(self, tokenizer: Any, positive: tuple[str, ...], negative: tuple[str, ...]) -> None:
        for side, prompts in (("positive", positive), ("negative", negative)):
            if len(prompts) > self.contrastive_prompts:
                raise ValueError(
                    f"{len(prompts)} {side} prompts: this server takes up to {self.contrastive_prompts} per side"
                )
            for i, prompt in enumerate(prompts, 1):
                self.check_prompt(tokenizer, prompt, f"{side} prompt {i}")

    def check_prompt(self, tokenizer: Any, prompt: str, what: str = "the prompt", *, limit: int | None = None) -> None:
        """At most `limit` tokens (the contrastive prompts' limit by default)."""
        limit = limit or self.prompt_tokens
        # Characters first: tokenizing a pasted book just to count it would itself cost what the limit protects.
        n = len(tokenizer(prompt[: 16 * limit]).input_ids)
        if n > limit or len(prompt) > 16 * limit:
            more = "+" if len(prompt) > 16 * limit else ""
            raise ValueError(f"{what} has {n}{more} tokens: this server takes up to {limit}")

    def check_search(self, query: str) -> None:
        words = query.replace(",", " ").split()
        if len(query) > self.search_chars or len(words) > self.search_words:
            raise ValueError(
                f"the search has {len(words)} words ({len(query)} characters): search up to {self.search_words} words "
                f"({self.search_chars} characters) at a time"
            )

    def check_upload(self, size: int, name: str = "the file") -> None:
        if size > self.upload_bytes:
            raise ValueError(f"{name} is {format_bytes(size)}: this server takes files up to "
                             f"{format_bytes(self.upload_bytes)}")  # fmt: skip

    def check_features(self, n: int) -> None:
        if n > self.features:
            raise ValueError(f"{n} features mixed: this server mixes up to {self.features}")


SERVER_LIMITS = Limits()
