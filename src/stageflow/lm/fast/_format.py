"""Building a prompt with a plan: the per-call part of DSPy 3.4.1's ``Adapter.format``.

The system message and the formatted demos come from DSPy's own methods (run once per
signature, or once per demo set) and are reused; only the user message is built per call, the
way ``ChatAdapter.format_user_message_content`` builds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dspy.primitives.example import Example

from stageflow.lm.fast._plan import Plan
from stageflow.lm.fast._values import format_value

__all__ = ["demo_key", "user_content"]

_MISSING = object()
_FREEZABLE_SCALARS = frozenset({int, bool})


class _UnfreezableError(Exception):
    pass


def _freeze(value: Any) -> Any:
    """A hashable stand-in for ``value`` such that equal stand-ins format to the same text."""
    t = type(value)
    if t is str or value is None:
        return value
    if t in _FREEZABLE_SCALARS:
        return (t, value)
    if t is float:
        return (t, repr(value))  # 0.0 == -0.0, but they print differently
    if t is list or t is tuple:
        return (t, tuple(_freeze(x) for x in value))
    if t is dict:
        return (t, tuple((_freeze(k), _freeze(x)) for k, x in value.items()))
    raise _UnfreezableError


def demo_key(names: tuple[str, ...], demos: Sequence[Any]) -> tuple[Any, ...] | None:
    """A key that equals for two demo lists exactly when they format to the same messages.

    Only the signature's fields of each demo count (DSPy formats nothing else). ``None`` when a
    demo or a value is of a kind the key cannot capture (then the demos are formatted anew).

    >>> demo_key(("q", "a"), [{"q": "1+1", "a": "2", "augmented": True}])
    (('1+1', '2'),)
    >>> demo_key(("q", "a"), [{"q": "x", "a": object()}]) is None
    True
    """
    key = []
    for demo in demos:
        t = type(demo)
        if t is dict:
            store: Mapping[str, Any] = demo
        elif t is Example:
            store = demo._store
        else:
            return None
        row = []
        for name in names:
            v = store.get(name, _MISSING)
            if type(v) is str or v is None or v is _MISSING:
                row.append(v)
                continue
            try:
                row.append(_freeze(v))
            except _UnfreezableError:
                return None
        key.append(tuple(row))
    return tuple(key)


def user_content(plan: Plan, inputs: Mapping[str, Any], reminder: str | None) -> str:
    """``ChatAdapter.format_user_message_content(signature, inputs, main_request=True)``."""
    parts = [""]
    for spec in plan.inputs:
        if spec.name in inputs:
            parts.append(spec.header + format_value(spec.info, spec.annotation, inputs[spec.name]))
    if reminder is not None:
        parts.append(reminder)
    parts.append("")
    return "\n\n".join(parts).strip()
