"""Reading a stageflow module's ``forward``: Python's own attribute lookup, with DSPy's warning kept.

``dspy.Module`` (3.4.1) overrides ``__getattribute__`` in Python for one purpose: to warn when
``module.forward`` is read from anywhere but ``Module.__call__`` ("Calling module.forward(...)
directly is discouraged"). That hook runs on *every* attribute read of every module, each costing
more than the read itself. Stageflow's own module classes (pipelines, ``Stage``, ``FunctionStage``)
restore Python's own lookup (``__getattribute__ = object.__getattribute__``) and keep the warning
with :class:`ForwardAccess`, a descriptor that wraps each class's ``forward``
(:func:`wrap_forward`) and warns on the same condition; reads that DSPy's hook never saw
(``super().forward(...)`` in a subclass's ``forward``) do not warn either.

Example:
    >>> class Shout:
    ...     def forward(self, text):
    ...         return text.upper()
    >>> wrap_forward(Shout)
    >>> type(Shout.__dict__["forward"]).__name__, Shout.forward(None, "hi")
    ('ForwardAccess', 'HI')
"""

from __future__ import annotations

import functools
import logging
import sys
from types import MethodType
from typing import Any

__all__ = ["ForwardAccess", "wrap_forward"]

# DSPy's logger and message, so the warning reads as it always did.
_dspy_logger = logging.getLogger("dspy.primitives.module")


class ForwardAccess:
    """A stageflow module class's ``forward``: reading it from an instance outside ``__call__`` warns
    as DSPy does; reading it from the class gives the plain function."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self.fn
        caller = sys._getframe(1)
        name = caller.f_code.co_name
        if name != "__call__" and not (name == "forward" and caller.f_locals.get("self") is obj):
            # (the second test leaves out super().forward(...) in a subclass's forward, which
            # DSPy's __getattribute__ does not see)
            _dspy_logger.warning(
                f"Calling module.forward(...) on {type(obj).__name__} directly is discouraged. "
                "Please use module(...) instead."
            )
        return MethodType(self.fn, obj)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def wrap_forward(cls: type) -> None:
    """Wrap the ``forward`` that ``cls`` defines itself (if any) in a :class:`ForwardAccess`."""
    fn = cls.__dict__.get("forward")
    if fn is not None and not isinstance(fn, ForwardAccess) and callable(fn):
        setattr(cls, "forward", ForwardAccess(fn))  # noqa: B010
