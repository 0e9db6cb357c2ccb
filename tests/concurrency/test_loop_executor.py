"""The background loop's default executor runs DSPy's advisory pricing step in line
(``stageflow.engine.loop_executor``): a sync fan-out of predictors on that loop pays no thread hop
for it, gets the same cost, and every other ``asyncio.to_thread`` still goes to a worker thread.
The user's own event loops are not changed."""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any

import dspy
import pytest
from dspy.clients import execution
from test_sync_fanout_on_loop import ITEMS, Engines

from stageflow import ForEach
from stageflow.engine.loop_executor import LoopExecutor, in_line_steps
from stageflow.engine.pool import _background_loop, run_on_background_loop


def _where(_step: Any, *args: Any) -> str:
    return threading.current_thread().name


def test_the_pricing_step_runs_in_the_submitting_thread_and_others_on_workers() -> None:
    ex = LoopExecutor(max_workers=1, thread_name_prefix="worker")
    try:
        assert in_line_steps() == (execution._price_result,)
        here = threading.current_thread().name
        assert ex.submit(functools.partial(_where, execution._price_result)).result() == here
        assert ex.submit(functools.partial(_where, print)).result().startswith("worker")
        assert (
            ex.submit(_where, execution._price_result).result().startswith("worker")
        )  # (not as to_thread submits)
    finally:
        ex.shutdown()


def test_an_error_in_the_step_reaches_the_caller() -> None:
    def boom(_step: Any) -> None:
        raise ValueError("pricing failed")

    ex = LoopExecutor(max_workers=1)
    try:
        with pytest.raises(ValueError, match="pricing failed"):
            ex.submit(functools.partial(boom, execution._price_result)).result()
    finally:
        ex.shutdown()


def test_the_background_loop_uses_it_and_plain_to_thread_still_leaves_the_loop() -> None:
    loop = _background_loop()
    assert isinstance(loop._default_executor, LoopExecutor)  # type: ignore[attr-defined]

    async def hop() -> tuple[str, str]:
        return threading.current_thread().name, await asyncio.to_thread(
            lambda: threading.current_thread().name
        )

    on_loop, in_thread = run_on_background_loop(hop())
    assert on_loop == "stageflow-loop"
    assert in_thread != on_loop


class _Spy:
    def __init__(self) -> None:
        self.threads: list[str] = []
        self.original = execution._price_result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return self.original(*args, **kwargs)


def test_a_sync_fanout_prices_on_the_loop_and_an_awaited_one_as_dspy_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = _Spy()
    monkeypatch.setattr(execution, "_price_result", spy)
    engines = Engines()
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    with dspy.context(lm=engines.lm()):
        sync = fe(xs=ITEMS)
        assert spy.threads == ["stageflow-loop"] * len(ITEMS)
        spy.threads.clear()
        awaited = asyncio.run(fe.acall(xs=ITEMS))  # (the user's loop: DSPy's own hop, unchanged)
    assert len(spy.threads) == len(ITEMS)
    assert "stageflow-loop" not in spy.threads
    assert sync.ys == awaited.ys == [f"echo:{x}" for x in ITEMS]
    assert sync.run.usage.total.cost == awaited.run.usage.total.cost
    assert sync.run.usage.total.lm_calls == awaited.run.usage.total.lm_calls == len(ITEMS)
