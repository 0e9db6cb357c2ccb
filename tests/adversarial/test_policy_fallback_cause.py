"""Issue 9: a fallback never hides the error it could not repair — that error is the ``__cause__``
and is named in the message (a default fallback lacking a declared output used to raise a bare
ContractError; a failing fallback stage raised its own error alone). A recovery strategy that
raises: its error is the ``__cause__`` and named in the message (this already held; kept here)."""

from __future__ import annotations

from typing import Any

import pytest

from stageflow import (
    ErrorHandlingPipeline,
    Fallback,
    PipelineError,
    SequentialPipeline,
    Stage,
    StageError,
    stage,
)
from stageflow.testing import call


def broken(x: int) -> dict[str, Any]:
    raise ValueError("the model endpoint returned garbage")


def check_names_the_original(err: BaseException) -> None:
    assert isinstance(err, StageError)
    assert err.code == "fallback_failed"
    assert isinstance(err.__cause__, ValueError)
    assert "ValueError: the model endpoint returned garbage" in str(err)
    assert err.stage_path == "stages[0]"


async def test_a_pipeline_default_fallback_missing_a_declared_output(mode: str) -> None:
    p = SequentialPipeline([stage(broken, writes=["answer"]), lambda answer: {"shout": answer.upper()}])
    p.set_defaults(fallback=Fallback(default={"summary": "n/a"}))  # has no 'answer'
    with pytest.raises(StageError) as info:
        await call(p, mode, x=1)
    check_names_the_original(info.value)
    assert "'answer'" in str(info.value)  # and what the fallback lacked
    assert "Fix: make the fallback return every output the stage declares" in str(info.value)


async def test_a_stage_default_fallback_missing_a_declared_output(mode: str) -> None:
    p = SequentialPipeline([Stage(stage(broken, writes=["answer", "score"]), fallback={"answer": "?"})])
    with pytest.raises(StageError) as info:
        await call(p, mode, x=1)
    check_names_the_original(info.value)
    assert "'score'" in str(info.value)


async def test_a_fallback_stage_that_fails_too(mode: str) -> None:
    def also_broken(x: int) -> dict[str, Any]:
        raise KeyError("fallback index missing")

    p = SequentialPipeline([Stage(stage(broken, writes=["answer"]), fallback=also_broken)])
    with pytest.raises(StageError) as info:
        await call(p, mode, x=1)
    check_names_the_original(info.value)
    assert "KeyError: 'fallback index missing'" in str(info.value)
    assert isinstance(info.value.__context__, KeyError)  # the fallback's own error stays reachable


async def test_the_original_type_still_decides_what_is_non_critical(mode: str) -> None:
    """A timeout the fallback could not repair is still a timeout to ErrorHandlingPipeline."""

    def slow(x: int) -> dict[str, Any]:
        import time

        time.sleep(0.5)
        return {"answer": "late"}

    p = ErrorHandlingPipeline(
        [Stage(stage(slow, writes=["answer"]), timeout=0.02, fallback={"other": 1}), lambda x: {"after": x}]
    )
    result = await call(p, mode, x=3)
    assert result.after == 3
    [entry] = result.error_log
    assert entry["action"] == "skipped"
    assert "failed with StageTimeoutError" in entry["error"]
    assert "'answer'" in entry["error"]
    assert [e.kind for e in result.run.events] == ["timeout", "fallback", "skipped"]


async def test_a_default_that_fits_is_used_as_before(mode: str) -> None:
    p = SequentialPipeline([Stage(stage(broken, writes=["answer"]), fallback={"answer": "unknown"})])
    result = await call(p, mode, x=1)
    assert result.answer == "unknown"
    assert [(e.kind, e.error) for e in result.run.events] == [
        ("fallback", "ValueError: the model endpoint returned garbage")
    ]


async def test_a_raising_recovery_strategy_is_the_cause_and_named(mode: str) -> None:
    def recover(error: BaseException, state: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("recovery lookup failed")

    p = ErrorHandlingPipeline([stage(broken, writes=["answer"])], recovery_strategies={0: recover})
    with pytest.raises(PipelineError) as info:
        await call(p, mode, x=1)
    assert isinstance(info.value.__cause__, KeyError)
    assert "KeyError: 'recovery lookup failed'" in str(info.value)
    assert "ValueError: the model endpoint returned garbage" in str(info.value)
