"""ErrorHandlingPipeline: recovery strategies by index, non-critical errors by type, the error log."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import stageflow
from stageflow import (
    ConfigurationError,
    ErrorHandlingPipeline,
    LowConfidenceError,
    PipelineError,
    RetryPolicy,
    SequentialPipeline,
    Stage,
    StageTimeoutError,
    stage,
)
from stageflow.testing import call

LOG_KEYS = {
    "stage_index",
    "stage_name",
    "stage_path",
    "error",
    "error_type",
    "message",
    "input_state",
    "inputs",
    "action",
}


def raising(error: Exception, reads: str = "x", writes: str = "y") -> Any:
    def body(**kw: Any) -> dict[str, Any]:
        raise error

    return stage(body, reads=[reads], writes=[writes], name=f"raise_{type(error).__name__}")


def then(name: str, reads: str = "x") -> Any:
    return stage(lambda **kw: {name: f"{name}({kw[reads]})"}, reads=[reads], writes=[name], name=name)


# -- recovery strategies --------------------------------------------------------------------------


async def test_recovery_returning_a_state_continues_the_run(mode: str) -> None:
    received: list[tuple[BaseException, dict[str, Any]]] = []

    def recover(error: BaseException, state: dict[str, Any]) -> dict[str, Any]:
        received.append((error, state))
        return {**state, "y": "recovered"}

    p = ErrorHandlingPipeline(
        [then("a"), raising(ValueError("bad y")), then("z", reads="y")], recovery_strategies={1: recover}
    )
    r = await call(p, mode, x="in")
    assert r.y == "recovered"
    assert r.z == "z(recovered)"
    assert len(received) == 1
    error, state = received[0]
    assert isinstance(error, ValueError)
    assert str(error) == "bad y"
    assert state == {"x": "in", "a": "a(in)"}
    assert r.error_log == [
        {
            "stage_index": 1,
            "stage_name": "stage_1",
            "stage_path": "stages[1]",
            "error": "bad y",
            "error_type": "ValueError",
            "message": "bad y",
            "input_state": {"x": "in", "a": "a(in)"},
            "inputs": {"x": "in"},
            "action": "recovered",
        }
    ]
    assert [e.kind for e in r.run.events] == ["recovered"]


async def test_recovery_returning_none_fails_the_run(mode: str) -> None:
    original = ValueError("still bad")
    p = ErrorHandlingPipeline([then("a"), raising(original)], recovery_strategies={1: lambda e, s: None})
    with pytest.raises(PipelineError) as info:
        await call(p, mode, x="in")
    err = info.value
    assert err.__cause__ is original
    assert err.stage_path == "stages[1]"
    assert "stage 1" in str(err)
    assert "'stages[1]'" in str(err)
    assert err.code == "unrecovered"
    assert err.errors == [
        {
            "stage_index": 1,
            "stage_name": "stage_1",
            "stage_path": "stages[1]",
            "error": "still bad",
            "error_type": "ValueError",
            "message": "still bad",
            "input_state": {"x": "in", "a": "a(in)"},
            "inputs": {"x": "in"},
            "action": "failed",
        }
    ]


def test_recovery_strategy_only_applies_to_its_own_index() -> None:
    p = ErrorHandlingPipeline(
        [raising(ValueError("first")), then("z")], recovery_strategies={1: lambda e, s: {**s, "y": "r"}}
    )
    with pytest.raises(PipelineError) as info:
        p(x="in")
    assert info.value.errors[0]["stage_index"] == 0


def test_negative_recovery_index_counts_from_the_end() -> None:
    p = ErrorHandlingPipeline(
        [then("a"), raising(ValueError("v"))], recovery_strategies={-1: lambda e, s: {"y": "r"}}
    )
    r = p(x="in")
    assert r.y == "r"
    assert r.error_log[0]["stage_index"] == 1


async def test_recovery_runs_after_the_stages_own_retries(mode: str) -> None:
    attempts: list[int] = []

    def down(x: str) -> dict[str, Any]:
        attempts.append(1)
        raise ConnectionError("down")

    async def no_wait(s: float) -> None:
        return None

    retry = RetryPolicy(max_attempts=3, sleep=lambda s: None, asleep=no_wait)
    p = ErrorHandlingPipeline(
        [Stage(stage(down, writes=["y"]), retry=retry)], recovery_strategies={0: lambda e, s: {"y": "cached"}}
    )
    r = await call(p, mode, x="in")
    assert r.y == "cached"
    assert len(attempts) == 3
    assert [e.kind for e in r.run.events] == ["retry", "retry", "recovered"]


# -- non-critical errors by type --------------------------------------------------------------------


@pytest.mark.parametrize("error_type", [TimeoutError, LowConfidenceError, StageTimeoutError])
async def test_non_critical_errors_skip_the_stage_and_log(mode: str, error_type: type[Exception]) -> None:
    error = error_type("took too long")
    p = ErrorHandlingPipeline([then("a"), raising(error), then("z")])
    r = await call(p, mode, x="in")
    assert r.a == "a(in)"
    assert r.z == "z(in)"
    assert "y" not in r
    assert len(r.error_log) == 1
    entry = r.error_log[0]
    assert set(entry) == LOG_KEYS
    assert entry["action"] == "skipped"
    assert entry["stage_index"] == 1
    assert entry["stage_path"] == "stages[1]"
    assert entry["error_type"] == type(error).__name__
    assert entry["inputs"] == {"x": "in"}


async def test_a_timeout_policy_timeout_is_non_critical(mode: str) -> None:
    def slow(x: str) -> dict[str, Any]:
        time.sleep(0.5)
        return {"y": x}

    async def aslow(x: str) -> dict[str, Any]:
        await asyncio.sleep(0.5)
        return {"y": x}

    p = ErrorHandlingPipeline(
        [
            Stage(stage(slow, writes=["y"]), timeout=0.05),
            Stage(stage(aslow, writes=["w"]), timeout=0.05),
            then("z"),
        ]
    )
    r = await call(p, mode, x="in")
    assert r.z == "z(in)"
    assert [(e["stage_index"], e["error_type"], e["action"]) for e in r.error_log] == [
        (0, "StageTimeoutError", "skipped"),
        (1, "StageTimeoutError", "skipped"),
    ]


async def test_a_value_error_mentioning_timeout_is_not_non_critical(mode: str) -> None:
    original = ValueError("timeout while parsing the config")
    p = ErrorHandlingPipeline([then("a"), raising(original), then("z")])
    with pytest.raises(PipelineError) as info:
        await call(p, mode, x="in")
    assert info.value.__cause__ is original
    assert [e["action"] for e in info.value.errors] == ["failed"]


def test_a_reused_error_instance_does_not_leak_events_between_runs() -> None:
    unsure = LowConfidenceError("unsure")
    p = ErrorHandlingPipeline([raising(unsure), then("z")])
    assert len(p(x="1").error_log) == 1
    assert len(p(x="2").error_log) == 1
    nested = ErrorHandlingPipeline(
        [SequentialPipeline([then("a"), Stage(raising(unsure), retry=2)]), then("z")]
    )
    for _ in range(3):
        r = nested(x="in")
        assert [e["action"] for e in r.error_log] == ["skipped"]


def test_low_confidence_in_the_message_is_not_non_critical() -> None:
    p = ErrorHandlingPipeline([raising(RuntimeError("LowConfidenceError: low confidence"))])
    with pytest.raises(PipelineError):
        p(x="in")


def test_custom_non_critical_types_replace_the_defaults() -> None:
    p = ErrorHandlingPipeline([raising(KeyError("k")), then("z")], non_critical=(KeyError,))
    r = p(x="in")
    assert r.error_log[0]["action"] == "skipped"
    p2 = ErrorHandlingPipeline([raising(TimeoutError("t")), then("z")], non_critical=(KeyError,))
    with pytest.raises(PipelineError):
        p2(x="in")


def test_a_wrapped_non_critical_cause_is_recognised() -> None:
    def body(x: str) -> dict[str, Any]:
        try:
            raise TimeoutError("socket")
        except TimeoutError as e:
            raise RuntimeError("client failed") from e

    r = ErrorHandlingPipeline([stage(body, writes=["y"]), then("z")])(x="in")
    assert r.error_log[0]["action"] == "skipped"
    assert r.error_log[0]["error_type"] == "RuntimeError"


def test_non_critical_and_recovered_entries_accumulate_in_order() -> None:
    p = ErrorHandlingPipeline(
        [raising(TimeoutError("t"), writes="y1"), raising(ValueError("v"), writes="y2"), then("z")],
        recovery_strategies={1: lambda e, s: {"y2": "r"}},
    )
    r = p(x="in")
    assert [(e["stage_index"], e["action"]) for e in r.error_log] == [(0, "skipped"), (1, "recovered")]


def test_a_clean_run_has_an_empty_error_log() -> None:
    r = ErrorHandlingPipeline([then("a")])(x="in")
    assert r.error_log == []


# -- unrecovered failures ------------------------------------------------------------------------------


async def test_unrecovered_failure_raises_pipeline_error_naming_index_and_path(mode: str) -> None:
    original = KeyError("missing key")
    p = ErrorHandlingPipeline([then("a"), then("b"), raising(original)])
    with pytest.raises(PipelineError) as info:
        await call(p, mode, x="in")
    err = info.value
    assert err.__cause__ is original
    assert "stage 2" in str(err)
    assert "'stages[2]'" in str(err)
    assert "KeyError" in str(err)
    assert err.stage_path == "stages[2]"
    assert len(err.errors) == 1
    assert err.errors[0]["action"] == "failed"
    assert set(err.errors[0]) == LOG_KEYS


def test_earlier_skips_are_in_the_error_list_of_a_later_failure() -> None:
    p = ErrorHandlingPipeline([raising(TimeoutError("t"), writes="a"), raising(ValueError("v"))])
    with pytest.raises(PipelineError) as info:
        p(x="in")
    assert [(e["stage_index"], e["action"]) for e in info.value.errors] == [(0, "skipped"), (1, "failed")]


def test_a_recovery_strategy_that_raises_still_names_the_stage() -> None:
    def broken(error: BaseException, state: dict[str, Any]) -> Any:
        raise RuntimeError("recovery broke")

    p = ErrorHandlingPipeline([raising(ValueError("orig"))], recovery_strategies={0: broken})
    with pytest.raises(PipelineError) as info:
        p(x="in")
    assert "stage 0" in str(info.value)
    assert [e["stage_index"] for e in info.value.errors] == [0]


def test_nested_error_handling_pipeline_error_path_is_not_doubled() -> None:
    inner = ErrorHandlingPipeline([then("a"), raising(ValueError("v"))])
    outer = SequentialPipeline([then("q"), inner])
    with pytest.raises(PipelineError) as info:
        outer(x="in")
    assert info.value.errors[0]["stage_path"] == "stages[1].stages[1]"
    assert info.value.stage_path == "stages[1].stages[1]"


def test_nested_error_handling_pipeline_skips_inside() -> None:
    inner = ErrorHandlingPipeline([raising(TimeoutError("t"), writes="y"), then("a")])
    r = SequentialPipeline([then("q"), inner])(x="in")
    assert r.a == "a(in)"
    assert [(e.stage, e.kind) for e in r.run.events] == [("stages[1].stages[0]", "skipped")]


# -- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [2, -3, "0", 1.0, None])
def test_bad_recovery_strategy_keys_raise_configuration_error(key: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        ErrorHandlingPipeline([then("a"), then("b")], recovery_strategies={key: lambda e, s: s})
    assert info.value.code == "bad_option"


def test_non_callable_recovery_strategy_raises_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        ErrorHandlingPipeline([then("a")], recovery_strategies={0: "retry"})  # type: ignore[dict-item]


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
async def test_a_stage_inside_a_nested_pipeline_recovers_from_its_own_error(mode: str, nested: bool) -> None:
    # The recovery strategy, the non-critical check and the error log see what the stage raised,
    # whether the stage sits in the pipeline itself or in a pipeline nested in it.
    seen: list[BaseException] = []

    def recover(error: BaseException, state: dict[str, Any]) -> dict[str, Any]:
        seen.append(error)
        return {"y": "cached"} if isinstance(error, TimeoutError) else {}

    failing = raising(TimeoutError("the service did not answer"))
    program = ErrorHandlingPipeline(
        [SequentialPipeline([failing]) if nested else failing], recovery_strategies={0: recover}
    )
    r = await call(program, mode, x=1)
    assert r.y == "cached"
    assert [type(e) for e in seen] == [TimeoutError]
    assert (r.error_log[0]["error_type"], r.error_log[0]["action"]) == ("TimeoutError", "recovered")

    skipping = ErrorHandlingPipeline(
        [SequentialPipeline([failing]) if nested else failing, stage(lambda x: {"z": x}, writes=["z"])],
        non_critical=[TimeoutError],
    )
    r = await call(skipping, mode, x=1)
    assert r.z == 1
    assert r.error_log[0]["error_type"] == "TimeoutError"


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
async def test_a_stage_error_a_stage_raises_itself_is_kept(mode: str, nested: bool) -> None:
    # Reproducer: unwrapping the nested pipeline's StageError also peeled one the stage raised on
    # purpose, so flat and nested gave the recovery strategy different exceptions.
    from stageflow import StageError

    def quota(x: int) -> dict[str, Any]:
        raise StageError("quota exhausted") from ValueError("HTTP 429")

    failing = stage(quota, writes=["y"])
    seen: list[str] = []
    program = ErrorHandlingPipeline(
        [SequentialPipeline([failing]) if nested else failing],
        recovery_strategies={0: lambda error, state: seen.append(type(error).__name__) or {"y": 0}},
    )
    assert (await call(program, mode, x=1)).y == 0
    assert seen == ["StageError"]
    skipping = ErrorHandlingPipeline(
        [SequentialPipeline([failing]) if nested else failing, stage(lambda x: {"z": x}, writes=["z"])],
        non_critical=[StageError],
    )
    assert (await call(skipping, mode, x=1)).z == 1


def _client_timeouts() -> list[Exception]:
    import httpx
    import requests
    from dspy.utils.exceptions import LMTimeoutError

    class GatewayError(Exception):
        status_code = 504

    # LiteLLM's class, by its module and name (importing litellm reaches for the network)
    litellm_timeout = type("Timeout", (Exception,), {"__module__": "litellm.exceptions"})

    return [
        httpx.ReadTimeout("read timed out"),
        requests.exceptions.ReadTimeout("read timed out"),
        litellm_timeout("timed out"),
        LMTimeoutError("timed out", model="m"),
        GatewayError("gateway timeout"),
    ]


@pytest.mark.parametrize("error", _client_timeouts(), ids=lambda e: type(e).__name__)
def test_the_timeouts_of_lm_clients_are_non_critical_by_default(error: Exception) -> None:
    r = ErrorHandlingPipeline([raising(error), then("z")])(x="in")
    assert r.error_log[0]["action"] == "skipped"
    assert r.z == "z(in)"


@pytest.mark.parametrize("error", _client_timeouts()[:1], ids=lambda e: type(e).__name__)
def test_client_timeouts_stay_critical_when_timeouts_are_not_named(error: Exception) -> None:
    with pytest.raises(PipelineError):
        ErrorHandlingPipeline([raising(error), then("z")], non_critical=(LowConfidenceError,))(x="in")


def test_timeout_in_the_message_alone_is_not_a_timeout() -> None:
    with pytest.raises(PipelineError):
        ErrorHandlingPipeline([raising(ValueError("request timeout")), then("z")])(x="in")


def _raised_while_handling(kind: str) -> Any:
    def body(x: str) -> dict[str, Any]:
        try:
            raise TimeoutError("slow")
        except TimeoutError as e:
            if kind == "context":
                raise KeyError("bug in the handler")  # noqa: B904 (the point: no "from")
            if kind == "from-none":
                raise KeyError("bug in the handler") from None
            raise stageflow.BudgetExceeded.refused(
                "max_calls", spent=1, limit=1, needed=1, scope="stageflow.budget()"
            ) from e

    return stage(body, writes=["y"])


@pytest.mark.parametrize("kind", ["context", "from-none", "budget-from-timeout"])
def test_an_error_raised_while_handling_a_timeout_is_not_a_timeout(kind: str) -> None:
    with pytest.raises(PipelineError):
        ErrorHandlingPipeline([_raised_while_handling(kind), then("z")])(x="in")
    with pytest.raises(stageflow.StageflowError):
        SequentialPipeline([Stage(_raised_while_handling(kind), skip_on=[TimeoutError]), then("z")])(x="in")


def test_a_base_of_timeout_error_does_not_take_in_every_timeout() -> None:
    class GatewayError(Exception):  # not an OSError, but an HTTP 504
        status_code = 504

    with pytest.raises(stageflow.StageflowError):
        SequentialPipeline([Stage(raising(GatewayError("gw")), skip_on=[OSError]), then("z")])(x="in")
