"""Forward hooks that act only for the request that installed them, and never outlive their context.

PyTorch hooks are global to a module, but the app serves many requests from one loaded model. Every hook here is
*gated*: it runs only in the execution context (thread + contextvars) that entered `gated_hooks()`, and is a no-op
for any other request passing through the same module at the same time. All hooks are removed when the context
exits: normally, on an exception, or when a generator holding it is closed.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("steer_core_active", default=frozenset())
_IDS = itertools.count(1)


def untuple(output: Any) -> Tensor:
    """HF blocks return a tensor or a tuple whose first element is the hidden states."""
    return output[0] if isinstance(output, tuple) else output


def retuple(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class HookSet:
    """Hooks registered through this object run only while its gate is active in the calling context."""

    def __init__(self) -> None:
        self.gate = next(_IDS)
        self.handles: list[RemovableHandle] = []

    def _gated(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        gate = self.gate

        def hook(*args: Any) -> Any:
            return fn(*args) if gate in _ACTIVE.get() else None

        return hook

    def forward(self, module: nn.Module, fn: Callable[[nn.Module, Any, Any], Any], *, prepend: bool = False) -> None:
        """fn(module, args, output) -> new output or None. prepend=True runs before hooks already there, such as
        transformers' own output_hidden_states recorder, so they see the changed output like every later module."""
        self.handles.append(module.register_forward_hook(self._gated(fn), prepend=prepend))

    def pre(self, module: nn.Module, fn: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]) -> None:
        """fn(module, args, kwargs) -> (args, kwargs) or None."""
        self.handles.append(module.register_forward_pre_hook(self._gated(fn), with_kwargs=True))


@contextmanager
def gated_hooks() -> Iterator[HookSet]:
    """Register hooks on the yielded HookSet; they act in this context only and are removed on exit."""
    hooks = HookSet()
    _ACTIVE.set(_ACTIVE.get() | {hooks.gate})
    try:
        yield hooks
    finally:
        for handle in hooks.handles:
            handle.remove()
        # Not a token reset: a generator may resume in another context; a stale gate is harmless once its hooks
        # are gone, and gates are never reused.
        _ACTIVE.set(_ACTIVE.get() - {hooks.gate})
