"""Lazy evaluation: run a stage only when its result is first used, exactly once."""

from __future__ import annotations

from typing import Any

import dspy

from stageflow.policies.lazy_result import LazyResult
from stageflow.stages import FunctionStage, Ports, describe, wraps_function

__all__ = ["LazyResult", "LazyStage"]


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
