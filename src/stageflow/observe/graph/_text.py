"""Short texts for the graph's boxes: signatures, policies, fan-out options."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

__all__ = ["fanout_text", "index_of", "names", "policy_text", "short", "signature_text"]


def names(fields: Iterable[str]) -> str:
    """Field names as a comma-separated list."""
    return ", ".join(fields)


def signature_text(sig: Any) -> str:
    """A DSPy signature as ``inputs -> outputs``."""
    text = getattr(sig, "signature", None)
    if isinstance(text, str):
        return text
    return f"{names(sig.input_fields)} -> {names(sig.output_fields)}"


def policy_text(policy: Any) -> list[str]:
    """The policies a :class:`~stageflow.Stage` sets, as one line (none: no line)."""
    if policy is None:
        return []
    parts = []
    for name in ("retry", "timeout", "repair", "fallback", "cache", "recover", "budget"):
        if getattr(policy, name, None):
            parts.append(name)
    if getattr(policy, "skip_on", ()):
        parts.append("skip on " + ", ".join(t.__name__ for t in policy.skip_on))
    return [f"policies: {', '.join(parts)}"] if parts else []


def short(obj: Any, limit: int = 60) -> str:
    """A function as ``name()``, anything else by its ``repr``, cut to ``limit`` characters."""
    name = getattr(obj, "__name__", None)
    text = f"{name}()" if isinstance(name, str) and callable(obj) else repr(obj)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def index_of(local_path: str) -> int:
    """The list index of a local stage path (``stages[3]`` → 3)."""
    return int(local_path[local_path.index("[") + 1 : -1])


def fanout_text(p: Any) -> str:
    """A fan-out's options that differ from the defaults (``max_concurrency=4, timeout=2s``)."""
    parts = []
    if p.max_concurrency is not None:
        parts.append(f"max_concurrency={p.max_concurrency}")
    default = inspect.signature(type(p).__init__).parameters["on_error"].default
    if p.on_error != default:
        parts.append(f"on_error={p.on_error}")
    if p.timeout is not None:
        parts.append(f"timeout={p.timeout}s")
    return ", ".join(parts)
