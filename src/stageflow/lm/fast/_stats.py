"""Counters of the fast adapter path: how many calls it served and what it sent to DSPy instead."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

from stageflow.usage import note_fast_fallback

__all__ = [
    "FastPathStats",
    "count_adapter_fallback",
    "count_fallback",
    "count_fast",
    "fast_path_stats",
    "reset_fast_path_stats",
]

logger = logging.getLogger("stageflow.lm.fast")

_LOCK = threading.Lock()
_FAST = [0]
_FALLBACKS: Counter[str] = Counter()
_ADAPTERS: Counter[str] = Counter()


@dataclass(frozen=True)
class FastPathStats:
    """A snapshot of the fast adapter path's counters (process-wide, since the last reset).

    Attributes:
        fast_calls: Prompts built (and answers parsed) by the fast path.
        fallbacks: Prompts a fast adapter left to DSPy's own code, by reason: a signature it does
            not cover (the field and its type), a subclass that overrides a formatting method, a
            value that serialises to DSPy custom-type blocks (an image in a text field).
        adapter_fallbacks: Adapters ``fast_adapter_for`` returned unchanged (no fast twin), by
            class name.
    """

    fast_calls: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    adapter_fallbacks: dict[str, int] = field(default_factory=dict)

    @property
    def fallback_calls(self) -> int:
        """All prompts left to DSPy's code."""
        return sum(self.fallbacks.values())

    @property
    def fast_share(self) -> float:
        """``fast_calls`` / all prompts (``1.0`` before any call)."""
        total = self.fast_calls + self.fallback_calls
        return self.fast_calls / total if total else 1.0


def count_fast() -> None:
    with _LOCK:
        _FAST[0] += 1


def count_fallback(reason: str) -> None:
    """A prompt left to DSPy's code, for ``reason``: counted here by reason, and for the stage whose
    LM call it is (``fast_fallbacks`` in its usage: profiles, traces and ``result.run.usage``)."""
    with _LOCK:
        _FALLBACKS[reason] += 1
    note_fast_fallback()


def count_adapter_fallback(name: str) -> None:
    with _LOCK:
        _ADAPTERS[name] += 1


def fast_path_stats() -> FastPathStats:
    """The counters now.

    >>> reset_fast_path_stats()
    >>> fast_path_stats()
    FastPathStats(fast_calls=0, fallbacks={}, adapter_fallbacks={})
    """
    with _LOCK:
        return FastPathStats(_FAST[0], dict(_FALLBACKS), dict(_ADAPTERS))


def reset_fast_path_stats() -> None:
    """Set every counter back to zero."""
    with _LOCK:
        _FAST[0] = 0
        _FALLBACKS.clear()
        _ADAPTERS.clear()
