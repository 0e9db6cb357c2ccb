"""``fast_adapter_for``: the fast twin of whichever adapter is active."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import dspy

from stageflow.lm.fast._stats import count_adapter_fallback
from stageflow.lm.fast.adapters import FastChatAdapter, FastJSONAdapter

__all__ = ["fast_adapter_for"]

_TWIN_CLASSES: dict[type, type[Any]] = {dspy.ChatAdapter: FastChatAdapter, dspy.JSONAdapter: FastJSONAdapter}
_TWINS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def fast_adapter_for(adapter: Any = None) -> Any:
    """The fast twin of ``adapter`` (a new one of DSPy's default ``ChatAdapter`` for ``None``), or
    ``adapter``.

    ``dspy.ChatAdapter`` and ``dspy.JSONAdapter`` instances get a :class:`FastChatAdapter` /
    :class:`FastJSONAdapter` twin that *shares their attributes* (callbacks, native function
    calling, the JSON fallback switch...): changing one changes the other. The twin of an
    adapter is made once and reused while the adapter lives. A fast adapter is returned as it
    is. Any other adapter (a subclass, ``XMLAdapter``, ``TwoStepAdapter``...) is returned
    unchanged and counted in :func:`~stageflow.lm.fast.fast_path_stats` under its class name.

    Install one around a call with ``dspy.context(adapter=fast_adapter_for(dspy.settings.adapter))``.

    Examples:
        >>> import dspy
        >>> from stageflow.lm.fast import FastJSONAdapter, fast_adapter_for
        >>> type(fast_adapter_for(None)).__qualname__
        'FastChatAdapter'
        >>> user = dspy.JSONAdapter()
        >>> twin = fast_adapter_for(user)
        >>> isinstance(twin, FastJSONAdapter), twin is fast_adapter_for(user)
        (True, True)
        >>> user.use_native_function_calling = False
        >>> twin.use_native_function_calling
        False
        >>> xml = dspy.XMLAdapter()
        >>> fast_adapter_for(xml) is xml
        True
    """
    if adapter is None:
        if FastChatAdapter.base_patched():  # DSPy's ChatAdapter was patched: its own code, patch and all
            count_adapter_fallback("ChatAdapter (patched)")
            return dspy.ChatAdapter()
        # A new one each time, as DSPy makes a new ChatAdapter for each call when none is configured:
        # code that edits the one a pipeline call uses (``dspy.settings.adapter.callbacks.append``)
        # changes no other call, running or later (what it caches per signature is per class).
        return FastChatAdapter()
    if isinstance(adapter, FastChatAdapter | FastJSONAdapter):
        return adapter
    cls = _TWIN_CLASSES.get(type(adapter))
    if cls is not None and cls.base_patched():
        count_adapter_fallback(f"{type(adapter).__qualname__} (patched)")
        return adapter
    if cls is None:
        count_adapter_fallback(type(adapter).__qualname__)
        return adapter
    twin = _TWINS.get(adapter)
    if twin is None:
        twin = object.__new__(cls)
        twin.__dict__ = adapter.__dict__  # one set of attributes for both
        with _LOCK:
            twin = _TWINS.setdefault(adapter, twin)
    return twin
