"""How the engine calls a nested pipeline: what DSPy's ``Module.__call__`` would do, without its cost.

The engine skips ``dspy.Module.__call__`` for a nested stageflow pipeline only when nothing can tell
the difference; these tests pin each thing that must still behave as DSPy's call does.
"""

from __future__ import annotations

import copy
import logging
import pickle
from typing import Any

import dspy
import pytest
from dspy.utils.callback import BaseCallback

import stageflow
from stageflow import IterativePipeline, SequentialPipeline, stage
from stageflow.testing import FakeLM, call


def _inner() -> tuple[SequentialPipeline, dspy.Predict]:
    predict = dspy.Predict("question -> answer")
    return SequentialPipeline([predict]), predict


async def test_lm_calls_inside_a_nested_pipeline_reach_its_history(mode: str) -> None:
    inner, predict = _inner()
    outer = SequentialPipeline(
        [stage(lambda question: {"question": question + "?"}, writes=["question"]), inner]
    )
    with dspy.context(lm=FakeLM({"answer": "a"})):
        result = await call(outer, mode, question="q")
    assert result.answer == "a"
    # DSPy records an LM call in the history of every module on the call stack.
    assert len(outer.history) == len(inner.history) == len(predict.history) == 1


class _Recorder(BaseCallback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.modules: list[str] = []

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.modules.append(type(instance).__name__)


async def test_dspy_callbacks_see_nested_pipelines(mode: str) -> None:
    inner = SequentialPipeline([stage(lambda x: {"y": x + 1}, writes=["y"])])
    outer = SequentialPipeline([inner])
    recorder = _Recorder()
    with dspy.context(callbacks=[recorder]):
        assert (await call(outer, mode, x=1)).y == 2
    assert recorder.modules == ["SequentialPipeline", "SequentialPipeline"]


async def test_callbacks_on_the_nested_pipeline_itself_fire(mode: str) -> None:
    recorder = _Recorder()
    inner = SequentialPipeline([stage(lambda x: {"y": x + 1}, writes=["y"])])
    inner.callbacks = [recorder]
    assert (await call(SequentialPipeline([inner]), mode, x=1)).y == 2
    assert recorder.modules == ["SequentialPipeline"]


async def test_a_forward_patched_on_the_nested_instance_runs(mode: str) -> None:
    inner = SequentialPipeline([stage(lambda x: {"y": x + 1}, writes=["y"])])
    original = inner.forward

    def patched(**kwargs: Any) -> Any:
        out = original(**kwargs)
        out["y"] = out["y"] * 10
        return out

    inner.forward = patched
    outer = SequentialPipeline([inner])
    assert (await call(outer, mode, x=1)).y == 20


class Noting:
    """Instrumentation around DSPy's ``Module.__call__`` / ``acall``: notes the class of each module
    it is called for. Not a plain function, like wrapt's ``FunctionWrapper``."""

    def __init__(self, fn: Any, seen: list[str]) -> None:
        self.fn, self.seen = fn, seen

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self

        def bound(*args: Any, **kwargs: Any) -> Any:
            self.seen.append(type(obj).__name__)
            return self.fn(obj, *args, **kwargs)

        return bound


async def test_wrapped_module_call_is_honoured(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Instrumentation that wraps ``dspy.Module.__call__`` / ``acall`` (OpenInference does) sees the
    nested pipeline's call."""
    seen: list[str] = []
    monkeypatch.setattr(dspy.Module, "__call__", Noting(dspy.Module.__call__, seen))
    monkeypatch.setattr(dspy.Module, "acall", Noting(dspy.Module.acall, seen))
    inner = SequentialPipeline([stage(lambda x: {"y": x + 1}, writes=["y"])])
    outer = SequentialPipeline([inner])
    assert (await call(outer, mode, x=1)).y == 2
    assert seen == ["SequentialPipeline", "SequentialPipeline"]


async def test_nested_pipelines_with_usage_tracking(mode: str) -> None:
    inner, _ = _inner()
    with dspy.context(lm=FakeLM({"answer": "a"}), track_usage=True):
        result = await call(SequentialPipeline([inner]), mode, question="q")
    assert result.run.usage.total.lm_calls == 1


def test_reading_forward_directly_warns_as_dspy_does(caplog: pytest.LogCaptureFixture) -> None:
    p = SequentialPipeline([stage(lambda x: {"y": x + 1}, writes=["y"])])

    class Sub(SequentialPipeline):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return super().forward(*args, **kwargs)  # DSPy does not warn here either

    sub = Sub([stage(lambda x: {"y": x + 2}, writes=["y"])])
    with caplog.at_level(logging.WARNING, logger="dspy.primitives.module"):
        assert p(x=1).y == 2
        assert sub(x=1).y == 3
        assert SequentialPipeline([p])(x=1).y == 2
        assert not caplog.records
        assert p.forward(x=1).y == 2
    assert [r.getMessage() for r in caplog.records] == [
        "Calling module.forward(...) on SequentialPipeline directly is discouraged. Please use module(...) "
        "instead."
    ]


def test_forward_read_from_the_class_is_the_function() -> None:
    fn = SequentialPipeline.forward
    assert fn.__name__ == "forward"
    assert callable(fn)
    p = SequentialPipeline([stage(lambda x: {"y": x + 1}, writes=["y"])])
    assert fn(p, x=1).y == 2


def _deep(depth: int) -> Any:
    p: Any = SequentialPipeline([stage(lambda x: {"x": x + 1}, writes=["x"])])
    for _ in range(depth):
        p = SequentialPipeline([stage(lambda x: {"x": x * 2}, writes=["x"]), p])
    return p


def _expected_paths(depth: int) -> list[str]:
    paths, head = [], ""
    for _ in range(depth):
        paths += [f"{head}stages[0]", f"{head}stages[1]"]
        head += "stages[1]."
    return [*paths, f"{head}stages[0]"]


async def test_deep_nesting_records_every_stage_once_in_order(mode: str) -> None:
    result = await call(_deep(6), mode, x=1)
    assert result.x == 2**6 + 1
    expected = _expected_paths(6)
    assert [r.path for r in result.trace] == expected
    assert list(result.stage_outputs) == expected
    inner = result.stage_outputs["stages[1]"]
    assert [r.path for r in inner.trace] == _expected_paths(5)  # a nested result keeps its own paths
    assert result.stage_outputs["stages[1].stages[1].stages[0]"] == {"x": 8}  # the third doubling


async def test_nested_details_and_loop_outputs_keep_their_places(mode: str) -> None:
    counter = stage(lambda n: {"n": n + 1}, writes=["n"])
    loop = IterativePipeline([SequentialPipeline([counter])], lambda state: state["n"] >= 3, max_iterations=5)
    outer = SequentialPipeline(
        [stage(lambda n: {"n": n}, writes=["n"]), loop, stage(lambda n: {"m": n}, writes=["m"])]
    )
    result = await call(outer, mode, n=0)
    assert result.m == 3
    assert list(result.stage_outputs) == [
        "stages[0]",
        "stages[1]",
        "stages[1].stages[0]",
        "stages[1].stages[0].stages[0]",
        "stages[2]",
    ]
    assert result.stage_outputs["stages[1].stages[0].stages[0]"] == {"n": 3}  # the last iteration's
    assert result.details["stages[1]"]["iterations"] == result.stage_outputs["stages[1]"].iterations
    assert [r.path for r in result.trace].count("stages[1].stages[0].stages[0]") == 3


def test_a_run_read_midway_stays_right_as_more_joins() -> None:
    inner = stageflow.RunInfo()
    inner._trace.append(stageflow.StageRecord("stages[0]", 0.0))
    inner._outputs["stages[0]"] = 1
    inner.extras["note"] = "x"
    outer = stageflow.RunInfo()
    outer.absorb("stages[0]", inner)
    outputs, trace = outer.stage_outputs, outer.trace
    assert (dict(outputs), [r.path for r in trace]) == ({"stages[0].stages[0]": 1}, ["stages[0].stages[0]"])
    outer._outputs["stages[1]"] = 2
    outer._trace.append(stageflow.StageRecord("stages[1]", 0.0))
    outer.absorb("stages[2]", inner)
    assert outer.stage_outputs is outputs  # the same dict, refilled
    assert list(outputs) == ["stages[0].stages[0]", "stages[1]", "stages[2].stages[0]"]
    assert [r.path for r in outer.trace] == ["stages[0].stages[0]", "stages[1]", "stages[2].stages[0]"]
    assert outer.details == {"stages[0]": {"note": "x"}, "stages[2]": {"note": "x"}}


async def test_a_result_with_nested_runs_copies_and_pickles(mode: str) -> None:
    result = await call(_deep(3), mode, x=1)
    for twin in (copy.deepcopy(result), pickle.loads(pickle.dumps(result))):
        assert [r.path for r in twin.trace] == _expected_paths(3)
        assert list(twin.stage_outputs) == _expected_paths(3)
        assert twin.x == result.x
