"""A fan-out whose workers find the shared pool full runs branches in its caller at once (helper
114: with ``max_threads=1`` an awaited ForEach of ``def`` stages waited 50 ms per branch for a worker
under ``fail_fast``; nested fan-outs on 8 threads took 7× the time ``on_error="collect"`` took)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import stageflow
from stageflow import ForEach, stage
from stageflow.engine import fanout
from stageflow.testing import call


@pytest.fixture
def small_pool(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    before = stageflow.get_config()["max_threads"]
    size: int = request.param
    stageflow.configure(max_threads=size)
    # (a fan-out that waited for a worker, or for the starvation check, would now wait minutes)
    monkeypatch.setattr(fanout, "_STARVATION_CHECK", 120.0)
    yield size
    stageflow.configure(max_threads=before)


def _work(x: int) -> dict[str, int]:
    time.sleep(0.002)
    return {"y": x * 2}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("small_pool", [1, 2, 4], indirect=True)
@pytest.mark.parametrize("policy", ["fail_fast", "collect", "skip"])
async def test_a_fan_out_on_a_full_pool_never_waits_for_a_worker(
    mode: str, small_pool: int, policy: str
) -> None:
    threads: set[str] = set()

    def work(x: int) -> dict[str, int]:
        threads.add(threading.current_thread().name)
        return _work(x)

    each = ForEach(stage(work, writes=["y"]), over="xs", item="x", collect="ys", on_error=policy)
    result = await call(each, mode, xs=list(range(40)))
    assert result.ys == [2 * x for x in range(40)]
    assert len(threads) <= small_pool + 1  # (the pool's threads, and the caller's)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("small_pool", [2, 8], indirect=True)
async def test_nested_fail_fast_fan_outs_on_a_small_pool_finish(mode: str, small_pool: int) -> None:
    inner = ForEach(stage(_work, writes=["y"]), over="xs", item="x", collect="ys")
    mid = ForEach(inner, over="rows", item="xs", collect={"ys": "grid"})
    outer = ForEach(mid, over="blocks", item="rows", collect={"grid": "cube"})
    blocks = [[list(range(6))] * 6] * 6
    result = await call(outer, mode, blocks=blocks)
    assert result.cube == [[[2 * x for x in range(6)]] * 6] * 6


@pytest.mark.timeout(60)
@pytest.mark.parametrize("small_pool", [1], indirect=True)
def test_a_failing_branch_still_stops_a_fail_fast_fan_out_that_its_caller_helps(small_pool: int) -> None:
    started: list[int] = []

    def work(x: int) -> dict[str, int]:
        started.append(x)
        if x == 3:
            raise ValueError("element 3")
        return _work(x)

    each = ForEach(stage(work, writes=["y"]), over="xs", item="x", collect="ys")
    with pytest.raises(stageflow.StageError, match="element 3"):
        each(xs=list(range(200)))
    time.sleep(0.05)
    assert len(started) < 10  # (those running when element 3 failed; never the rest)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("small_pool", [1, 2], indirect=True)
def test_fail_fast_on_a_full_pool_stops_at_the_first_error_while_other_branches_run(small_pool: int) -> None:
    # (helper 115: the caller ran a branch itself while others ran, so it saw the first error only
    # when its own branch ended: 2 s instead of 0.1 s, and the running branches' LM calls went on)
    release = threading.Event()
    outlived: list[int] = []

    def work(x: int) -> dict[str, int]:
        if x == 0:
            time.sleep(0.05)
            raise ValueError("first")
        if not release.wait(5):
            outlived.append(x)  # (still running when the fan-out should long have stopped)
        return {"y": x}

    each = ForEach(stage(work, writes=["y"]), over="xs", item="x", collect="ys")
    try:
        with pytest.raises(stageflow.StageError, match="first"):
            each(xs=list(range(6)))
    finally:
        release.set()
    assert outlived == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("small_pool", [2], indirect=True)
def test_a_quorum_on_a_full_pool_ends_the_ensemble_while_slow_members_run(small_pool: int) -> None:
    release = threading.Event()
    outlived: list[str] = []

    def member(name: str, fast: bool) -> stageflow.FunctionStage:
        def answer(question: str) -> dict[str, str]:
            if fast:
                time.sleep(0.05)
            elif not release.wait(5):
                outlived.append(name)
            return {"answer": "Paris"}

        return stage(answer, writes=["answer"], name=name)

    ensemble = stageflow.EnsemblePipeline(
        [member("a", True), member("b", True), member("c", False), member("d", False)], quorum=2
    )
    try:
        assert ensemble(question="q").answer == "Paris"
    finally:
        release.set()
    assert outlived == []
