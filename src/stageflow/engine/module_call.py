"""Calling a leaf ``dspy.Module`` stage: what DSPy's ``Module.__call__`` / ``acall`` do, cheaper.

A custom module stage (the tutorial's ``class Step(dspy.Module)`` with a ``forward``) is called
once per stage per pipeline call. DSPy's ``Module.__call__`` (3.4.1) costs more than the engine's
whole stage hop: a callback wrapper that looks the callbacks up, a ``dspy.context`` that copies
every global setting to push the module onto ``caller_modules``, and a Python-level
``__getattribute__`` that inspects the caller's frame when ``forward`` is read. When nothing can
tell the difference, the engine does what that call does — push the module onto
``caller_modules`` in one override of DSPy's settings (:func:`~stageflow._callers.push_callers`)
and call the ``forward`` / ``aforward`` that ``Module.__call__`` would call — exactly as it does
for nested pipelines (:mod:`stageflow.engine.nested`), under the same conditions. It calls DSPy's
own method whenever:

- DSPy callbacks are active (``dspy.settings.callbacks`` or the module's own ``callbacks``);
- DSPy would track usage itself (``track_usage`` on with no usage tracker in force);
- the module's ``__call__`` / ``acall`` is not DSPy's own (a subclass overrides it, or
  instrumentation such as OpenInference wraps ``dspy.Module.__call__``);
- its class looks attributes up its own way (a ``__getattribute__`` of its own), or the method
  cannot be found as a plain attribute (DSPy's call then gives its own error).

A ``forward`` set on the instance is called, as ``Module.__call__`` calls it. Nothing is warned
that DSPy would not warn: ``Module.__call__`` reads ``forward`` without DSPy's "called directly"
warning, and so does this.

Example:
    >>> import dspy
    >>> from stageflow.engine.module_call import call_module
    >>> class AddOne(dspy.Module):
    ...     def forward(self, x):
    ...         return dspy.Prediction(x=x + 1, depth=len(dspy.settings.caller_modules))
    >>> call_module(AddOne(), {"x": 1})
    Prediction(
        x=2,
        depth=1
    )
"""

from __future__ import annotations

from typing import Any

import dspy

from stageflow._callers import push_callers
from stageflow.engine.nested import _settings, pushable
from stageflow.stages import _method_of

__all__ = ["acall_module", "call_module", "own_acall"]

_getattr = object.__getattribute__
#: Attribute lookups whose only effect beyond Python's own is DSPy's "called directly" warning.
_PLAIN_LOOKUPS = (dspy.Module.__getattribute__, object.__getattribute__)


def _method(target: Any, name: str) -> Any:
    """``target.<name>`` as ``Module.__call__`` reads it (Python's own lookup, as the stage's inputs
    were read from it), without DSPy's warning; ``None`` when it must be read by DSPy's own call."""
    if type(target).__getattribute__ not in _PLAIN_LOOKUPS:
        return None
    return _method_of(target, name)


def call_module(target: Any, kw: dict[str, Any]) -> Any:
    """``target(**kw)`` for a leaf ``dspy.Module`` stage (see the module docstring)."""
    if not pushable(target, "__call__"):
        return target(**kw)
    method = _method(target, "forward")
    if method is None:
        return target(**kw)
    token = push_callers([target])
    try:
        return method(**kw)
    finally:
        _settings.thread_local_overrides.reset(token)


async def acall_module(target: Any, kw: dict[str, Any]) -> Any:
    """``await target.acall(**kw)`` for a leaf ``dspy.Module`` stage with an ``aforward``."""
    if not pushable(target, "acall") or "acall" in _getattr(target, "__dict__"):
        return await target.acall(**kw)  # (an acall set on the instance is what that call runs)
    method = _method(target, "aforward")
    if method is None:
        return await target.acall(**kw)
    token = push_callers([target])
    try:
        return await method(**kw)
    finally:
        _settings.thread_local_overrides.reset(token)


def own_acall(target: Any) -> bool:
    """Whether ``await target.acall(...)`` runs code of yours rather than DSPy's ``Module.acall``: an
    ``acall`` set on the instance, or one a class of yours defines (for a module without
    ``aforward``, which the engine otherwise runs on a worker thread, since DSPy's ``acall`` would
    find none). Instrumentation that wraps ``dspy.Module.acall`` itself (OpenInference does) is
    still DSPy's ``acall``, wrapped: it counts as DSPy's."""
    attrs = getattr(target, "__dict__", None)
    if type(attrs) is dict and "acall" in attrs:
        return True
    for klass in type(target).__mro__:
        if "acall" in klass.__dict__:
            return klass not in _DSPY_CLASSES
    return False


#: The classes whose ``acall`` is DSPy's (whatever wraps it there).
_DSPY_CLASSES = frozenset(k for k in dspy.Module.__mro__ if k is not object)
