"""What a nested pipeline remembers about running in line (``stageflow.engine.inline``'s tickets) is
dropped whenever it could stop holding: an attribute of the pipeline set or deleted, its class
changed, the global strictness changed, the pipeline copied; DSPy callbacks entered inside a stage
are seen by the pipelines nested below it. Every scenario runs sync and async."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ContractError, SequentialPipeline, stage
from stageflow.engine import inline, runner
from stageflow.fingerprinting import fingerprint
from stageflow.testing import call


class _Spy:
    """Records, per nested call, whether it ran in line."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inline: list[bool] = []
        real = runner.begin_inline

        def spy(*args: Any) -> Any:
            started = real(*args)
            self.inline.append(started is not None)
            return started

        monkeypatch.setattr(runner, "begin_inline", spy)


def _add_one(x: int) -> dict[str, int]:
    return {"x": x + 1}


def _times_ten(x: int) -> dict[str, int]:
    return {"x": x * 10}


def _pair() -> tuple[SequentialPipeline, SequentialPipeline]:
    inner = SequentialPipeline([stage(_add_one, writes=["x"])])
    return inner, SequentialPipeline([inner])


async def _warm(outer: Any, mode: str) -> None:
    for _ in range(2):  # the first call checks the contracts, the second runs in line
        assert (await call(outer, mode, x=1)).x == 2


async def test_a_warm_nested_pipeline_runs_in_line(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, outer = _pair()
    await _warm(outer, mode)
    spy = _Spy(monkeypatch)
    assert (await call(outer, mode, x=5)).x == 6
    assert spy.inline == [True]


async def test_a_budget_set_later_is_enforced(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    inner, outer = _pair()
    await _warm(outer, mode)
    inner.set_budget(stageflow.LMBudget(max_calls=5))
    spy = _Spy(monkeypatch)
    assert (await call(outer, mode, x=1)).x == 2  # (no LM call: the budget allows it)
    assert spy.inline == [False]


async def test_attributes_that_opt_out_are_seen_on_the_next_call(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner, outer = _pair()
    await _warm(outer, mode)
    seen: list[str] = []

    class Listener(dspy.utils.callback.BaseCallback):  # type: ignore[misc]
        def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            seen.append(type(instance).__name__)

    inner.callbacks = [Listener()]
    spy = _Spy(monkeypatch)
    assert (await call(outer, mode, x=1)).x == 2
    assert spy.inline == [False]
    assert seen == ["SequentialPipeline"]  # DSPy's own __call__ ran for the nested pipeline
    del inner.callbacks
    assert (await call(outer, mode, x=1)).x == 2  # deleting an attribute drops the memo too
    assert (await call(outer, mode, x=1)).x == 2
    assert spy.inline[-1] is True


async def test_strictness_changed_later_is_checked(mode: str) -> None:
    inner = SequentialPipeline(
        [stage(lambda x: {"y": x}), stage(lambda y: {"z": y}, writes=["z"])]  # y: only at run time
    )
    outer = SequentialPipeline([inner])
    for _ in range(2):
        assert (await call(outer, mode, x=1)).z == 1
    inner.strict = True
    with pytest.raises(ContractError):
        await call(outer, mode, x=1)
    inner.strict = None
    assert (await call(outer, mode, x=1)).z == 1
    stageflow.configure(strict=True)
    try:
        with pytest.raises(ContractError):
            await call(outer, mode, x=1)
    finally:
        stageflow.configure(strict=False)
    assert (await call(outer, mode, x=1)).z == 1


async def test_copies_start_without_the_memo(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    inner, outer = _pair()
    await _warm(outer, mode)
    memos = [k for k in vars(inner) if k in inline.INLINE_MEMOS]
    assert memos  # the warm pipeline keeps one
    for twin in (copy.deepcopy(outer), pickle.loads(pickle.dumps(outer))):
        twin_inner = twin.stages[0]
        twin_inner.stages[0] = stage(_times_ten, writes=["x"])
        assert (await call(twin, mode, x=3)).x == 30
        assert (await call(twin, mode, x=3)).x == 30
    assert (await call(outer, mode, x=3)).x == 4


async def test_callbacks_entered_inside_a_stage_reach_nested_pipelines(mode: str) -> None:
    seen: list[str] = []

    class Listener(dspy.utils.callback.BaseCallback):  # type: ignore[misc]
        def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            seen.append(type(instance).__name__)

    deep = SequentialPipeline([SequentialPipeline([stage(lambda x: {"x": x + 1}, writes=["x"])])])

    def with_callbacks(x: int) -> dict[str, int]:
        with dspy.context(callbacks=[Listener()]):
            return {"x": deep(x=x).x}

    outer = SequentialPipeline([SequentialPipeline([stage(with_callbacks, writes=["x"])])])
    for _ in range(3):
        seen.clear()
        assert (await call(outer, mode, x=1)).x == 2
        assert seen == ["SequentialPipeline", "SequentialPipeline"]  # deep, and the one inside it


def test_the_fingerprint_of_a_pipeline_does_not_change_when_it_runs() -> None:
    class Mine(SequentialPipeline):  # a class of the user's own: its private attributes count
        pass

    inner = Mine([stage(lambda x: {"y": x + 1}, writes=["y"])])
    outer = SequentialPipeline([inner])
    before = fingerprint(inner), fingerprint(outer)
    for x in range(3):
        outer(x=x)
    assert (fingerprint(inner), fingerprint(outer)) == before
    inner.tag = "changed"  # what the user sets still counts
    assert fingerprint(inner) != before[0]
