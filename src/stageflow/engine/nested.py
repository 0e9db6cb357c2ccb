"""Calling a nested stageflow pipeline: what DSPy's ``Module.__call__`` does, at a fraction of its cost.

A pipeline nested in another is a stage the engine calls on every call of the outer one. Going
through ``dspy.Module.__call__`` (DSPy 3.4.1) costs more than the nested pipeline's own engine work:
a callback wrapper, and a ``dspy.context`` that copies every global setting to push the module onto
``caller_modules``. When nothing can tell the difference, the engine does what that call does
itself — push the pipeline onto ``caller_modules`` (LM calls inside are recorded in its
``history``, as DSPy records them) and call its ``forward`` / ``aforward`` — in one override of
DSPy's settings. It takes DSPy's own ``__call__`` / ``acall`` whenever:

- DSPy callbacks are active (``dspy.settings.callbacks`` or the pipeline's own ``callbacks``);
- DSPy would track usage itself (``track_usage`` on with no usage tracker in force; inside a
  stageflow run one always is);
- the pipeline's ``__call__`` / ``acall`` is not DSPy's own: a subclass overrides it, or
  instrumentation wraps ``dspy.Module.__call__`` (OpenInference does).

A ``forward`` replaced on the instance (GEPA, the tutorial's custom logic) is called, as DSPy calls
it.
"""

from __future__ import annotations

import importlib
from types import FunctionType
from typing import Any

import dspy  # noqa: F401  (DSPy's settings module is loaded with it)

# The module, not the ``settings`` object that ``dspy.dsp.utils`` exports under the same name.
_settings: Any = importlib.import_module("dspy.dsp.utils.settings")

__all__ = ["acall_nested", "call_nested"]

_getattr = object.__getattribute__
#: DSPy's own ``Module.__call__`` and ``Module.acall`` once recognised (see :func:`_is_dspys`).
_KNOWN: dict[str, Any] = {}


def _is_dspys(fn: Any, name: str) -> bool:
    """Whether ``fn`` is DSPy's ``Module.<name>`` as DSPy defines it: its callbacks wrapper (a plain
    function from ``dspy/utils/callback.py``) around the function of that name in
    ``dspy/primitives/module.py``. An instrumentation wrapper (``wrapt``) is not a plain function."""
    inner = getattr(fn, "__wrapped__", None)
    ok = (
        type(fn) is FunctionType
        and fn.__code__.co_filename.replace("\\", "/").endswith("dspy/utils/callback.py")
        and type(inner) is FunctionType
        and inner.__qualname__ == f"Module.{name}"
        and inner.__code__.co_filename.replace("\\", "/").endswith("dspy/primitives/module.py")
    )
    if ok:
        _KNOWN[name] = fn
    return ok


def _push(target: Any, name: str) -> Any:
    """Enter what ``Module.<name>`` would set up for ``target``; ``None`` when the engine must call
    DSPy's own method instead. Returns the token that :func:`_pop` resets."""
    fn = getattr(type(target), name)
    if _KNOWN.get(name) is not fn and not _is_dspys(fn, name):
        return None
    if _getattr(target, "__dict__").get("callbacks"):
        return None
    var = _settings.thread_local_overrides
    overrides = var.get()
    main = _settings.main_thread_config
    if overrides["callbacks"] if "callbacks" in overrides else main.get("callbacks"):
        return None
    if overrides.get("usage_tracker") is None and (
        overrides["track_usage"] if "track_usage" in overrides else main.get("track_usage")
    ):
        return None
    callers = overrides["caller_modules"] if "caller_modules" in overrides else main.get("caller_modules")
    # As dspy.context(caller_modules=...) does: every setting in force, frozen for the call.
    new = _settings.dotdict({**main, **overrides})
    new["caller_modules"] = [*callers, target] if callers else [target]
    return var.set(new)


def call_nested(target: Any, kw: dict[str, Any]) -> Any:
    """``target(**kw)`` for a stageflow pipeline nested in the running one (see the module docstring)."""
    token = _push(target, "__call__")
    if token is None:
        return target(**kw)
    try:
        # As ``self.forward(**kw)`` in Module.__call__ (a forward set on the instance wins), minus
        # the warning a pipeline gives when its forward is read from anywhere else.
        patched = _getattr(target, "__dict__").get("forward")
        if patched is not None:
            return patched(**kw)
        return type(target).forward(target, **kw)
    finally:
        _settings.thread_local_overrides.reset(token)


async def acall_nested(target: Any, kw: dict[str, Any]) -> Any:
    """``await target.acall(**kw)`` for a nested stageflow pipeline (see the module docstring)."""
    token = _push(target, "acall")
    if token is None:
        return await target.acall(**kw)
    try:
        return await _getattr(target, "aforward")(**kw)
    finally:
        _settings.thread_local_overrides.reset(token)
