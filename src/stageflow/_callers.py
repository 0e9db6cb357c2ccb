"""Pushing modules onto DSPy's ``caller_modules`` the way ``dspy.Module.__call__`` does, cheaper.

``Module.__call__`` runs the module inside ``settings.context(caller_modules=[*callers, module])``,
which also copies every global setting into the override. Inside a pipeline call the override
already holds every global key, so a copy of it with the longer ``caller_modules`` gives every
reader the same settings for a third of the cost (a global key it lacks — configured since, or no
DSPy call around — is taken in, as DSPy's copy takes it). The engine (nested pipelines run in line) and the
LM stage path (:func:`stageflow.lm.fast.call_predictor`) both push this way.

Example:
    >>> import dspy
    >>> from dspy.dsp.utils.settings import settings, thread_local_overrides
    >>> from stageflow._callers import push_callers
    >>> module = dspy.Predict("question -> answer")
    >>> token = push_callers([module])
    >>> settings.caller_modules[-1] is module
    True
    >>> thread_local_overrides.reset(token)
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from types import FunctionType
from typing import Any

import dspy  # noqa: F401  (DSPy's settings module is loaded with it)

# The module, not the ``settings`` object that ``dspy.dsp.utils`` exports under the same name.
_settings: Any = importlib.import_module("dspy.dsp.utils.settings")

__all__ = ["KNOWN_ENTRY_POINTS", "Pushed", "is_dspys_entry", "push_callers", "setting"]


def setting(name: str) -> Any:
    """``dspy.settings.<name>`` here now, read as DSPy's settings object reads it (its override for
    this thread or task, else the global value; ``None`` when unset), without its attribute hook."""
    overrides = _settings.thread_local_overrides.get()
    return overrides[name] if name in overrides else _settings.main_thread_config.get(name)


class Pushed(_settings.dotdict):  # type: ignore[misc]
    """DSPy's settings override as :func:`push_callers` sets it: a copy of the one before with more
    caller modules, so what was checked of the one before (callbacks, usage tracking) holds for it."""

    #: ``main_size``: how many global settings there were when it was made (it holds every one of
    #: them; DSPy's ``configure`` only ever adds keys, so while the count is the same, it still
    #: does). A slot of the object, not a setting: set with ``object.__setattr__``.
    __slots__ = ("main_size",)

    def __reduce__(self) -> Any:
        # A copy or a pickle is a plain settings dict (which knows no main_size), never a slot
        # restored through dotdict's __setattr__ as a setting.
        return (_settings.dotdict, (dict(self),))

    def __copy__(self) -> Any:
        return _settings.dotdict(self)


#: The last override found to hold every global setting (weakly: it holds the LM and the modules
#: of a run), and how many there were then.
_CHECKED: list[Any] = [lambda: None, -1]
_set_size = Pushed.main_size.__set__  # (the slot, set directly)


def push_callers(targets: list[Any]) -> Any:
    """Push ``targets`` (outermost first) onto DSPy's ``caller_modules`` in one override of its
    settings; returns the token to reset (``thread_local_overrides.reset(token)``)."""
    var = _settings.thread_local_overrides
    overrides = var.get()
    main = _settings.main_thread_config
    size = len(main)
    # As dspy.context: every global setting as it is now, then the overrides in force. Inside a
    # DSPy call the overrides already hold every global key (a plain copy gives the same); a
    # setting configured since (``dspy.configure`` in a stage) is taken in, as DSPy's copy takes it.
    if type(overrides) is Pushed:
        callers = overrides["caller_modules"]
        whole = overrides.main_size == size
    else:  # (a run's override, pushed onto once per stage: checked once while the count holds)
        callers = overrides["caller_modules"] if "caller_modules" in overrides else main.get("caller_modules")
        whole = _CHECKED[0]() is overrides and _CHECKED[1] == size
        if not whole and main.keys() <= overrides.keys():
            whole = True
            with contextlib.suppress(TypeError):  # (a plain dict cannot be referred to weakly)
                _CHECKED[:] = (weakref.ref(overrides), size)
    if whole or main.keys() <= overrides.keys():
        new = Pushed(overrides)
    else:
        new = Pushed({**main, **overrides})
    _set_size(new, size)
    new["caller_modules"] = [*callers, *targets] if callers else targets
    return var.set(new)


#: DSPy's own ``Module.__call__`` and ``Module.acall`` once recognised (see :func:`is_dspys_entry`).
KNOWN_ENTRY_POINTS: dict[str, Any] = {}


def is_dspys_entry(fn: Any, name: str) -> bool:
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
        KNOWN_ENTRY_POINTS[name] = fn
    return ok
