"""A :class:`~stageflow.Stage` with policies, called where no pipeline runs it (on its own, from a
module's ``forward``, wrapped in another ``Stage``): the engine's policy code runs around the call,
as it does for the stage in a pipeline, and the call takes and returns what the stage alone does
(any keyword arguments, any return value; a record missing an output the stage declares is the
``ContractError`` a pipeline raises).

- ``stage(...)`` / ``await stage.acall(...)`` run the whole stage under its policies, a subclass's
  own ``forward`` included, as a pipeline runs it.
- ``stage.forward(...)`` (the tutorial calls stages that way) on a ``Stage`` or ``CachedStage``
  runs the wrapped module under the policies the class does not apply in its own ``forward``
  (``CachedStage``'s cache). A subclass's own ``forward`` is its code: called directly, it runs
  as written.

The error the stage raised (the last attempt's, once retries are spent) reaches the caller as it
was raised. ``recover=`` gives the fields the strategy returned; a skipped stage gives ``None``
(wrapped in another ``Stage``, which cannot be left out for it, the wrapper raises a
:class:`~stageflow.StageError` saying so). What the policies did joins the run of the pipeline whose
stage made the call (``result.run.events``, under that stage's path).

Example:
    >>> import stageflow
    >>> tries = stageflow.untracked([])
    >>> def flaky(x):
    ...     tries.append(x)
    ...     if len(tries) < 3:
    ...         raise ConnectionError("connection reset")
    ...     return {"y": x * 2}
    >>> retry = stageflow.RetryPolicy(max_attempts=3, initial_delay=0)
    >>> retried = stageflow.Stage(flaky, writes=["y"], retry=retry)
    >>> retried(x=21), len(tries)
    ({'y': 42}, 3)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import dspy

from stageflow.engine.guarded import aguarded_call, guarded_call
from stageflow.engine.plan import StageEntry, build_entry, join_path
from stageflow.engine.runner import _invoke, _invoke_async, _recovered
from stageflow.errors import StageError, StageflowError
from stageflow.policies.recovery import StagePolicy
from stageflow.stages import (
    FunctionStage,
    Stage,
    enter_applied,
    leave_applied,
    left_to_engine,
    own_call,
    stage_label,
)
from stageflow.state import RunInfo
from stageflow.usage import calling_stage

__all__ = ["acall_alone", "call_alone"]


class _Owner:
    """Holds the stage where the engine's policy code looks for it (its fallback stage), under the
    name the engine's messages, warnings and events then give it: ``Stage(<what it wraps>)``. No
    stage path of a pipeline looks like that, so only what the engine said of this call is
    rewritten."""

    def __init__(self, name: str, stage: Stage) -> None:
        setattr(self, name, stage)


How = Literal["call", "module", "cached"]


def _setup(
    stage: Stage, kwargs: dict[str, Any], how: How
) -> tuple[str, StageEntry, Any, dict[str, Any], StagePolicy]:
    """``(name, entry, target, inputs, policy)`` for the guarded call of ``stage`` (``how``: see
    :func:`call_alone`); ``name`` is the stage's path in it."""
    name = f"Stage({stage_label(stage.module)})"
    if how == "call":
        # A subclass of yours: its whole call (its own __call__ / acall if it has one, DSPy's
        # Module.__call__ and its own forward), on this very object.
        entry = _alone(build_entry(name, None, stage))
        return name, entry, _Rest(stage), dict(kwargs), _left(stage)
    view: Stage = Stage.__new__(Stage)  # (the stage as a plain Stage: the engine calls its module)
    view.__dict__ = stage.__dict__
    entry = _alone(build_entry(name, None, view))
    policy = stage.policy if how == "cached" else _left(stage)
    assert policy is not None  # (callers check)
    if not entry.chain:  # (not unwrapped, e.g. a Stage around a Stage: the view renames, as forward does)
        return name, entry, view, dict(kwargs), policy
    inputs = stage.stage_inputs(kwargs)  # (as Stage.forward renames them, and checks them)
    stage.check_inputs(inputs, kwargs)
    target: Any = view
    for part in entry.chain:  # (what the engine calls: the module, or a function stage's function)
        target = getattr(target, part)
    return name, entry, target, inputs, policy


def _alone(entry: StageEntry) -> StageEntry:
    """The entry for a call on its own: a lazy stage stays lazy there (it returns its pending
    ``LazyResult``; only a pipeline forces it as part of the stage's call)."""
    return replace(entry, lazy=False) if entry.lazy else entry


class _Rest:
    """A stage's call below ``Stage.__call__`` / ``acall``: DSPy's module call, then its forward."""

    __slots__ = ("stage",)

    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    def __call__(self, **kwargs: Any) -> Any:
        own = own_call(type(self.stage), "__call__")  # (a __call__ of yours runs, as in a pipeline)
        if own is not None:
            return own(self.stage, **kwargs)
        return super(Stage, self.stage).__call__(**kwargs)

    async def acall(self, **kwargs: Any) -> Any:
        own = own_call(type(self.stage), "acall")
        if own is not None:
            return await own(self.stage, **kwargs)
        return await super(Stage, self.stage).acall(**kwargs)


def _left(stage: Stage) -> StagePolicy:
    policy = left_to_engine(type(stage), stage.policy)
    assert policy is not None  # (callers check: _unapplied)
    return policy


def _output(stage: Stage, entry: StageEntry, out: Any, run: RunInfo) -> Any:
    if type(out) is dict and any(e.kind == "fallback" for e in run.events) and _gives_predictions(stage):
        out = dspy.Prediction(**out)  # (a fallback default, returned as the module returns its answer)
    if not entry.chain:  # (the stage's own call, or the view's: what it returned, renamed by it)
        return stage.held(out)
    return stage._returned(out)


def _gives_predictions(stage: Stage) -> bool:
    """Whether the module ``stage`` wraps (through ``Stage`` layers) is a DSPy module, which answers
    with a ``dspy.Prediction`` (a function stage answers with a dict)."""
    module: Any = stage.module
    while isinstance(module, Stage):
        module = module.module
    return isinstance(module, dspy.Module) and not isinstance(module, FunctionStage)


def _relabelled(error: StageflowError, name: str) -> StageflowError:
    """What the engine said of this call's stage (its path ``name`` there), said of the stage."""
    if error.stage_path != name:
        return error
    label = name[len("Stage(") : -1]
    error.message = error.message.replace(f"Stage '{name}' ({label})", name).replace(f"Stage '{name}'", name)
    error.args = (error.message,)
    error.stage_path = None
    return error


def _join_events(caller: Any, run: RunInfo, name: str) -> str | None:
    """Add what the policies did to the run of the stage whose code made the call, under that
    stage's path (returned; ``None`` outside a pipeline run)."""
    if caller is None:
        return None
    table = caller[0]
    where = join_path(table.prefix, caller[1])
    if run.events and table.events is not None:
        table.events.extend(
            replace(e, stage=where + e.stage[len(name) :]) if e.stage.startswith(name) else e
            for e in run.events
        )
    return where


def _failed(
    stage: Stage,
    name: str,
    entry: StageEntry,
    policy: StagePolicy,
    error: Exception,
    inputs: dict[str, Any],
    run: RunInfo,
    caller: Any,
    given: dict[str, Any],
) -> Any:
    """``recover=`` / ``skip_on`` on the stage's error: the recovered fields, ``None`` when skipped;
    raises otherwise. The strategy sees the inputs as given (``given``: state names, as in a
    pipeline's state), not as the wrapped stage takes them."""
    if isinstance(error, StageflowError):
        _relabelled(error, name)
    if not (policy.recover or policy.skip_on or policy.skip_if):
        _join_events(caller, run, name)
        raise error
    state = dict(given)
    report = StageError(f"{name} raised {type(error).__name__}: {error}")
    went_on = _recovered(policy, entry, error, report, inputs, state, run, "")
    _join_events(caller, run, name)
    if not went_on:
        if report.recovery_error is not None:
            raise report from error
        raise error
    if run.events[-1].kind == "recovered":
        outputs = stage.ports.outputs
        if outputs is not None:
            return {k: state[k] for k in outputs if k in state}
        return {k: v for k, v in state.items() if k not in given or given[k] is not v}
    return None


def call_alone(stage: Stage, kwargs: dict[str, Any], how: How = "module") -> Any:
    """``stage(**kwargs)`` with its policies applied. ``how``: ``"call"`` (a subclass's whole call,
    from ``Stage.__call__``), ``"module"`` (the wrapped module under the policies the class does not
    apply itself, from ``Stage.forward``), ``"cached"`` (the wrapped module under every policy, the
    cache included, from ``CachedStage.forward``)."""
    name, entry, target, inputs, policy = _setup(stage, kwargs, how)
    caller = calling_stage()
    run = RunInfo()
    # (a subclass's own code runs as the stage, under these policies)
    token = enter_applied(stage) if how == "call" else None
    try:
        out = guarded_call(_Owner(name, stage), entry, target, inputs, policy, run, "", _invoke)
    except Exception as e:
        return _failed(stage, name, entry, policy, e, inputs, run, caller, kwargs)
    finally:
        if token is not None:
            leave_applied(token)
    _join_events(caller, run, name)
    return _output(stage, entry, out, run)


async def acall_alone(stage: Stage, kwargs: dict[str, Any], how: How = "module") -> Any:
    """Async twin of :func:`call_alone`."""
    name, entry, target, inputs, policy = _setup(stage, kwargs, how)
    caller = calling_stage()
    run = RunInfo()
    token = enter_applied(stage) if how == "call" else None
    try:
        out = await aguarded_call(_Owner(name, stage), entry, target, inputs, policy, run, "", _invoke_async)
    except Exception as e:
        return _failed(stage, name, entry, policy, e, inputs, run, caller, kwargs)
    finally:
        if token is not None:
            leave_applied(token)
    _join_events(caller, run, name)
    return _output(stage, entry, out, run)
