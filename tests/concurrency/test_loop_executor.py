"""The background loop's default executor runs DSPy's advisory pricing step in line
(``stageflow.engine.loop_executor``): a sync fan-out of predictors on that loop pays no thread hop
for it, gets the same cost, and every other ``asyncio.to_thread`` still goes to a worker thread.
The user's own event loops are not changed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from typing import Any

import dspy
import pytest
from dspy.clients import execution
from dspy.utils.callback import BaseCallback
from test_sync_fanout_on_loop import ITEMS, Engines

from stageflow import ForEach
from stageflow.engine.loop_executor import LoopExecutor, in_line_steps
from stageflow.engine.pool import _background_loop, run_on_background_loop


def _where(_step: Any, *args: Any) -> str:
    return threading.current_thread().name


def test_the_pricing_step_runs_in_the_submitting_thread_and_others_on_workers() -> None:
    ex = LoopExecutor(max_workers=1, thread_name_prefix="worker")
    try:
        assert in_line_steps() == (execution._price_result, execution._cached, execution._store)
        here = threading.current_thread().name
        # (as asyncio.to_thread submits it: partial(context.run, step, *its arguments))
        priced = (execution._price_result, None, object(), None, None, None)  # (no provider)
        assert ex.submit(functools.partial(_where, *priced)).result() == here
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


@pytest.fixture
def to_workers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of DSPy's steps sent to a worker thread (any executor's), as ``to_thread`` sends
    them. (A spy put in place of ``_price_result`` would be a pricing function of yours, which
    always gets a worker: so the submissions are watched instead.)"""
    sent: list[str] = []
    original = concurrent.futures.ThreadPoolExecutor.submit

    def submit(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if isinstance(fn, functools.partial) and fn.args:
            sent.append(getattr(fn.args[0], "__name__", "?"))
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", submit)
    return sent


def test_a_sync_fanout_prices_on_the_loop_and_an_awaited_one_without_the_fast_path_as_dspy_does(
    to_workers: list[str],
) -> None:
    engines = Engines()
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    with dspy.context(lm=engines.lm()):
        sync = fe(xs=ITEMS)
        assert "_price_result" not in to_workers
        # An awaited fan-out runs on your loop (objects of your engine may belong to it): there the
        # fast adapter's calls price in line (stageflow.lm.fast._pricing), DSPy's own on a worker.
        awaited = asyncio.run(fe.acall(xs=ITEMS))
        assert "_price_result" not in to_workers
        fe.fast_path = False
        plain = asyncio.run(fe.acall(xs=ITEMS))
    assert to_workers.count("_price_result") == len(ITEMS)
    assert sync.ys == awaited.ys == plain.ys == [f"echo:{x}" for x in ITEMS]
    assert sync.run.usage.total.cost == awaited.run.usage.total.cost == plain.run.usage.total.cost
    assert sync.run.usage.total.lm_calls == awaited.run.usage.total.lm_calls == len(ITEMS)


def test_with_dspys_cache_on_lookups_and_writes_run_on_the_loop_and_hit_as_dspys_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, to_workers: list[str]
) -> None:
    dspy.configure_cache(enable_memory_cache=True, enable_disk_cache=True, disk_cache_dir=str(tmp_path))
    spies = {name: _Spy(getattr(execution, name)) for name in ("_cached", "_store")}
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
        }
        assert "_price_result" not in to_workers
        again = fe(xs=ITEMS)  # (every answer from the entries the loop wrote)
    assert engines.async_calls == len(ITEMS)
    assert first.ys == again.ys == [f"echo:{x}" for x in ITEMS]
    assert again.run.usage.total.lm_cache_hits == len(ITEMS)
    assert len(spies["_store"].threads) == len(ITEMS)  # (hits are not written again)


def _cached_lm(engines: Engines, tmp_path: Any) -> Any:
    dspy.configure_cache(enable_memory_cache=True, enable_disk_cache=True, disk_cache_dir=str(tmp_path))
    return dspy.LM("fake/echo", engine=engines.sync, async_engine=engines.async_, cache=True, num_retries=0)


def test_a_sync_fanout_on_the_loop_shares_its_cache_entries_with_a_plain_sync_predict(tmp_path: Any) -> None:
    # (helper 89, p24: the loop's branches wrote DSPy's async keys, so a later plain `predict(...)`
    # with the same inputs paid the LM again, and a cache a plain sync run warmed was missed)
    engines = Engines()
    lm = _cached_lm(engines, tmp_path)
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    warm, cold = ITEMS[:3], ITEMS[3:]
    with dspy.context(lm=lm):
        plain = [dspy.Predict("x -> y")(x=x).y for x in warm]  # (sync keys, on this thread)
        assert engines.sync_calls == len(warm)
        first = fe(xs=ITEMS)  # (on the loop: misses only for the items nobody asked yet)
        assert engines.async_calls == len(cold)
        assert first.run.usage.total.lm_cache_hits == len(warm)
        later = [dspy.Predict("x -> y")(x=x).y for x in cold]  # (answered from the loop's entries)
    assert engines.sync_calls == len(warm)
    assert engines.async_calls == len(cold)
    assert first.ys == plain + later == [f"echo:{x}" for x in ITEMS]


def test_the_same_sync_fanout_keys_the_cache_alike_on_the_loop_and_on_threads(tmp_path: Any) -> None:
    # (a callback keeps a sync fan-out on threads: which way stageflow routes it must not decide
    # whether DSPy's LM cache answers)
    engines = Engines()
    lm = _cached_lm(engines, tmp_path)
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    with dspy.context(lm=lm):
        on_loop = fe(xs=ITEMS)
    assert engines.async_calls == len(ITEMS)
    assert engines.sync_calls == 0
    with dspy.context(lm=lm, callbacks=[BaseCallback()]):
        on_threads = fe(xs=ITEMS)
    assert engines.sync_calls == 0  # (every answer from the loop's entries)
    assert on_threads.run.usage.total.lm_cache_hits == len(ITEMS)
    assert on_threads.ys == on_loop.ys


def test_an_awaited_fanout_keys_dspys_async_entries_as_predict_acall_does(tmp_path: Any) -> None:
    engines = Engines()
    lm = _cached_lm(engines, tmp_path)
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")

    async def plain_acall() -> list[str]:
        return [(await dspy.Predict("x -> y").acall(x=x)).y for x in ITEMS]

    with dspy.context(lm=lm):
        plain = asyncio.run(plain_acall())
        awaited = asyncio.run(fe.acall(xs=ITEMS))
    assert engines.async_calls == len(ITEMS)  # (the awaited fan-out hit plain DSPy's async entries)
    assert awaited.run.usage.total.lm_cache_hits == len(ITEMS)
    assert awaited.ys == plain


def test_a_cache_step_shaped_otherwise_is_passed_on_as_it_is() -> None:
    seen: list[tuple[Any, ...]] = []

    def spy(*args: Any, **kwargs: Any) -> None:
        seen.append((args, tuple(sorted(kwargs.items()))))

    ex = LoopExecutor(max_workers=1)
    try:
        ex.submit(functools.partial(spy, execution._cached, "lm", "call", True))
        ex.submit(functools.partial(spy, execution._store, "lm", "call", "result", True))
        ex.submit(functools.partial(spy, execution._cached, "lm", "call", False))
        ex.submit(functools.partial(spy, execution._cached, "lm", "call", asynchronous=True))
        ex.submit(functools.partial(spy, execution._price_result, "lm", "r", "resp", "p", True))
    finally:
        ex.shutdown()
    assert seen == [
        ((execution._cached, "lm", "call", False), ()),
        ((execution._store, "lm", "call", "result", False), ()),
        ((execution._cached, "lm", "call", False), ()),
        ((execution._cached, "lm", "call"), (("asynchronous", True),)),
        ((execution._price_result, "lm", "r", "resp", "p", True), ()),
    ]


def test_a_step_is_recognised_by_identity_never_by_equality() -> None:
    # (helper 89: a partial of yours holding a numpy array, or an object whose == raises or always
    # says True, went through `in` and failed or ran in line)
    class Odd:
        def __eq__(self, other: object) -> bool:
            raise ValueError("no comparing me")

        __hash__ = object.__hash__

    class Same:
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = object.__hash__

    ex = LoopExecutor(max_workers=1, thread_name_prefix="worker")
    try:
        assert ex.submit(functools.partial(_where, Odd())).result().startswith("worker")
        assert ex.submit(functools.partial(_where, Same())).result().startswith("worker")
    finally:
        ex.shutdown()


def test_a_sync_fanout_inside_an_async_engine_on_the_loop_does_not_deadlock() -> None:
    # (helper 89: the loop waited for threads whose inner fan-outs waited for the loop, for ever)
    inner_engines = Engines()
    nested = ForEach(
        ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys"), over="g", item="xs", collect="yss"
    )
    outer_engines = Engines()
    original = outer_engines.async_.complete

    async def complete(request: Any) -> Any:
        with dspy.context(lm=inner_engines.lm()):
            assert nested(g=[["a"], ["b"]]).yss == [
                ["echo:a"],
                ["echo:b"],
            ]  # (blocks the loop: slow, not stuck)
        return await original(request)

    outer_engines.async_.complete = complete  # type: ignore[method-assign]
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    done: list[Any] = []

    def run() -> None:
        with dspy.context(lm=outer_engines.lm()):
            done.append(fe(xs=["p", "q"]).ys)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "deadlocked"
    assert done == [["echo:p", "echo:q"]]
    # The loop still serves later fan-outs.
    with dspy.context(lm=outer_engines.lm()):
        assert ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")(xs=["r"]).ys == ["echo:r"]


def test_an_awaited_fanout_of_predictors_runs_on_your_loop() -> None:
    engines = Engines()
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    with dspy.context(lm=engines.lm()):
        assert asyncio.run(fe.acall(xs=ITEMS[:3])).ys == [f"echo:{x}" for x in ITEMS[:3]]
    assert engines.threads == {"MainThread"}


def test_adapter_callbacks_keep_a_sync_fanout_on_threads() -> None:
    # (helper 89: callbacks given to the configured adapter ran on stageflow's loop)
    seen: list[str] = []

    class Callback(BaseCallback):
        def on_adapter_format_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            seen.append(threading.current_thread().name)

    engines = Engines()
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    with dspy.context(lm=engines.lm(), adapter=dspy.ChatAdapter(callbacks=[Callback()])):
        assert fe(xs=ITEMS[:3]).ys == [f"echo:{x}" for x in ITEMS[:3]]
    assert seen
    assert "stageflow-loop" not in seen
    assert engines.sync_calls == 3


def test_the_first_pricing_of_a_providers_answer_goes_to_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """(helper 111, finding 5) With DSPy's model metadata not loaded yet, pricing a provider's
    answer may fetch it over the network (five-second timeout): that ran on stageflow's loop and
    held up every branch. It goes to a worker now; once the metadata is loaded, it is in line."""
    import sys

    metadata = sys.modules["dspy.clients.model_metadata"]
    ex = LoopExecutor(max_workers=1, thread_name_prefix="worker")
    here = threading.current_thread().name
    provider = (execution._price_result, None, object(), None, "openai", None)
    try:
        monkeypatch.setattr(metadata, "_data", None)
        assert ex.submit(functools.partial(_where, *provider)).result().startswith("worker")
        monkeypatch.setattr(metadata, "_data", {})
        assert ex.submit(functools.partial(_where, *provider)).result() == here
    finally:
        ex.shutdown()


def test_a_pricing_function_of_yours_runs_on_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """(helper 111, finding 2) A replaced pricing function may wait on anything."""
    import sys

    costs = sys.modules["dspy.clients.costs"]
    ex = LoopExecutor(max_workers=1, thread_name_prefix="worker")
    priced = (execution._price_result, None, object(), None, None, None)
    try:
        monkeypatch.setattr(costs, "estimate_cost", lambda *a, **k: (None, {}))
        assert ex.submit(functools.partial(_where, *priced)).result().startswith("worker")
    finally:
        ex.shutdown()
