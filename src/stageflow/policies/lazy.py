"""Lazy evaluation: run a stage only when its result is first used, exactly once."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Mapping
from typing import Any

import dspy

from stageflow.stages import ENGINE_CALLS, FunctionStage, Ports, describe, wraps_function

__all__ = ["LazyResult", "LazyStage"]

_UNSET = object()


class LazyResult:
    """A stage result computed on first access (thread-safe; the stage runs exactly once).

    Attribute and item access are delegated to the real result. ``done`` tells whether it ran;
    ``value()`` forces it. The call runs in the context of the moment the stage was called, so
    ``dspy.context(lm=...)`` settings active then apply.
    """

    __slots__ = ("_args", "_ctx", "_error", "_lock", "_single", "_stage", "_value")

    def __init__(self, stage: Any, kwargs: dict[str, Any], single: str | None = None) -> None:
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_single", single)
        object.__setattr__(self, "_args", kwargs)
        object.__setattr__(self, "_ctx", contextvars.copy_context())
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_value", _UNSET)
        object.__setattr__(self, "_error", None)

    @property
    def done(self) -> bool:
        """Whether the stage has run."""
        return self._value is not _UNSET or self._error is not None

    def get_result(self) -> Any:
        """Force evaluation and return the result (the tutorial's name for :meth:`value`)."""
        return self.value()

    @property
    def predictions(self) -> dict[str, Any]:
        """The result's fields as a dict (forces evaluation)."""
        value = self.value()
        store = getattr(value, "_store", None)
        if isinstance(store, dict):
            return dict(store)
        if isinstance(value, dict):
            return dict(value)
        if hasattr(value, "model_dump"):
            return dict(value.model_dump())
        raise AttributeError(f"the result ({type(value).__name__}) has no named fields")

    def stageflow_resolve(self) -> Any:
        """What the engine merges when a pipeline holds the lazy stage: the forced result (a function
        stage's single declared output, returned bare, under its name)."""
        value = self.value(by_engine=True)
        if self._single is not None and not _is_record(value):
            return {self._single: value}
        return value

    def _run(self, by_engine: bool) -> Any:
        token = ENGINE_CALLS.set(self._stage) if by_engine else None
        try:
            return self._stage(**self._args)
        finally:
            if token is not None:
                ENGINE_CALLS.reset(token)

    def value(self, by_engine: bool = False) -> Any:
        """Run the stage if it has not run yet, and return its result (or raise its error).
        ``by_engine``: a pipeline's engine forces it, and checks the result when it merges it."""
        if self._value is _UNSET and self._error is None:
            with self._lock:
                if self._value is _UNSET and self._error is None:
                    from stageflow.engine.stopping import run_as_callers

                    try:
                        # (in the context of the call that made it, as work of whoever forces it)
                        object.__setattr__(self, "_value", run_as_callers(self._ctx, self._run, by_engine))
                    except asyncio.CancelledError as e:
                        # Refused because whoever forced it was abandoned: not the stage's result,
                        # so not kept (the next access runs the stage again). A CancelledError the
                        # stage raised on its own is its result, kept like any other error.
                        from stageflow.engine.stopping import enclosing_fan_out

                        signal = enclosing_fan_out()
                        if signal is not None and signal.gave_up():
                            raise
                        object.__setattr__(self, "_error", e)
                    except BaseException as e:
                        object.__setattr__(self, "_error", e)
        if self._error is not None:
            raise self._error
        return self._value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.value(), name)

    def __getitem__(self, key: Any) -> Any:
        value = self.value()
        if key == self._single and not _is_record(value):
            return value  # a function stage's single declared output, returned bare
        return value[key]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("LazyResult is read-only")

    def __repr__(self) -> str:
        return repr(self.value()) if self.done else f"LazyResult(pending: {self._stage!r})"


def _is_record(value: Any) -> bool:
    return isinstance(value, Mapping | dspy.Example) or hasattr(value, "model_dump")


class LazyStage(dspy.Module):  # type: ignore[misc]
    """Wrap a stage (any module, pipeline or function) so calling it defers the work.

    A ``dspy.Module``: the wrapped stage is its attribute ``underlying_stage``, so its predictors are
    visible to DSPy's optimizers and to ``save``/``load``. Calling it returns a :class:`LazyResult`
    at once; the stage runs on the first access to the result (``result.get_result()``,
    ``result.predictions``, a field, an item), exactly once. In a pipeline, the lazy stage's outputs
    are merged into the state when it finishes, which resolves it then. Its contract is the wrapped
    stage's: it receives only the inputs that stage takes and promises the outputs it declares.

    Examples:
        >>> import stageflow
        >>> ran = []
        >>> double = LazyStage(stageflow.stage(lambda x: ran.append(x) or {"y": 2 * x}, writes=["y"]))
        >>> r = double(x=21)
        >>> ran, r.done
        ([], False)
        >>> r["y"], r.get_result()["y"], ran
        (42, 42, [21])
    """

    #: The engine forces its result as part of the stage's call in a pipeline (policies apply).
    stageflow_lazy = True

    #: Its ports are its stage's, read live: a plan follows that stage's signature (see
    #: ``stageflow.engine.plan.signature_of``).
    stageflow_live_ports_of = "underlying_stage"

    def __init__(self, underlying_stage: Any) -> None:
        super().__init__()
        if not callable(underlying_stage):
            from stageflow.errors import ConfigurationError

            raise ConfigurationError(
                f"LazyStage needs a callable stage, got {underlying_stage!r}.", code="not_a_stage"
            )
        self.underlying_stage = underlying_stage

    @property
    def stage(self) -> Any:
        """The wrapped stage (an alias of ``underlying_stage``)."""
        return self.underlying_stage

    def stageflow_ports(self) -> Ports:
        """The wrapped stage's inputs and outputs: a pipeline feeds it exactly what that stage takes."""
        return describe(self.underlying_stage)

    def _single(self) -> str | None:
        """The one declared output of a function stage (or a ``Stage`` around one, under its renamed
        name), which the function may return bare."""
        stage = self.underlying_stage
        if not (isinstance(stage, FunctionStage) or wraps_function(stage)):
            return None
        outputs = stage.ports.outputs
        return outputs[0] if outputs is not None and len(outputs) == 1 else None

    def forward(self, **kwargs: Any) -> LazyResult:
        """Return a lazy result wrapper; nothing runs yet."""
        return LazyResult(self.underlying_stage, kwargs, self._single())

    async def aforward(self, **kwargs: Any) -> LazyResult:
        """Async twin of :meth:`forward` (the result is resolved on first access, as in sync code)."""
        return LazyResult(self.underlying_stage, kwargs, self._single())

    def __repr__(self) -> str:
        return f"LazyStage({self.underlying_stage!r})"
