"""A sync fan-out of predictors whose LM awaits its own engine runs as tasks on stageflow's
background loop (``stageflow.engine.awaitable``): the async engine answers every branch, results
and usage equal the async call's, policies apply; other LMs keep their branches on threads."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.lm15 import Message, Response, Usage
from dspy.utils import DummyLM
from dspy.utils.callback import BaseCallback

import stageflow
from stageflow import ForEach, ParallelPipeline, RetryPolicy, Stage
from stageflow.engine.awaitable import lm_awaits
from stageflow.testing import FakeLM


def _echo(request: Any) -> Response:
    text = request.messages[-1].parts[0].text
    x = re.search(r"\[\[ ## x ## \]\]\n(.*?)\n", text)
    value = x.group(1) if x else "?"
    return Response(
        id=None,
        model="fake/echo",
        message=Message.assistant(
            f"[[ ## reasoning ## ]]\nr\n\n[[ ## y ## ]]\necho:{value}\n\n[[ ## completed ## ]]"
        ),
        finish_reason="stop",
        usage=Usage(input_tokens=3, output_tokens=2, total_tokens=5),
    )


class Engines:
    """A sync and an async engine that echo ``x``, counting which one was called (and on what
    thread), and the answers given (a cancelled request gives none)."""

    def __init__(self, latency: float = 0.0, fail_first: int = 0) -> None:
        self.sync_calls = 0
        self.async_calls = 0
        self.answered = 0
        self.threads: set[str] = set()
        self.latency = latency
        self.fail_first = fail_first
        self.lock = threading.Lock()
        outer = self

        class Sync:
            def complete(self, request: Any) -> Response:
                with outer.lock:
                    outer.sync_calls += 1
                    outer.threads.add(threading.current_thread().name)
                    n = outer.sync_calls + outer.async_calls
                if n <= outer.fail_first:
                    raise ConnectionError("engine down")
                time.sleep(outer.latency)
                with outer.lock:
                    outer.answered += 1
                return _echo(request)

            def close(self) -> None:
                return None

        class Async:
            async def complete(self, request: Any) -> Response:
                with outer.lock:
                    outer.async_calls += 1
                    outer.threads.add(threading.current_thread().name)
                    n = outer.sync_calls + outer.async_calls
                if n <= outer.fail_first:
                    raise ConnectionError("engine down")
                await asyncio.sleep(outer.latency)
                with outer.lock:
                    outer.answered += 1
                return _echo(request)

            async def aclose(self) -> None:
                return None

        self.sync, self.async_ = Sync(), Async()

    def lm(self, with_async: bool = True) -> dspy.LM:
        return dspy.LM(
            "fake/echo",
            engine=self.sync,
            async_engine=self.async_ if with_async else None,
            cache=False,
            num_retries=0,
        )


ITEMS = [f"item{i}" for i in range(12)]


def test_a_sync_foreach_of_predictors_awaits_the_async_engine() -> None:
    engines = Engines(latency=0.01)
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    with dspy.context(lm=engines.lm()):
        result = fe(xs=ITEMS)
    assert result.ys == [f"echo:{x}" for x in ITEMS]
    assert engines.async_calls == len(ITEMS)
    assert engines.sync_calls == 0
    assert engines.threads == {"stageflow-loop"}


def test_sync_and_async_calls_give_the_same_result_and_usage() -> None:
    engines = Engines()
    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    with dspy.context(lm=engines.lm()):
        sync = fe(xs=ITEMS)
        awaited = asyncio.run(fe.acall(xs=ITEMS))
    assert sync.ys == awaited.ys
    assert sync.run.usage.total.lm_calls == awaited.run.usage.total.lm_calls == len(ITEMS)
    assert sync.run.usage.total.input_tokens == awaited.run.usage.total.input_tokens == 3 * len(ITEMS)


def test_the_lm_set_on_the_predictor_decides() -> None:
    engines = Engines()
    cot = dspy.ChainOfThought("x -> y")
    cot.predict.lm = engines.lm()
    fe = ForEach(cot, over="xs", item="x", collect={"y": "ys"})
    with dspy.context(lm=DummyLM([{"reasoning": "r", "y": "wrong"}] * 20)):
        result = fe(xs=ITEMS[:3])
    assert engines.async_calls == 3
    assert result.ys == [f"echo:{x}" for x in ITEMS[:3]]


def test_a_retry_covers_each_branch_on_the_loop() -> None:
    engines = Engines(fail_first=2)
    item = Stage(dspy.Predict("x -> y"), retry=RetryPolicy(max_attempts=3, initial_delay=0))
    fe = ForEach(item, over="xs", item="x", collect="ys", max_concurrency=1)
    with dspy.context(lm=engines.lm()):
        result = fe(xs=ITEMS[:4])
    assert result.ys == [f"echo:{x}" for x in ITEMS[:4]]
    assert engines.async_calls == 6
    assert engines.sync_calls == 0


def test_a_sync_parallel_group_of_predictors_runs_on_the_loop() -> None:
    engines = Engines()
    par = ParallelPipeline(
        [
            [
                Stage(dspy.Predict("x -> y"), outputs={"y": "a"}),
                Stage(dspy.Predict("x -> y"), outputs={"y": "b"}),
            ]
        ]
    )
    with dspy.context(lm=engines.lm()):
        result = par(x="q")
    assert (result.a, result.b) == ("echo:q", "echo:q")
    assert engines.async_calls == 2


@pytest.mark.parametrize(
    "make_lm",
    [
        pytest.param(lambda e: e.lm(with_async=False), id="custom engine without async_engine"),
        pytest.param(lambda e: FakeLM({"y": "fake"}), id="a dspy.LM subclass"),
        pytest.param(lambda e: DummyLM([{"y": "dummy"}] * 20), id="DummyLM"),
    ],
)
def test_other_lms_keep_their_branches_on_threads(make_lm: Any) -> None:
    engines = Engines()
    lm = make_lm(engines)
    assert not lm_awaits(lm)
    threads: list[str] = []

    class Where(BaseCallback):  # type: ignore[misc]
        def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            threads.append(threading.current_thread().name)

    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    with dspy.context(lm=lm, callbacks=[Where()]):
        result = fe(xs=ITEMS[:3])
    assert len(result.ys) == 3
    assert engines.async_calls == 0
    assert len(threads) == 3
    assert "stageflow-loop" not in threads


def test_with_callbacks_in_force_the_branches_stay_on_threads() -> None:
    engines = Engines()
    threads: list[str] = []

    class Where(BaseCallback):  # type: ignore[misc]
        def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            threads.append(threading.current_thread().name)

    fe = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    with dspy.context(lm=engines.lm(), callbacks=[Where()]):
        result = fe(xs=ITEMS[:3])
    assert result.ys == [f"echo:{x}" for x in ITEMS[:3]]
    assert engines.async_calls == 0
    assert len(threads) == 3
    assert "stageflow-loop" not in threads
    lm = engines.lm()
    lm.callbacks = [Where()]
    with dspy.context(lm=lm):
        fe(xs=ITEMS[:2])
    assert engines.async_calls == 0


def test_a_sync_function_among_the_branches_keeps_them_on_threads() -> None:
    engines = Engines()
    threads: list[str] = []

    @stageflow.stage(writes=["b"])
    def plain(x: str) -> dict[str, str]:
        threads.append(threading.current_thread().name)
        return {"b": x}

    par = ParallelPipeline([[Stage(dspy.Predict("x -> y"), outputs={"y": "a"}), plain]])
    with dspy.context(lm=engines.lm()):
        result = par(x="q")
    assert result.a == "echo:q"
    assert engines.sync_calls == 1
    assert engines.async_calls == 0
    assert threads
    assert threads[0] != "stageflow-loop"


def test_provider_models_await_natively() -> None:
    assert lm_awaits(dspy.LM("openai/gpt-4o-mini"))
    assert not lm_awaits(None)


CTRL_C = """
import asyncio, os, signal, sys, threading, time
import dspy, stageflow
from dspy.lm15 import Message, Response, Usage

started, finished = [], []

class Sync:
    def complete(self, request):
        raise AssertionError("the sync engine is not used")
    def close(self):
        return None

class Async:
    async def complete(self, request):
        started.append(1)
        await asyncio.sleep(3)
        finished.append(1)
        text = "[[ ## y ## ]]\\nok\\n\\n[[ ## completed ## ]]"
        return Response(id=None, model="fake/x", message=Message.assistant(text), finish_reason="stop",
                        usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))
    async def aclose(self):
        return None

lm = dspy.LM("fake/x", engine=Sync(), async_engine=Async(), cache=False, num_retries=0)
fe = stageflow.ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    with dspy.context(lm=lm):
        fe(xs=[str(i) for i in range(8)])
    print("NO INTERRUPT")
except KeyboardInterrupt:
    waited = time.monotonic() - t0
    time.sleep(3.5)
    print(f"interrupted {waited < 2.5} started {len(started)} finished {len(finished)}")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to the process")
def test_ctrl_c_cancels_the_branches_on_the_loop(tmp_path: Path) -> None:
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "interrupted True started 8 finished 0"


def test_a_sync_fan_out_of_async_stages_from_the_loop_is_refused_not_deadlocked() -> None:
    @stageflow.stage(writes=["y"])
    async def g(x: str) -> dict[str, str]:
        return {"y": x}

    inner = ForEach(g, over="xs", item="x", collect="ys")

    @stageflow.stage(writes=["y"])
    async def f(x: str) -> dict[str, Any]:
        return {"y": inner(xs=[x, x]).ys}  # a sync call, from the loop's thread

    outer = ForEach(f, over="xs", item="x", collect="ys")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outer(xs=["a"])
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "deadlocked"
    assert len(errors) == 1
    assert isinstance(errors[0], stageflow.ConfigurationError)
    assert errors[0].code == "async_in_sync"
