"""The shared pool's threads (``stageflow.engine.workers.Workers``): jobs with and without a future,
threads started on demand and reused, shutdown, the interpreter's exit and a fork."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator

import pytest

from stageflow import ForEach, stage
from stageflow.engine.pool import shared_pool
from stageflow.engine.workers import Workers


@pytest.fixture
def pool() -> Iterator[Workers]:
    p = Workers(3, thread_name_prefix="test-workers")
    yield p
    p.shutdown()


def test_submit_gives_the_result_or_the_error(pool: Workers) -> None:
    assert pool.submit(divmod, 17, 5).result(5) == (3, 2)
    assert pool.submit(dict, a=1).result(5) == {"a": 1}
    error = pool.submit(divmod, 1, 0).exception(5)
    assert isinstance(error, ZeroDivisionError)


def test_a_job_runs_on_a_named_worker_thread(pool: Workers) -> None:
    name = pool.submit(lambda: threading.current_thread().name).result(5)
    assert name.startswith("test-workers_")
    assert name != threading.current_thread().name


def test_run_soon_runs_the_job_without_a_future(pool: Workers) -> None:
    seen: list[int] = []
    done = threading.Event()
    assert pool.run_soon(lambda a, b: (seen.append(a + b), done.set()), 2, 3) is True  # (a thread started)
    assert done.wait(5)
    assert seen == [5]


def test_run_soon_says_whether_a_worker_takes_the_job_now() -> None:
    one = Workers(1)
    try:
        release = threading.Event()
        assert one.run_soon(release.wait, 5) is True  # (its first thread starts for it)
        assert one.run_soon(print) is False  # (the only worker is busy: the job waits)
        release.set()
        assert one.submit(lambda: "after").result(5) == "after"
        time.sleep(0.05)  # (the worker is waiting for a job again)
        assert one.run_soon(lambda: None) is True
    finally:
        one.shutdown()


def test_a_worker_is_counted_waiting_once_after_the_jobs_queued_for_it() -> None:
    # (a count that runs ahead of the waiting workers would tell a fan-out a worker is coming when
    # none is, and the fan-out would wait instead of running its branches itself)
    one = Workers(1)
    try:
        release = threading.Event()
        one.run_soon(release.wait, 5)
        for _ in range(5):
            assert one.run_soon(time.sleep, 0.01) is False
        release.set()
        one.submit(lambda: None).result(5)  # (behind the five)
        time.sleep(0.05)
        assert len(one._waiting) == 1  # the one worker, waiting; not one per job it took
        assert one.run_soon(lambda: None) is True
    finally:
        one.shutdown()


def test_a_job_that_raises_is_logged_and_its_thread_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    one = Workers(1, thread_name_prefix="one")
    try:

        def boom() -> None:
            raise ValueError("job failed")

        with caplog.at_level(logging.CRITICAL, logger="stageflow"):
            one.run_soon(boom)
            # (the same single thread runs the next job: it did not die with the first)
            names = {one.submit(lambda: threading.current_thread().name).result(5) for _ in range(3)}
        assert names == {"one_0"}
        assert any("job failed" in (r.exc_text or "") or r.exc_info for r in caplog.records)
        assert any(r.exc_info and isinstance(r.exc_info[1], ValueError) for r in caplog.records)
    finally:
        one.shutdown()


def test_threads_start_on_demand_up_to_the_maximum(pool: Workers) -> None:
    release = threading.Event()
    running: set[str] = set()
    lock = threading.Lock()

    def hold() -> str:
        with lock:
            running.add(threading.current_thread().name)
        release.wait(5)
        return threading.current_thread().name

    futures = [pool.submit(hold) for _ in range(10)]
    time.sleep(0.1)
    assert len(running) == 3  # three threads busy, seven jobs waiting for them
    release.set()
    names = {f.result(5) for f in futures}
    assert len(names) == 3
    assert len(pool._threads) == 3


def test_an_idle_thread_is_reused_before_another_starts(pool: Workers) -> None:
    names = {pool.submit(lambda: threading.current_thread().name).result(5) for _ in range(20)}
    time.sleep(0.05)
    names |= {pool.submit(lambda: threading.current_thread().name).result(5) for _ in range(20)}
    assert len(names) == 1
    assert len(pool._threads) == 1


def test_after_shutdown_no_job_is_taken_but_the_queued_ones_run() -> None:
    one = Workers(1)
    release = threading.Event()
    first = one.submit(release.wait, 5)
    queued = one.submit(lambda: "ran")
    one.shutdown(wait=False)
    with pytest.raises(RuntimeError, match="shut down"):
        one.run_soon(print)
    with pytest.raises(RuntimeError, match="shut down"):
        one.submit(print)
    release.set()
    assert first.result(5) is True
    assert queued.result(5) == "ran"
    for t in one._threads:
        t.join(5)
        assert not t.is_alive()


def test_shutdown_can_cancel_the_futures_not_yet_started() -> None:
    one = Workers(1)
    release = threading.Event()
    ran: list[str] = []
    first = one.submit(release.wait, 5)
    time.sleep(0.05)
    waiting = one.submit(ran.append, "future")
    one.run_soon(ran.append, "plain")  # (no future to cancel: it still runs)
    threading.Timer(0.1, release.set).start()
    one.shutdown(wait=True, cancel_futures=True)
    assert first.result(0) is True
    assert waiting.cancelled()
    assert ran == ["plain"]


def test_a_failed_job_leaves_no_reference_cycle_through_its_future(pool: Workers) -> None:
    def fail() -> None:
        raise KeyError("x")

    future = pool.submit(fail)
    assert isinstance(future.exception(5), KeyError)
    time.sleep(0.05)  # (the worker is past the job)
    gc.disable()
    try:
        gone = weakref.ref(future)
        del future
        assert gone() is None  # freed by its count alone: no cycle for the collector to find
    finally:
        gc.enable()


def test_a_bad_size_is_refused() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        Workers(0)


def test_the_shared_pool_is_one_workers_pool() -> None:
    assert isinstance(shared_pool(), Workers)
    assert shared_pool() is shared_pool()


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )


def _late_writes(tmp_path: object, size: int, script: str) -> str:
    """What a script's pool jobs wrote by the time its process exited: ``script`` runs after a pool
    ``pool = Workers(size)`` and a job ``late(path)`` (0.3 s, then an ``x`` appended to ``path``)."""
    done = f"{tmp_path}/done"
    setup = f"""
        import threading, time
        from stageflow.engine.workers import Workers
        pool = Workers({size})
        def late(path):
            time.sleep(0.3)
            open(path, "a").write("x")
        """
    proc = _run(textwrap.dedent(setup) + textwrap.dedent(script).replace("PATH", repr(done)))
    assert proc.returncode == 0, proc.stderr
    with open(done) as f:
        return f.read()


def test_at_exit_the_queued_jobs_run_and_the_workers_are_joined(tmp_path: object) -> None:
    script = """
        pool.run_soon(late, PATH)
        pool.run_soon(late, PATH)  # (queued behind the first when the script ends)
        """
    assert _late_writes(tmp_path, 1, script) == "xx"


def test_a_forked_child_uses_a_pool_of_its_own_and_exits() -> None:
    proc = _run(
        """
        import os, sys, threading
        from stageflow.engine.pool import shared_pool
        hold = threading.Event()
        parent = shared_pool()
        parent.run_soon(hold.wait)  # (a parent's worker busy when it forks)
        pid = os.fork()
        if pid == 0:
            child = shared_pool()
            ok = child is not parent and child.submit(lambda: 41 + 1).result(10) == 42
            sys.stdout.write("child ok\\n" if ok else "child wrong\\n")
            sys.stdout.flush()
            sys.exit(0)  # (the exit joins the child's own workers, never the parent's)
        _, status = os.waitpid(pid, 0)
        hold.set()
        print("child status", os.waitstatus_to_exitcode(status))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "child ok" in proc.stdout
    assert "child status 0" in proc.stdout


def test_workers_a_daemon_thread_started_are_joined_at_exit_too(tmp_path: object) -> None:
    script = """
        handed = threading.Event()
        def start():
            pool.run_soon(late, PATH)
            handed.set()
        threading.Thread(target=start, daemon=True).start()
        handed.wait(10)
        """
    assert _late_writes(tmp_path, 2, script) == "x"


def test_a_pool_dropped_without_shutdown_ends_its_workers() -> None:
    dropped = Workers(2)
    assert dropped.submit(lambda: 1).result(5) == 1
    threads = list(dropped._threads)
    del dropped
    gc.collect()
    for t in threads:
        t.join(5)
        assert not t.is_alive()


def test_at_rest_every_worker_is_counted_waiting_once() -> None:
    # (the count decides whether a fan-out's caller runs branches itself, and whether a thread
    # starts: one that ran behind let threads pile up, one that ran ahead made fan-outs wait)
    pool = Workers(8)
    try:
        rng = __import__("random").Random(7)

        def submitter(seed: int) -> None:
            r = __import__("random").Random(seed)
            for _ in range(300):
                if r.random() < 0.5:
                    pool.run_soon(time.sleep, r.random() / 2000)
                else:
                    pool.submit(time.sleep, r.random() / 2000)

        threads = [threading.Thread(target=submitter, args=(rng.random(),)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        pool.submit(lambda: None).result(5)
        deadline = time.monotonic() + 5
        while len(pool._waiting) != len(pool._threads) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(pool._threads) == 8
        assert len(pool._waiting) == len(pool._threads)
    finally:
        pool.shutdown()


def test_repeated_fan_outs_leave_the_shared_pool_counted_exactly() -> None:
    def work(x: int) -> dict[str, int]:
        time.sleep(0.001)
        return {"y": x}

    fans = [
        ForEach(stage(work, writes=["y"]), over="xs", item="x", collect="ys", on_error=policy)
        for policy in ("fail_fast", "collect")
    ]
    pool = shared_pool()
    for n in (1, 7, 64, 3, 200, 16):
        for each in fans:
            assert each(xs=list(range(n))).ys == list(range(n))
    deadline = time.monotonic() + 5
    while len(pool._waiting) != len(pool._threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(pool._waiting) == len(pool._threads)


def test_a_logging_filter_that_raises_does_not_end_a_worker() -> None:
    # (helper 113, N2: the thread died, and with one worker every later job waited for ever)
    class Broken(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise RuntimeError("filter broke")

    log = logging.getLogger("stageflow")
    broken = Broken()
    log.addFilter(broken)
    one = Workers(1)
    try:
        one.run_soon(lambda: 1 / 0)
        assert one.submit(lambda: 42).result(5) == 42
        assert all(t.is_alive() for t in one._threads)
    finally:
        log.removeFilter(broken)
        one.shutdown()


def test_when_no_thread_can_start_the_jobs_wait_for_the_workers_there_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (helper 113, P5: with a process's thread limit reached, every job failed though workers existed)
    pool = Workers(8)
    try:
        assert pool.submit(lambda: 1).result(5) == 1
        release = threading.Event()
        pool.run_soon(release.wait, 5)  # (the one worker busy: the next job would start a thread)

        def cannot_start(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", cannot_start)
        later = pool.submit(lambda: "ran")
        assert pool.run_soon(lambda: None) is False  # (queued: no worker free, none could start)
        release.set()
        assert later.result(5) == "ran"
        assert len(pool._threads) == 1
        fresh = Workers(2)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            fresh.run_soon(print)  # (no thread at all: nothing would ever run it)
    finally:
        monkeypatch.undo()
        pool.shutdown()


def test_fan_outs_running_while_max_threads_changes_all_finish() -> None:
    # (helper 113, P1: a fan-out that had the pool configure() replaced failed with "cannot run new
    # jobs after the pool was shut down"; under an outer on_error="collect" that was rows of None)
    import stageflow

    def work(x: int) -> dict[str, int]:
        time.sleep(0.001)
        return {"y": x}

    each = ForEach(stage(work, writes=["y"]), over="xs", item="x", collect="ys")
    before = stageflow.get_config()["max_threads"]
    errors: list[BaseException] = []
    done = [0]

    def client() -> None:
        for _ in range(30):
            try:
                assert each(xs=list(range(40))).ys == list(range(40))
                done[0] += 1
            except BaseException as e:  # (counted, not raised in a thread where nobody sees it)
                errors.append(e)

    clients = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in clients:
            t.start()
        for i in range(60):
            stageflow.configure(max_threads=2 + i % 3)
            time.sleep(0.003)
    finally:
        for t in clients:
            t.join(60)
        stageflow.configure(max_threads=before)
    assert errors == []
    assert done[0] == 120


def test_a_fan_out_in_a_thread_still_running_at_exit_runs_in_that_thread() -> None:
    # (helper 113, P3: the pool takes no jobs once the interpreter exits; a fan-out then failed with
    # RuntimeError. Its caller runs its branches itself now)
    proc = _run(
        """
        import threading, time
        import stageflow
        each = stageflow.ForEach(
            stageflow.stage(lambda x: {"y": x * 2}, writes=["y"]), over="xs", item="x", collect="ys"
        )
        each(xs=[0])  # (the pool exists, as in a program that used it)
        def late():
            time.sleep(0.3)
            print("ys", each(xs=[1, 2, 3]).ys, flush=True)
        threading.Thread(target=late).start()
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "ys [2, 4, 6]" in proc.stdout
