"""The small public protocol between the engine and the pipelines it runs.

The engine never reaches into a pipeline's private attributes or writes into its ``__dict__``; it
calls these methods, which :class:`~stageflow.Pipeline` implements (patterns override the ones
they need). Every method is prefixed ``stageflow_`` so it cannot collide with a user's attribute
on a ``dspy.Module`` subclass.

- ``stageflow_ports()``: what the pipeline reads and writes when it is a stage of another one
  (any stage may implement it to declare its ports; see :func:`stageflow.describe`).
- ``stageflow_hooks()``: hooks the pipeline activates for its own runs (observing conveniences).
- ``stageflow_defaults()``: the pipeline's own default policies (``set_defaults``), or ``None``.
- ``stageflow_policy(entry)``: the policy in force for one of its stages, defaults merged in. The
  engine asks only while some defaults are in force (:data:`DEFAULT_POLICY` is set, which a call
  of a pipeline with defaults does for its run); otherwise a stage's policy is ``entry.policy``.
- ``stageflow_result(state, run, hooks)``: the :class:`~stageflow.Result` of a finished call.
- ``stageflow_deferred(stage_path, field)``: the stages with undeclared outputs a deferred read
  was expected from (used in the run-time contract error).
- ``stageflow_failed(run, hooks, error)``: a call raised (observers record what ran).
- ``stageflow_call(inputs)`` / ``stageflow_acall(inputs)``: what ``forward(**inputs)`` /
  ``aforward(**inputs)`` do, for a pipeline whose ``forward`` is marked with
  :func:`~stageflow.engine.nested.plain_call` (the engine calls nested pipelines through them).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stageflow.engine.plan import StageEntry
    from stageflow.policies.recovery import StagePolicy
    from stageflow.stages import Ports
    from stageflow.state import Result, RunInfo

__all__ = ["DEFAULT_POLICY", "StageOwner"]

#: Defaults set with ``pipeline.set_defaults(...)`` in force here: they reach the stages of pipelines
#: nested in the one that set them (the nearest enclosing pipeline that set some wins).
DEFAULT_POLICY: ContextVar[StagePolicy | None] = ContextVar("stageflow_default_policy", default=None)


class StageOwner:
    """Base of every object that owns stages the engine runs (see the module docstring)."""

    def stageflow_ports(self) -> Ports:
        raise NotImplementedError

    def stageflow_hooks(self) -> tuple[Any, ...]:
        """Hooks this pipeline activates for its own runs (and nested ones); a class that does not
        override this method activates none, and the engine does not ask."""
        return ()

    def stageflow_defaults(self) -> StagePolicy | None:
        return None

    def stageflow_policy(self, entry: StageEntry) -> StagePolicy | None:
        return entry.policy  # type: ignore[no-any-return]

    def stageflow_result(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...]) -> Result:
        raise NotImplementedError

    def stageflow_deferred(self, stage_path: str, field: str) -> tuple[str, ...]:
        return ()

    def stageflow_failed(self, run: RunInfo, hooks: tuple[Any, ...], error: BaseException) -> None:
        return None

    def stageflow_current(self, entry: StageEntry, prefix: str) -> StageEntry:
        """``entry``, or its stage's entry in a re-made plan when the signature of its predictor was
        replaced in place with other fields since the plan was made (see ``stageflow_replanned``)."""
        from stageflow.engine.plan import signature_moved

        return self.stageflow_replanned(entry, prefix) if signature_moved(self, entry) else entry

    def stageflow_replanned(self, entry: StageEntry, prefix: str) -> StageEntry:
        """The entry of the stage of ``entry`` after its predictor's signature was replaced in place
        with other fields (the owner re-makes its plan when it can)."""
        from dataclasses import replace

        from stageflow.engine.plan import build_entry, held

        return replace(build_entry(entry.attr, entry.key, held(self, entry)), path=entry.path)
