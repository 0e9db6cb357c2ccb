"""The background loop's default executor runs DSPy's advisory pricing step in line
(``stageflow.engine.loop_executor``): a sync fan-out of predictors on that loop pays no thread hop
for it, gets the same cost, and every other ``asyncio.to_thread`` still goes to a worker thread.
The user's own event loops are not changed."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Any

import dspy
import pytest
from dspy.clients import execution
from test_sync_fanout_on_loop import ITEMS, Engines

from stageflow import ForEach, stage
from stageflow.engine.hooks import attach_hooks
from stageflow.engine.loop_executor import LoopExecutor, in_line_steps
from stageflow.engine.pool import _background_loop, run_on_background_loop


def _where(_step: Any, *args: Any) -> str:
    return threading.current_thread().name


def test_the_pricing_step_runs_in_the_submitting_thread_and_others_on_workers() -> None:
    ex = LoopExecutor(max_workers=1, thread_name_prefix="worker")
    try:
        assert in_line_steps() == (execution._price_result, execution._cached, execution._store)
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
    def __init__(self, original: Any = None) -> None:
        self.threads: list[str] = []
        self.original = execution._price_result if original is None else original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return self.original(*args, **kwargs)


def test_a_fanout_prices_on_the_loop_called_either_way_and_dspys_own_call_is_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = _Spy()
    monkeypatch.setattr(execution, "_price_result", spy)
    engines = Engines()
    predict = dspy.Predict("x -> y")
    fe = ForEach(predict, over="xs", item="x", collect="ys")
    with dspy.context(lm=engines.lm()):
        sync = fe(xs=ITEMS)
        assert spy.threads == ["stageflow-loop"] * len(ITEMS)
        spy.threads.clear()
        awaited = asyncio.run(fe.acall(xs=ITEMS))  # (its predictors go to stageflow's loop too)
        assert spy.threads == ["stageflow-loop"] * len(ITEMS)
        spy.threads.clear()
        asyncio.run(predict.acall(x="plain"))  # (DSPy's own call on your loop: DSPy's own hop)
    assert len(spy.threads) == 1
    assert spy.threads[0] != "stageflow-loop"
    assert sync.ys == awaited.ys == [f"echo:{x}" for x in ITEMS]
    assert sync.run.usage.total.cost == awaited.run.usage.total.cost
    assert sync.run.usage.total.lm_calls == awaited.run.usage.total.lm_calls == len(ITEMS)


def test_with_dspys_cache_on_lookups_and_writes_run_on_the_loop_and_hit_as_dspys_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    dspy.configure_cache(enable_memory_cache=True, enable_disk_cache=True, disk_cache_dir=str(tmp_path))
    spies = {name: _Spy(getattr(execution, name)) for name in ("_cached", "_store", "_price_result")}
    for name, spy in spies.items():
        monkeypatch.setattr(execution, name, spy)
    engines = Engines()
    lm = dspy.LM("fake/echo", engine=engines.sync, async_engine=engines.async_, cache=True, num_retries=0)
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    with dspy.context(lm=lm):
        first = fe(xs=ITEMS)
        assert {name: set(s.threads) for name, s in spies.items()} == {
            "_cached": {"stageflow-loop"},
            "_store": {"stageflow-loop"},
            "_price_result": {"stageflow-loop"},
        }
        again = fe(xs=ITEMS)  # (every answer from the entries the loop wrote)
        awaited = asyncio.run(fe.acall(xs=ITEMS))  # (DSPy's own path, the same entries)
    assert engines.async_calls == len(ITEMS)
    assert first.ys == again.ys == awaited.ys == [f"echo:{x}" for x in ITEMS]
    assert again.run.usage.total.lm_cache_hits == awaited.run.usage.total.lm_cache_hits == len(ITEMS)
    assert len(spies["_store"].threads) == len(ITEMS)  # (hits are not written again)


def test_an_awaited_fanout_stays_on_your_loop_with_observers_or_async_functions() -> None:
    engines = Engines()
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    seen: list[str] = []

    class Observer:
        def before_stage(self, **kw: Any) -> None:  # (an engine hook)
            seen.append(threading.current_thread().name)

    with dspy.context(lm=engines.lm()):
        asyncio.run(fe.acall(xs=ITEMS[:3]))
        assert engines.threads == {"stageflow-loop"}
        engines.threads.clear()
        with attach_hooks(Observer()):
            asyncio.run(fe.acall(xs=ITEMS[:3]))
    assert engines.threads == {"MainThread"}
    assert seen
    assert set(seen) == {"MainThread"}

    async def item(x: str) -> dict[str, str]:
        return {"y": threading.current_thread().name}

    own = ForEach(stage(item, writes=["y"]), over="xs", item="x", collect="ys")
    assert asyncio.run(own.acall(xs=["a", "b"])).ys == ["MainThread", "MainThread"]


def test_cancelling_the_caller_cancels_the_branches_on_the_loop() -> None:
    engines = Engines(latency=5.0)
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")

    async def main() -> float:
        t0 = time.perf_counter()
        task = asyncio.ensure_future(fe.acall(xs=ITEMS))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.perf_counter() - t0

    with dspy.context(lm=engines.lm()):
        elapsed = asyncio.run(main())
    assert elapsed < 2.0
    # The branch tasks on stageflow's loop were cancelled too: nothing of theirs is still pending.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and _pending_on_loop():
        time.sleep(0.02)
    assert _pending_on_loop() == 0


def _pending_on_loop() -> int:
    async def count() -> int:
        me = asyncio.current_task()
        return sum(1 for t in asyncio.all_tasks() if t is not me and not t.done())

    return int(run_on_background_loop(count()))
