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
it. When the nested pipeline's own run has nothing to decide either (no hooks, defaults or budget;
see :mod:`stageflow.engine.inline`), the engine runs it in line, with the same settings override.

**Attribute access.** ``dspy.Module`` (3.4.1) also overrides ``__getattribute__`` in Python, for one
purpose: to warn when ``module.forward`` is read from anywhere but ``Module.__call__`` ("Calling
module.forward(...) directly is discouraged"). That hook runs on *every* attribute read of every
module — about twenty per pipeline call, each costing more than a stage hop of stageflow's engine.
Pipelines restore Python's own lookup and keep the warning with :class:`ForwardAccess`, a descriptor
that wraps each pipeline class's ``forward`` (:func:`wrap_forward`) and warns on the same
condition; reads that DSPy's hook never saw (``super().forward(...)`` in a subclass's ``forward``)
do not warn either.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import dspy  # noqa: F401  (DSPy's settings module is loaded with it)

from stageflow._callers import KNOWN_ENTRY_POINTS as _KNOWN
from stageflow._callers import Pushed, push_callers, setting
from stageflow._callers import is_dspys_entry as _is_dspys

# The module, not the ``settings`` object that ``dspy.dsp.utils`` exports under the same name.
_settings: Any = importlib.import_module("dspy.dsp.utils.settings")

__all__ = [
    "ForwardAccess",
    "acall_nested",
    "bind_forward",
    "callbacks_on",
    "call_nested",
    "own_forward",
    "plain_call",
    "push_callers",
    "pushable",
    "wrap_forward",
]

_getattr = object.__getattribute__
_F = TypeVar("_F", bound=Callable[..., Any])


# DSPy's logger and message, so the warning reads as it always did.
_dspy_logger = logging.getLogger("dspy.primitives.module")


class ForwardAccess:
    """A pipeline class's ``forward``: reading it from an instance outside ``__call__`` warns as DSPy
    does; reading it from the class gives the plain function."""

    def __init__(self, fn: Any) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn  # (after: update_wrapper copies the wrapped object's __dict__, which may hold an "fn")

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return bind_forward(self.fn, None, owner)
        caller = sys._getframe(1)
        name = caller.f_code.co_name
        if name != "__call__" and not (name == "forward" and caller.f_locals.get("self") is obj):
            # (the second test leaves out super().forward(...) in a subclass's forward, which
            # DSPy's __getattribute__ does not see)
            _dspy_logger.warning(
                f"Calling module.forward(...) on {type(obj).__name__} directly is discouraged. "
                "Please use module(...) instead."
            )
        return bind_forward(self.fn, obj, owner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def bind_forward(fn: Any, obj: Any, owner: Any) -> Any:
    """``fn`` (what a class body holds under ``forward``) read from ``obj`` as Python reads it: a
    function is bound to ``obj``; a ``staticmethod``, a ``wrapt`` wrapper, anything with its own
    ``__get__`` binds itself; an object without one (a ``functools.partial``) is itself."""
    get = getattr(type(fn), "__get__", None)
    return fn if get is None else get(fn, obj, owner)


def plain_call(*options: str) -> Callable[[_F], _F]:
    """Mark a pipeline's ``forward`` / ``aforward`` as doing exactly ``stageflow_call(inputs)`` /
    ``stageflow_acall(inputs)`` when called with keyword inputs none of which is named in ``options``
    (its own keyword options): the engine then calls the nested pipeline through that entry, without
    packing the inputs into keywords and unpacking them again."""

    def mark(fn: _F) -> _F:
        fn._stageflow_options = frozenset(options)  # type: ignore[attr-defined]
        return fn

    return mark


def wrap_forward(cls: type) -> None:
    """Wrap the ``forward`` that ``cls`` defines itself (if any) in a :class:`ForwardAccess`."""
    fn = cls.__dict__.get("forward")
    if (
        fn is not None
        and not isinstance(fn, ForwardAccess)
        and (callable(fn) or hasattr(type(fn), "__get__"))
    ):
        setattr(cls, "forward", ForwardAccess(fn))  # noqa: B010


def own_forward(cls: type) -> Any:
    """The ``forward`` a subclass of a pipeline pattern defines without an ``aforward`` to go with it
    (a plain function), or ``None``. ``acall`` must run that ``forward`` too — as it runs a
    ``forward`` set on the instance — instead of the pattern's own async plan, which would skip it."""
    for c in cls.__mro__:
        attrs = c.__dict__
        if "aforward" in attrs:
            return None
        if "forward" in attrs:
            fn = attrs["forward"]
            return fn.fn if isinstance(fn, ForwardAccess) else fn
    return None


def callbacks_on() -> bool:
    """Whether DSPy callbacks are in force here. Read on every call, never remembered: a stage may
    append one to the callbacks list in place mid-run, and later modules must report to it."""
    return bool(setting("callbacks"))


def pushable(target: Any, name: str) -> bool:
    """Whether the engine may do what ``Module.<name>`` would set up for ``target`` itself (see the
    module docstring), instead of calling DSPy's own method."""
    fn = getattr(type(target), name)
    if _KNOWN.get(name) is not fn and not _dspys(fn, name):
        return False
    own = _getattr(target, "__dict__").get("callbacks")  # (every module gets its own list...)
    if type(own) is not list:  # (...unless a property or a class attribute stands in: read as
        own = getattr(target, "callbacks", None)  # DSPy's callback wrapper reads it)
    if own:
        return False
    if callbacks_on():
        return False
    overrides = _settings.thread_local_overrides.get()
    if type(overrides) is Pushed:  # (one push made: it checked the same usage settings)
        return True
    return overrides.get("usage_tracker") is not None or not (
        overrides["track_usage"]
        if "track_usage" in overrides
        else _settings.main_thread_config.get("track_usage")
    )


#: ``__call__`` / ``acall`` functions found not to be DSPy's own (a subclass's, an instrumentation
#: wrapper), by identity: remembered, so a module of such a class pays the code-location check once.
#: Kept by ``id``, weakly (a function holds its class: a class made on the fly must still be freed),
#: and compared with ``is`` (a ``wrapt`` wrapper compares and hashes equal to the function it wraps,
#: which must not count as foreign once the wrapper is gone).
_FOREIGN: dict[str, dict[int, Any]] = {"__call__": {}, "acall": {}}


def _forget(foreign: dict[int, Any], key: int, ref: Any) -> None:
    if foreign.get(key) is ref:
        foreign.pop(key, None)


def _dspys(fn: Any, name: str) -> bool:
    foreign = _FOREIGN[name]
    key = id(fn)
    ref = foreign.get(key)
    if ref is not None and ref() is fn:
        return False
    if _is_dspys(fn, name):
        return True
    if len(foreign) > 4096:  # (wrappers made per access never come back: keep it bounded)
        foreign.clear()
    with contextlib.suppress(TypeError):  # (not referable weakly: checked each time)
        foreign[key] = weakref.ref(fn, functools.partial(_forget, foreign, key))
    return False


def _push(target: Any, name: str) -> Any:
    """Enter what ``Module.<name>`` would set up for ``target``; ``None`` when the engine must call
    DSPy's own method instead. Returns the token to reset."""
    return push_callers([target]) if pushable(target, name) else None


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
        cls = type(target)
        own = cls.__dict__.get("forward")  # (the class's own: read without running the descriptor)
        if type(own) is not ForwardAccess:
            return cls.forward(target, **kw)
        options = getattr(own, "_stageflow_options", None)
        if options is not None and options.isdisjoint(kw):
            return target.stageflow_call(kw)
        return bind_forward(own.fn, target, cls)(**kw)
    finally:
        _settings.thread_local_overrides.reset(token)


async def acall_nested(target: Any, kw: dict[str, Any]) -> Any:
    """``await target.acall(**kw)`` for a nested stageflow pipeline (see the module docstring)."""
    token = _push(target, "acall")
    if token is None:
        return await target.acall(**kw)
    try:
        own = type(target).__dict__.get("aforward")
        options = getattr(own, "_stageflow_options", None)
        attrs = _getattr(target, "__dict__")
        plain = "forward" not in attrs and "aforward" not in attrs  # (nothing set on the instance)
        if options is not None and options.isdisjoint(kw) and plain:
            return await target.stageflow_acall(kw)
        return await _getattr(target, "aforward")(**kw)
    finally:
        _settings.thread_local_overrides.reset(token)
