"""Lazy evaluation: run a stage only when its result is first used, exactly once."""

from __future__ import annotations

import contextvars
import threading
from typing import Any

__all__ = ["LazyResult", "LazyStage"]

_UNSET = object()


class LazyResult:
    """A stage result computed on first access (thread-safe; the stage runs exactly once).

    Attribute and item access are delegated to the real result. ``done`` tells whether it ran;
    ``value()`` forces it. The call runs in the context of the moment the stage was called, so
    ``dspy.context(lm=...)`` settings active then apply.
    """

    __slots__ = ("_args", "_ctx", "_error", "_lock", "_stage", "_value")

    def __init__(self, stage: Any, kwargs: dict[str, Any]) -> None:
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_args", kwargs)
        object.__setattr__(self, "_ctx", contextvars.copy_context())
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_value", _UNSET)
        object.__setattr__(self, "_error", None)

    @property
    def done(self) -> bool:
        """Whether the stage has run."""
        return self._value is not _UNSET or self._error is not None

    def value(self) -> Any:
        """Run the stage if it has not run yet, and return its result (or raise its error)."""
        if self._value is _UNSET and self._error is None:
            with self._lock:
                if self._value is _UNSET and self._error is None:
                    try:
                        object.__setattr__(self, "_value", self._ctx.run(self._stage, **self._args))
                    except BaseException as e:
                        object.__setattr__(self, "_error", e)
        if self._error is not None:
            raise self._error
        return self._value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.value(), name)

    def __getitem__(self, key: Any) -> Any:
        return self.value()[key]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("LazyResult is read-only")

    def __repr__(self) -> str:
        return repr(self.value()) if self.done else f"LazyResult(pending: {self._stage!r})"


class LazyStage:
    """Wrap a stage (any module, pipeline or function) so calling it defers the work.

    Examples:
        >>> import stageflow
        >>> ran = []
        >>> double = LazyStage(stageflow.stage(lambda x: ran.append(x) or {"y": 2 * x}, writes=["y"]))
        >>> r = double(x=21)
        >>> ran, r.done
        ([], False)
        >>> r["y"], r["y"], ran
        (42, 42, [21])
    """

    def __init__(self, stage: Any) -> None:
        if not callable(stage):
            from stageflow.errors import ConfigurationError

            raise ConfigurationError(f"LazyStage needs a callable stage, got {stage!r}.", code="not_a_stage")
        self.stage = stage

    def __call__(self, **kwargs: Any) -> LazyResult:
        return LazyResult(self.stage, kwargs)

    def __repr__(self) -> str:
        return f"LazyStage({self.stage!r})"
