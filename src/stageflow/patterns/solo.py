"""A :class:`~stageflow.Stage` with policies, called where no pipeline runs it (on its own, from a
module's ``forward``, wrapped in another ``Stage``): its policies are applied by running it as the
one stage of a pipeline, and the call returns what the stage returns.

The pipeline holds a plain ``Stage`` that shares the stage's module, renames, contract and policies
(less those the stage's class applies in its own ``forward``: ``CachedStage``'s cache), so a
subclass's own ``forward`` runs once, around it. Built on the first such call and kept while the
stage lives; made again when the stage's policies or renames are replaced.

An error the stage itself raised (the last attempt's, once retries are spent) reaches the caller as
it was raised, not wrapped in a :class:`~stageflow.StageError`: a timeout, a spent budget, a missing
input or a fallback that failed too are stageflow's own errors.

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

import weakref
from dataclasses import replace
from typing import Any

from stageflow.errors import ContractError, StageError
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.stages import Stage, stage_label

__all__ = ["acall_alone", "call_alone"]

_PATH = "stages[0]"

#: stage -> (what the pipeline was built from, the pipeline)
_SOLO: weakref.WeakKeyDictionary[Stage, tuple[tuple[Any, ...], SequentialPipeline]] = (
    weakref.WeakKeyDictionary()
)


def _pipeline(stage: Stage) -> SequentialPipeline:
    state = stage.__dict__
    made_from = (state.get("policy"), state.get("input_map"), state.get("output_map"), state.get("ports"))
    found = _SOLO.get(stage)
    if found is not None and all(a is b for a, b in zip(found[0], made_from, strict=True)):
        return found[1]
    inner: Stage = Stage.__new__(Stage)  # (not __init__: the same module, renames and contract)
    inner.__dict__.update(state)
    applies = getattr(type(stage), "stageflow_applies", ())
    policy = stage.policy
    if policy is not None and applies:
        cleared: dict[str, Any] = dict.fromkeys(applies)
        policy = replace(policy, **cleared)
        inner.__dict__["policy"] = None if policy.is_empty() else policy
    pipeline = SequentialPipeline([inner])
    _SOLO[stage] = (made_from, pipeline)
    return pipeline


def _output(stage: Stage, result: Any) -> Any:
    """What the stage returned (renamed as the stage renames), ``None`` when a policy skipped it."""
    outputs = result.stage_outputs
    if _PATH not in outputs:
        return None
    return stage._rename_outputs(outputs[_PATH])


def _unwrapped(error: StageError) -> BaseException:
    """The stage's own error when ``error`` only wraps it; else ``error``."""
    cause = error.__cause__
    if type(error) is StageError and error.wraps_stage_exception and isinstance(cause, Exception):
        return cause
    return error


def _check_inputs(stage: Stage, kwargs: dict[str, Any]) -> None:
    """A required input the call does not pass: said of this call, not of a pipeline's."""
    for name in stage.ports.required:
        if name not in kwargs:
            raise ContractError(
                f"Stage({stage_label(stage.module)}) needs input {name!r}, which this call does not pass "
                f"(it got {sorted(kwargs)}).",
                field=name,
                code="missing_input",
                hint=f"pass {name}=... when calling the stage",
            )


def call_alone(stage: Stage, kwargs: dict[str, Any]) -> Any:
    """``stage(**kwargs)`` with its policies applied."""
    _check_inputs(stage, kwargs)
    try:
        result = _pipeline(stage)(**kwargs)
    except StageError as e:
        error = _unwrapped(e)
        if error is e:
            raise
    else:
        return _output(stage, result)
    raise error  # (outside the handler: the stage's error as it was raised, nothing chained to it)


async def acall_alone(stage: Stage, kwargs: dict[str, Any]) -> Any:
    """Async twin of :func:`call_alone`."""
    _check_inputs(stage, kwargs)
    try:
        result = await _pipeline(stage).acall(**kwargs)
    except StageError as e:
        error = _unwrapped(e)
        if error is e:
            raise
    else:
        return _output(stage, result)
    raise error
