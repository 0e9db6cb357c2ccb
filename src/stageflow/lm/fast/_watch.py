"""Telling DSPy's own functions from replacements, for the shortcuts that reproduce DSPy's code
(internal; see :mod:`stageflow.lm.fast._predict` and :mod:`stageflow.lm.fast._adapter_call`).

Each shortcut watches a table of ``(owner, attribute, expected)``: ``expected`` is an object
(compared by identity: a class, a context variable) or where DSPy's function's code is — a tuple of
``(code's qualified name, file)`` pairs, the function's own, then the one each decorator around it
wraps. :func:`recheck` checks what it finds now by those locations (so a patch made before stageflow
was imported is seen too) and remembers it; the shortcut then compares by identity on each call.

Example:
    >>> import dspy
    >>> from stageflow.lm.fast._watch import is_dspys
    >>> is_dspys(dspy.Predict.forward, (("Predict.forward", "dspy/predict/predict.py"),))
    True
    >>> is_dspys(lambda *a: None, (("Predict.forward", "dspy/predict/predict.py"),))
    False
"""

from __future__ import annotations

from types import FunctionType
from typing import Any

__all__ = ["is_dspys", "recheck"]


def is_dspys(found: Any, expected: Any) -> bool:
    """Whether ``found`` is what ``expected`` describes (see the module docstring)."""
    if not isinstance(expected, tuple):
        return found is expected
    if type(found) is classmethod:
        found = found.__func__
    for i, (qualname, where) in enumerate(expected):
        if i:
            found = getattr(found, "__wrapped__", None)  # (the function inside the decorator)
        if not (
            type(found) is FunctionType
            and found.__code__.co_qualname == qualname
            and found.__code__.co_filename.replace("\\", "/").endswith(where)
        ):
            return False
    return True


def recheck(seen: list[tuple[Any, ...] | None], now: tuple[Any, ...], watched: tuple[Any, ...]) -> bool:
    """Whether everything in ``now`` (what ``watched`` names, read now) is DSPy's own; if so it is
    remembered in ``seen[0]`` for the identity checks of the next calls."""
    if all(is_dspys(found, entry[2]) for found, entry in zip(now, watched, strict=True)):
        seen[0] = now
        return True
    return False
