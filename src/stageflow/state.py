"""The result of a pipeline call: final state as fields, run details as attributes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import dspy

from stageflow.usage import UsageTable

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
        details: The run details of nested pipelines, by their full stage path (a ForEach's
            ``item_errors``, a loop's ``iterations``, an adaptive stage's ``used_structure``...).
        usage: LM calls, tokens, cost, cache hits, retries and repairs by stage path
            (:class:`~stageflow.usage.UsageTable`; ``run.usage.total``, ``run.usage.tree()``).
    """

    stage_outputs: dict[str, Any] = field(default_factory=dict)
    trace: list[StageRecord] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    usage: UsageTable = field(default_factory=UsageTable)

    def absorb(self, prefix: str, other: RunInfo) -> None:
        """Add a nested pipeline's (or a fan-out branch's) run to this one, its paths under ``prefix``."""
        if prefix:
            self.trace.extend(StageRecord(f"{prefix}.{r.path}", r.elapsed, r.ok) for r in other.trace)
            for k, v in other.stage_outputs.items():
                self.stage_outputs[f"{prefix}.{k}"] = v
            if other.extras:
                self.details[prefix] = other.extras
            for k, v in other.details.items():
                self.details[f"{prefix}.{k}" if k else prefix] = v
        else:
            self.trace.extend(other.trace)
            self.stage_outputs.update(other.stage_outputs)
            self.details.update(other.details)
        self.events.extend(other.events)
        self.usage.absorb(prefix, other.usage)


#: Run details every result answers, computed on demand (a field of the same name wins).
_COMPUTED = ("output", "final_state", "result", "predictions")


class Result(dspy.Prediction):  # type: ignore[misc]
    """A pipeline's result: a ``dspy.Prediction`` whose fields are the final state.

    Run details are attributes, not fields, so ``keys()``, metrics and nesting see only data:
    ``result.stage_outputs``, ``result.trace``, ``result.run``, and pattern extras such as
    ``result.route_decision`` or ``result.converged`` (looked up after the fields). As in the
    architecture tutorial, ``result.output``, ``result.final_state`` and ``result.predictions`` are the
    final state as a dict, and ``result.result`` is what the pattern ran (a branch's or a chosen
    structure's result; the final state otherwise). A field of the same name always wins.

    Examples:
        >>> r = Result({"answer": "42"})
        >>> r.answer, r.output, r.keys()
        ('42', {'answer': '42'}, ['answer'])
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
        if key in _COMPUTED and store is not None:
            return dict(store)
        fields = list(store) if store is not None else []
        extras = [*(list(run.extras) if run is not None else []), *_COMPUTED]
        raise AttributeError(
            f"Result has no field or run detail {key!r}. Fields: {fields}; details: {extras}."
        )

    @property
    def run(self) -> RunInfo:
        """All run details of this call."""
        return self.__dict__["_run"]  # type: ignore[no-any-return]

    @property
    def stage_outputs(self) -> dict[str, Any]:
        """Each stage's raw output, by full stage path (nested stages included; the last one in loops)."""
        return self.run.stage_outputs

    @property
    def trace(self) -> list[StageRecord]:
        """The stages that ran, in order, with their wall time."""
        return self.run.trace

    @property
    def details(self) -> dict[str, dict[str, Any]]:
        """Run details of nested pipelines by stage path, this pipeline's own under ``""``.

        ``result.details["stages[1]"]["item_errors"]`` reads a nested ForEach's failed items.
        """
        return {"": self.run.extras, **self.run.details}
