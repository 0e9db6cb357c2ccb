"""The result of a pipeline call: final state as fields, run details as attributes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import dspy

__all__ = ["Result", "RunInfo", "StageRecord"]


class StageRecord(NamedTuple):
    """One stage execution in a run, in order (a named tuple: cheap to record).

    Attributes:
        path: The stage's DSPy-style path (``stages[1]``, ``branches['math'].predict``).
        elapsed: Wall seconds (monotonic clock).
        ok: ``False`` when the stage raised.
    """

    path: str
    elapsed: float
    ok: bool = True


@dataclass(slots=True)
class RunInfo:
    """Run details of one pipeline call (kept out of the result's fields).

    Attributes:
        stage_outputs: Each stage's raw output, by stage path (the last one for loops).
        trace: Ordered :class:`StageRecord` entries, nested stages included.
        extras: Pattern-specific details (``route_decision``, ``converged``, ``iterations``...).
        events: What policies did: retries, repairs, timeouts, fallbacks, recoveries, skips and
            cache hits (:class:`~stageflow.policies.PolicyEvent`), in order.
    """

    stage_outputs: dict[str, Any] = field(default_factory=dict)
    trace: list[StageRecord] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)


class Result(dspy.Prediction):  # type: ignore[misc]
    """A pipeline's result: a ``dspy.Prediction`` whose fields are the final state.

    Run details are attributes, not fields, so ``keys()``, metrics and nesting see only data:
    ``result.stage_outputs``, ``result.trace``, ``result.run``, and pattern extras such as
    ``result.route_decision`` or ``result.converged`` (looked up after the fields).
    """

    def __init__(self, state: dict[str, Any] | None = None, run: RunInfo | None = None, **kwargs: Any):
        super().__init__(**(state or {}), **kwargs)
        self._run = run if run is not None else RunInfo()

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        store = self.__dict__.get("_store")
        if store is not None and key in store:
            return store[key]
        run = self.__dict__.get("_run")
        if run is not None and key in run.extras:
            return run.extras[key]
        fields = list(store) if store is not None else []
        extras = list(run.extras) if run is not None else []
        raise AttributeError(
            f"Result has no field or run detail {key!r}. Fields: {fields}; details: {extras}."
        )

    @property
    def run(self) -> RunInfo:
        """All run details of this call."""
        return self.__dict__["_run"]  # type: ignore[no-any-return]

    @property
    def stage_outputs(self) -> dict[str, Any]:
        """Each stage's raw output, by stage path."""
        return self.run.stage_outputs

    @property
    def trace(self) -> list[StageRecord]:
        """The stages that ran, in order, with their wall time."""
        return self.run.trace
