"""The process backend: records run in worker processes (fork by default; spawn on request) with the
journal, the output and the summary in the parent, exactly as in a local run.

Tests that hold for every backend run once per backend from one parametrization (``backend``); the
rest are about processes: dying workers, unpicklable programs under spawn, budgets and rate limits
that cannot be shared, the parent's threads and locks that a forked worker must not inherit."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dspy
import pytest
from batchfake import dying_pipeline_yaml, log_counts, make_stage, pipeline_yaml

import stageflow
from conftest import ctrl_c_when, journal_statuses, subprocess_env
from stageflow.engine.hooks import Hook
from stageflow.errors import ConfigurationError, ContractError
from stageflow.runtime import BackendError, BatchInterrupted, ProcessBackend
from stageflow.runtime.journal import Journal
from stageflow.testing import FakeLM

BACKENDS = {
    "local": lambda: "local",
    "processes": lambda: ProcessBackend(processes=2),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Any:
    return BACKENDS[request.param]()


def data(n: int) -> list[dict[str, Any]]:
    return [{"id": f"t-{i}", "text": f"t-{i}"} for i in range(n)]


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- the same behaviour on every backend ---------------------------------------------------------


def test_every_record_once_in_input_order_with_error_rows_and_usage(backend: Any, tmp_path: Path) -> None:
    log = str(tmp_path / "calls.log")
    program = stageflow.SequentialPipeline([make_stage(log, latency=0.001, fail_every=7)])
    out = tmp_path / "out.jsonl"
    summary = stageflow.run_batch(
        program, data(60), backend=backend, journal=tmp_path / "j", output=out, concurrency=6
    )
    rows = read_output(out)
    assert [r["id"] for r in rows] == [f"t-{i}" for i in range(60)]
    bad = [r["id"] for r in rows if r["status"] == "error"]
    assert bad == [f"t-{i}" for i in range(0, 60, 7)]
    assert rows[1] == {"id": "t-1", "status": "ok", "outputs": {"answer": "T-1"}}
    assert (summary.succeeded, summary.failed, summary.ran) == (60 - len(bad), len(bad), 60)
    assert summary.usage.lm_calls == 60 - len(bad)  # a failed FakeLM call is not billed
    assert summary.usage.input_tokens > 0
    assert log_counts(log) == {f"t-{i}": 1 for i in range(60)}  # each record ran once, wherever it ran
    assert summary.backend == ("local" if backend == "local" else "processes")


def test_the_callers_dspy_context_reaches_the_records(backend: Any, tmp_path: Path) -> None:
    lm = FakeLM({"answer": lambda inputs: inputs["text"][::-1]})
    program = stageflow.SequentialPipeline([dspy.Predict("text -> answer")])
    with dspy.context(lm=lm):
        summary = stageflow.run_batch(program, data(4), backend=backend, concurrency=2)
    assert [row.outputs for row in summary.rows()] == [{"answer": f"{i}-t"} for i in range(4)]


def test_ctrl_c_lets_records_in_flight_finish_and_the_same_call_resumes(backend: Any, tmp_path: Path) -> None:
    journal, out, log = tmp_path / "j", tmp_path / "out.jsonl", str(tmp_path / "calls.log")
    program = stageflow.SequentialPipeline([make_stage(log, latency=0.02)])

    def done(found: dict[str, str]) -> bool:
        return list(found.values()).count("done") >= 4

    watcher = ctrl_c_when(journal, done)
    with pytest.raises(BatchInterrupted) as info:
        stageflow.run_batch(program, data(300), backend=backend, journal=journal, output=out, concurrency=4)
    watcher.join()
    stopped = info.value.summary
    assert 0 < stopped.remaining < 300
    assert stopped.ran == 300 - stopped.remaining  # the records in flight finished
    assert set(journal_statuses(journal).values()) <= {"done", "pending"}
    summary = stageflow.run_batch(
        program, data(300), backend=backend, journal=journal, output=out, concurrency=4
    )
    assert (summary.ran, summary.repeated) == (stopped.remaining, 0)
    assert [r["id"] for r in read_output(out)] == [f"t-{i}" for i in range(300)]
    assert log_counts(log) == {f"t-{i}": 1 for i in range(300)}


def test_budgets_and_rate_limits_in_force_are_refused_by_other_backends(backend: Any, tmp_path: Path) -> None:
    program = stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": len(text)}, writes=["n"])])
    if backend == "local":  # threads share them: allowed
        with stageflow.budget(max_calls=5):
            assert stageflow.run_batch(program, data(2), backend=backend).ok
        return
    with stageflow.budget(max_calls=5), pytest.raises(ConfigurationError) as info:
        stageflow.run_batch(program, data(2), backend=backend)
    assert info.value.code == "unshareable_limits"
    assert "a budget (stageflow.budget)" in info.value.message
    assert "would overshoot" in info.value.message
    with stageflow.rate_limit("openai/gpt-4o-mini", rpm=10), pytest.raises(ConfigurationError) as info:
        stageflow.run_batch(program, data(2), backend=backend)
    assert "rate limits (openai/gpt-4o-mini)" in info.value.message
    with stageflow.budget(max_calls=5), pytest.raises(ConfigurationError, match=r"unshareable|overshoot"):
        stageflow.run_batch(program, data(2), backend="ray")  # refused before Ray is even started


def test_a_stage_exiting_with_an_object_fails_its_record_only(backend: Any, tmp_path: Path) -> None:
    class UnprintableError(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    def step(text: str) -> dict[str, str]:
        if text == "t-1":
            sys.exit(threading.Lock())  # SystemExit.code is that object: not an error code
        if text == "t-2":
            raise UnprintableError
        return {"seen": text}

    program = stageflow.SequentialPipeline([stageflow.stage(step, writes=["seen"])])
    out = tmp_path / "out.jsonl"
    summary = stageflow.run_batch(program, data(4), backend=backend, output=out, concurrency=2)
    assert (summary.succeeded, summary.failed) == (2, 2)
    errors = {r["id"]: r["error"] for r in read_output(out) if r["status"] == "error"}
    assert errors["t-1"]["type"] == "SystemExit"
    assert errors["t-1"]["code"] is None
    assert "lock object" in errors["t-1"]["message"]
    assert errors["t-2"]["type"] == "StageError"  # its own error, naming the stage
    assert "UnprintableError: <UnprintableError: its text could not be made" in errors["t-2"]["message"]


def test_a_lone_stage_has_its_contract_checked_before_any_record_runs(backend: Any, tmp_path: Path) -> None:
    calls = tmp_path / "calls"

    @stageflow.stage(writes=["n"])
    def count(text: str) -> dict[str, int]:
        calls.touch()
        return {"n": len(text)}

    with pytest.raises(ContractError) as info:
        stageflow.run_batch(count, [{"id": "a", "txt": "hi"}], backend=backend)
    assert info.value.field == "text"
    assert "count()" in info.value.message
    assert not calls.exists()
    lm = FakeLM({"answer": "x"})
    with pytest.raises(ContractError) as info:  # a bare Predict would call the model without the field
        stageflow.run_batch(
            dspy.Predict("question -> answer"), [{"id": "a", "q": "?"}], lm=lm, backend=backend
        )
    assert info.value.field == "question"
    assert lm.calls == 0
    summary = stageflow.run_batch(count, data(3), backend=backend)
    assert [row.outputs for row in summary.rows()] == [{"n": 3}] * 3


def test_a_second_ctrl_c_counts_only_what_the_journal_keeps(backend: Any, tmp_path: Path) -> None:
    journal, release = tmp_path / "j", tmp_path / "release"

    def step(text: str) -> dict[str, str]:
        if int(text.rsplit("-", 1)[1]) >= 6:  # records from t-6 on wait until the test ends
            while not release.exists():
                time.sleep(0.01)
        return {"seen": text}

    program = stageflow.SequentialPipeline([stageflow.stage(step, writes=["seen"])])

    def stuck(found: dict[str, str]) -> bool:  # t-0 .. t-5 done, t-6 .. t-9 waiting
        return [found.get(f"t-{i}") for i in range(10)] == ["done"] * 6 + ["running"] * 4

    watcher = ctrl_c_when(journal, stuck, presses=2)
    try:
        with pytest.raises(BatchInterrupted) as info:
            stageflow.run_batch(program, data(20), backend=backend, journal=journal, concurrency=4)
    finally:
        watcher.join()
        release.touch()  # (the local backend's abandoned threads end)
    stopped = info.value.summary
    found = journal_statuses(journal)
    assert list(found.values()).count("done") == stopped.succeeded == 6
    assert stopped.failed == 0  # the abandoned records are not error rows...
    assert stopped.ran == 6  # ...and not counted as run
    assert [k for k, v in found.items() if v == "running"] == [f"t-{i}" for i in range(6, 10)]
    time.sleep(0.3)  # what the abandoned threads do afterwards changes nothing
    assert journal_statuses(journal) == found


def test_outputs_and_errors_holding_a_lone_surrogate_fail_their_record_only(
    backend: Any, tmp_path: Path
) -> None:
    def step(text: str) -> dict[str, str]:
        if text == "t-1":
            return {"seen": "x\ud800y"}  # valid in Python, not in UTF-8: the journal cannot store it
        if text == "t-2":
            raise ValueError("bad \udc80 byte")
        if text == "t-3":
            sys.exit("bye")
        return {"seen": text}

    program = stageflow.SequentialPipeline([stageflow.stage(step, writes=["seen"])])
    out = tmp_path / "out.jsonl"
    summary = stageflow.run_batch(program, data(5), backend=backend, output=out, concurrency=2)
    rows = {r["id"]: r for r in read_output(out)}
    assert (summary.succeeded, summary.failed) == (2, 3)
    assert rows["t-1"]["error"]["code"] == "unwritable_output"
    assert "output field 'seen'" in rows["t-1"]["error"]["message"]
    assert rows["t-1"]["error"]["stage_path"] == "stages[0]"  # (was null)
    assert "bad \\udc80 byte" in rows["t-2"]["error"]["message"]
    assert rows["t-3"]["error"]["type"] == "SystemExit"
    assert rows["t-3"]["error"]["code"] is None  # (not "bye": that is the exit's argument)
    assert rows["t-3"]["error"]["stage_path"] == "stages[0]"  # (was null)


def test_bad_max_concurrency_is_refused_before_anything_starts(backend: Any) -> None:
    program = stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": 1}, writes=["n"])])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError, match="max_concurrency must be a positive int") as info:
            stageflow.run_batch(program, data(2), backend=backend, max_concurrency=bad)
        assert info.value.field == "max_concurrency"


# -- processes only ------------------------------------------------------------------------------


def dying_program(victims: set[str], pids: Path, switch: Path | None = None) -> stageflow.SequentialPipeline:
    """Its worker process kills itself on the ``victims`` (while the ``switch`` file exists, if given)."""

    def step(text: str) -> dict[str, str]:
        with open(pids, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()}\n")
        if text in victims and (switch is None or switch.exists()):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.002)
        return {"seen": text}

    return stageflow.SequentialPipeline([stageflow.stage(step, writes=["seen"])])


def test_a_killed_worker_fails_its_record_is_replaced_and_the_rest_finish(tmp_path: Path) -> None:
    out, pids = tmp_path / "out.jsonl", tmp_path / "pids"
    summary = stageflow.run_batch(
        dying_program({"t-5"}, pids),
        data(40),
        backend=ProcessBackend(processes=2),
        journal=tmp_path / "j",
        output=out,
        concurrency=2,  # one record per worker at a time: only the victim was in flight in its worker
    )
    rows = read_output(out)
    assert [r["id"] for r in rows] == [f"t-{i}" for i in range(40)]
    bad = [r for r in rows if r["status"] == "error"]
    assert [r["id"] for r in bad] == ["t-5"]
    assert bad[0]["error"]["type"] == "WorkerDiedError"
    assert bad[0]["error"]["code"] == "worker_died"
    assert "was killed by SIGKILL while running this record" in bad[0]["error"]["message"]
    assert (summary.succeeded, summary.failed) == (39, 1)
    assert len(set(pids.read_text().split())) == 3  # two workers, one of them replaced
    assert os.getpid() not in {int(p) for p in pids.read_text().split()}


def test_workers_that_keep_dying_stop_the_batch_and_the_journal_resumes(tmp_path: Path) -> None:
    journal, out, pids, switch = tmp_path / "j", tmp_path / "out.jsonl", tmp_path / "pids", tmp_path / "die"
    switch.touch()
    program = dying_program({"t-3", "t-4", "t-9"}, pids, switch)
    with pytest.raises(BackendError) as info:
        stageflow.run_batch(
            program,
            data(30),
            backend=ProcessBackend(processes=1, max_restarts=1),
            journal=journal,
            output=out,
            concurrency=1,
        )
    assert info.value.code == "backend_failed"
    assert "no restarts left" in info.value.message
    assert not out.exists()
    assert journal_statuses(journal)["t-3"] == "failed"  # the first death: an error row, the worker replaced
    switch.unlink()  # the same program (the journal accepts it), no more deaths
    summary = stageflow.run_batch(
        program,
        data(30),
        backend=ProcessBackend(processes=1),
        journal=journal,
        output=out,
        concurrency=1,
        retry_failed=True,
    )
    assert summary.ok
    assert [r["status"] for r in read_output(out)] == ["ok"] * 30


def test_spawned_workers_build_the_program_from_a_pipeline_file(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("PYTHONPATH", subprocess_env()["PYTHONPATH"])  # the spawned workers find batchfake
    log = str(tmp_path / "calls.log")
    spec = tmp_path / "p.yaml"
    spec.write_text(pipeline_yaml(log, 0.0, 0), encoding="utf-8")
    summary = stageflow.run_batch(
        spec,
        data(8),
        backend=ProcessBackend(processes=2, start_method="spawn"),
        allow_modules=["batchfake"],
        concurrency=4,
    )
    assert [row.outputs for row in summary.rows()] == [{"answer": f"T-{i}"} for i in range(8)]
    assert log_counts(log) == {f"t-{i}": 1 for i in range(8)}


def test_spawn_with_a_program_that_cannot_be_pickled_names_the_part(tmp_path: Path) -> None:
    program = stageflow.SequentialPipeline([make_stage(str(tmp_path / "log"))])  # its FakeLM holds a lock
    with pytest.raises(ConfigurationError) as info:
        stageflow.run_batch(program, data(2), backend=ProcessBackend(start_method="spawn"))
    assert info.value.code == "not_picklable"
    assert "cannot send the program to the worker processes: program.stages[0].lm._lock" in info.value.message
    assert "start_method='fork'" in (info.value.hint or "")


def test_fork_sends_nothing_so_a_program_holding_locks_runs(tmp_path: Path) -> None:
    program = stageflow.SequentialPipeline([make_stage(str(tmp_path / "log"))])
    summary = stageflow.run_batch(program, data(6), backend="processes", concurrency=2)
    assert [row.outputs["answer"] for row in summary.rows()] == [f"T-{i}" for i in range(6)]


def test_forked_workers_restart_the_parents_background_loop_and_thread_pool(tmp_path: Path) -> None:
    async def shout(text: str) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"loud": text.upper(), "parts": text.split("-")}

    fan = stageflow.ForEach(
        stageflow.stage(lambda part: {"n": len(part)}, writes=["n"]), over="parts", item="part"
    )
    program = stageflow.SequentialPipeline([stageflow.stage(shout, writes=["loud", "parts"]), fan])
    assert program(text="ab").loud == "AB"  # the parent's background loop and pool are running now
    summary = stageflow.run_batch(program, data(6), backend="processes", concurrency=4)
    assert summary.ok
    assert [row.outputs["loud"] for row in summary.rows()] == [f"T-{i}" for i in range(6)]


def test_a_forked_child_does_not_keep_the_journal_locked(tmp_path: Path) -> None:
    with Journal(tmp_path / "j") as j:
        fd = j._lock_fd
        assert fd is not None
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its copy of the lock descriptor is closed
            try:
                os.fstat(fd)
                os.write(w, b"open")
            except OSError:
                os.write(w, b"closed")
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        assert os.read(r, 10) == b"closed"
        os.close(r)
        os.fstat(fd)  # the parent's is not


def test_bad_process_backend_options_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="processes must be a positive int"):
        ProcessBackend(processes=0)
    with pytest.raises(ConfigurationError, match="start_method='threads' is not available here"):
        ProcessBackend(start_method="threads")
    with pytest.raises(ConfigurationError, match="max_restarts must be an int >= 0"):
        ProcessBackend(max_restarts=-1)


def test_the_cli_runs_a_batch_in_worker_processes(tmp_path: Path) -> None:
    import subprocess

    log = str(tmp_path / "calls.log")
    spec = tmp_path / "p.yaml"
    spec.write_text(pipeline_yaml(log, 0.0, 0), encoding="utf-8")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in data(10)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "stageflow", "batch", str(spec), str(source), "-o", str(out),
         "--backend", "processes", "--processes", "2", "--allow-module", "batchfake"],
        env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "batch summary (processes)" in done.stderr + done.stdout
    assert [r["outputs"]["answer"] for r in read_output(out)] == [f"T-{i}" for i in range(10)]
    assert log_counts(log) == {f"t-{i}": 1 for i in range(10)}


def test_a_stage_raising_keyboardinterrupt_in_a_worker_fails_that_record_only(tmp_path: Path) -> None:
    def step(text: str) -> dict[str, str]:
        if text == "t-3":
            raise KeyboardInterrupt  # not the user's Ctrl-C: the parent handles that
        return {"seen": text}

    program = stageflow.SequentialPipeline([stageflow.stage(step, writes=["seen"])])
    summary = stageflow.run_batch(program, data(10), backend=ProcessBackend(processes=1), concurrency=2)
    errors = {row.id: row.error for row in summary.rows() if row.error}
    assert list(errors) == ["t-3"]
    assert errors["t-3"]["type"] == "KeyboardInterrupt"
    assert summary.succeeded == 9


class _Rebuilt:
    """Pickles in the parent; rebuilding it in a worker process fails."""

    def __init__(self, home: int) -> None:
        self.home = home

    def __reduce__(self) -> Any:
        return (_rebuild, (self.home,))


def _rebuild(home: int) -> _Rebuilt:
    if os.getpid() != home:
        raise RuntimeError("cannot rebuild this value here")
    return _Rebuilt(home)


def test_inputs_a_worker_cannot_rebuild_or_that_cannot_be_sent_fail_their_records(tmp_path: Path) -> None:
    program = stageflow.SequentialPipeline(
        [stageflow.stage(lambda text, extra=None: {"seen": text}, reads=["text", "extra"], writes=["seen"])]
    )
    records: list[dict[str, Any]] = [{"id": f"t-{i}", "text": f"t-{i}", "extra": None} for i in range(6)]
    records[2]["extra"] = _Rebuilt(os.getpid())

    @dataclasses.dataclass
    class Local:  # the journal compares it by its fields; pickle cannot find its class
        n: int

    records[4]["extra"] = Local(1)
    summary = stageflow.run_batch(program, records, backend=ProcessBackend(processes=1), concurrency=2)
    errors = {row.id: row.error for row in summary.rows() if row.error}
    assert sorted(errors) == ["t-2", "t-4"]
    assert errors["t-2"]["code"] == "unsendable_input"
    assert "rebuilt in the worker process (RuntimeError: cannot rebuild" in errors["t-2"]["message"]
    assert errors["t-4"]["code"] == "unsendable_input"
    assert "the input field 'extra' of this record cannot be sent" in errors["t-4"]["message"]
    assert summary.succeeded == 4


def test_max_concurrency_holds_across_all_worker_processes(tmp_path: Path) -> None:
    spans = tmp_path / "spans"

    def step(text: str) -> dict[str, str]:
        start = time.time()
        time.sleep(0.05)
        with open(spans, "a", encoding="utf-8") as fh:  # one short O_APPEND write per record
            fh.write(f"{start} {time.time()}\n")
        return {"seen": text}

    program = stageflow.SequentialPipeline([stageflow.stage(step, writes=["seen"])])
    summary = stageflow.run_batch(
        program, data(16), backend=ProcessBackend(processes=4), concurrency=8, max_concurrency=2
    )
    assert summary.ok
    events = []
    for line in spans.read_text().splitlines():
        start, end = map(float, line.split())
        events += [(start, 1), (end, -1)]
    running = peak = 0
    for _, step_by in sorted(events, key=lambda e: (e[0], e[1])):
        running += step_by
        peak = max(peak, running)
    assert peak <= 2  # (4 processes with one slot each would reach 4)


def test_every_record_in_flight_in_a_killed_worker_names_the_signal(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    def step(text: str) -> dict[str, str]:
        with open(pids, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()}\n")
        if text == "t-3":
            time.sleep(0.2)  # t-0 .. t-2 are in flight with it
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(1 if text in ("t-0", "t-1", "t-2") else 0)
        return {"seen": text}

    program = stageflow.SequentialPipeline([stageflow.stage(step, writes=["seen"])])
    summary = stageflow.run_batch(program, data(8), backend=ProcessBackend(processes=1), concurrency=4)
    errors = {row.id: row.error for row in summary.rows() if row.error}
    assert sorted(errors) == ["t-0", "t-1", "t-2", "t-3"]
    for error in errors.values():
        assert "was killed by SIGKILL while running this record" in error["message"], error
    assert summary.succeeded == 4


_IMPORTER = """
import sys, threading, time
sys.path.insert(0, sys.argv[1])
import stageflow
from stageflow.runtime import ProcessBackend

def step(text):
    import slowmod  # finished in this process: but half-imported in a child forked mid-import
    return {"seen": slowmod.VALUE + text}

if __name__ == "__main__":
    program = stageflow.SequentialPipeline([stageflow.stage(step, writes=["seen"])])
    importer = threading.Thread(target=lambda: __import__("slowmod"))
    importer.start()
    time.sleep(0.1)  # slowmod is being imported now
    summary = stageflow.run_batch(program, [{"text": "a"}, {"text": "b"}], backend="processes",
                                  concurrency=2, progress=False)
    print([row.outputs["seen"] for row in summary.rows()])
"""


def test_a_fork_waits_for_imports_other_threads_have_in_progress(tmp_path: Path) -> None:
    import subprocess

    (tmp_path / "slowmod.py").write_text("import time\ntime.sleep(0.6)\nVALUE = 'v-'\n", encoding="utf-8")
    script = tmp_path / "job.py"
    script.write_text(_IMPORTER, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip  (without the wait, a worker waits for slowmod's import lock for ever)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['v-a', 'v-b']"


def test_spawn_from_a_script_without_a_main_guard_says_so(tmp_path: Path) -> None:
    import subprocess

    script = tmp_path / "job.py"
    script.write_text(
        "import stageflow\n"
        "from stageflow.runtime import ProcessBackend\n"
        "size = stageflow.stage(lambda text: {'n': len(text)}, writes=['n'])\n"
        "stageflow.run_batch(size, [{'text': 'hi'}], progress=False,\n"
        "                    backend=ProcessBackend(processes=1, start_method='spawn'))\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, str(script)], env=subprocess_env(), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "could not build the program: the process exited with code 1 before it was ready" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr


def test_the_cli_reports_a_failed_backend_with_its_summary_and_the_resume_command(tmp_path: Path) -> None:
    import subprocess

    spec = tmp_path / "p.yaml"
    spec.write_text(dying_pipeline_yaml(), encoding="utf-8")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in data(10)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "stageflow", "batch", str(spec), str(source), "-o", str(out),
         "--backend", "processes", "--processes", "1", "--concurrency", "1", "--allow-module", "batchfake"],
        env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "batch summary (processes)" in done.stderr
    assert "no restarts left" in done.stderr
    assert "To resume, run:" in done.stderr
    assert f"--journal {tmp_path / 'out.jsonl.journal'}" in done.stderr
    assert "--backend processes --processes 1" in done.stderr
    assert not out.exists()


class _Listener(Hook):
    """A hook that only collects: what it would see in a worker process stays there."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def after_stage(self, *, path: str, **rest: Any) -> None:
        self.seen.append(path)


class _Exporter(_Listener):
    exports_from_workers = True  # (like the OpenTelemetry hook: each forked worker exports its own)


def test_hooks_that_would_collect_nothing_are_refused_by_other_backends(tmp_path: Path) -> None:
    from stageflow.engine.hooks import attach_hooks

    program = stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": 1}, writes=["n"])])
    listener = _Listener()
    with attach_hooks(listener):
        with pytest.raises(ConfigurationError) as info:
            stageflow.run_batch(program, data(2), backend="processes")
        assert info.value.code == "unshareable_hooks"
        assert "(_Listener)" in info.value.message
        with pytest.raises(ConfigurationError, match=r"unshareable|would not see"):
            stageflow.run_batch(program, data(2), backend="ray")  # refused before Ray starts
        assert stageflow.run_batch(program, data(2), backend="local").ok
    assert listener.seen  # (the local run's)
    with attach_hooks(_Exporter()):
        assert stageflow.run_batch(program, data(2), backend="processes").ok
        with pytest.raises(ConfigurationError, match="would not see"):
            stageflow.run_batch(program, data(2), backend=ProcessBackend(start_method="spawn"))


def test_forked_workers_do_not_share_numpys_random_state(tmp_path: Path) -> None:
    import numpy as np

    def draw(text: str) -> dict[str, int]:
        return {"r": int(np.random.randint(0, 2**62))}

    np.random.seed(7)
    program = stageflow.SequentialPipeline([stageflow.stage(draw, writes=["r"])])
    summary = stageflow.run_batch(program, data(8), backend=ProcessBackend(processes=2), concurrency=2)
    draws = [row.outputs["r"] for row in summary.rows()]
    assert len(set(draws)) == 8  # (with the parent's state copied, the two workers drew the same four)


def test_a_worker_whose_own_child_keeps_its_pipe_open_is_still_seen_dying(tmp_path: Path) -> None:
    import multiprocessing

    pids = tmp_path / "pids"

    def step(text: str) -> dict[str, str]:
        if text == "t-2":
            child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
            child.start()  # it inherits the worker's end of the pipe
            pids.write_text(str(child.pid))
            os.kill(os.getpid(), signal.SIGKILL)
        return {"seen": text}

    program = stageflow.SequentialPipeline([stageflow.stage(step, writes=["seen"])])
    gave_up = threading.Event()

    def deadline() -> None:  # (without the fix the batch waits for the child: end it, and fail)
        if not finished.wait(60):
            gave_up.set()
            os.kill(int(pids.read_text()), signal.SIGKILL)

    finished = threading.Event()
    guard = threading.Thread(target=deadline)
    guard.start()
    try:
        summary = stageflow.run_batch(program, data(6), backend=ProcessBackend(processes=1), concurrency=1)
    finally:
        finished.set()
        guard.join()
        if pids.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pids.read_text()), signal.SIGKILL)
    assert not gave_up.is_set()
    errors = {row.id: row.error for row in summary.rows() if row.error}
    assert list(errors) == ["t-2"]
    assert "was killed by SIGKILL" in errors["t-2"]["message"]


_ORPHAN = """
import os, sys, time
import stageflow
from stageflow.runtime import ProcessBackend

def step(text):
    with open(sys.argv[1], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(600)
    return {"seen": text}

if __name__ == "__main__":
    program = stageflow.SequentialPipeline([stageflow.stage(step, writes=["seen"])])
    stageflow.run_batch(program, [{"text": "a"}, {"text": "b"}], backend=ProcessBackend(processes=2),
                        concurrency=2, progress=False)
"""


def test_workers_stop_when_the_batch_process_is_killed(tmp_path: Path) -> None:
    import subprocess

    script, pids = tmp_path / "job.py", tmp_path / "pids"
    script.write_text(_ORPHAN, encoding="utf-8")
    parent = subprocess.Popen([sys.executable, str(script), str(pids)], env=subprocess_env())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_lines(pids)) < 2:
            time.sleep(0.05)
        workers = [int(p) for p in _lines(pids)]
        assert len(workers) == 2
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    alive = [p for p in workers if _alive(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert alive == []  # (they would sleep their 600 s, the records' results lost)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_too_many_records_in_flight_for_the_open_file_limit_is_refused_up_front() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    program = stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": 1}, writes=["n"])])
    with pytest.raises(ConfigurationError, match=r"needs about \d+ open files") as info:
        stageflow.run_batch(program, data(2), backend="processes", concurrency=hard)
    assert info.value.field == "concurrency"


def test_numpy_ints_are_fine_as_the_number_of_processes() -> None:
    import numpy as np

    assert ProcessBackend(processes=np.int64(2)).processes == 2


@pytest.mark.integration
def test_opentelemetry_spans_of_forked_workers_are_exported(tmp_path: Path) -> None:
    import fcntl

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    spans = tmp_path / "spans"

    class FileExporter(SpanExporter):  # (spans exported from any process land in one file)
        def export(self, batch: Any) -> SpanExportResult:
            with open(spans, "a", encoding="utf-8") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                fh.writelines(s.name + "\n" for s in batch)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(FileExporter()))
    program = stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": 1}, writes=["n"], name="one")])
    stageflow.instrument_otel(tracer_provider=provider)
    try:
        summary = stageflow.run_batch(program, data(20), backend=ProcessBackend(processes=2), concurrency=2)
    finally:
        stageflow.uninstrument_otel()
    provider.force_flush()
    assert summary.ok
    assert spans.read_text().split().count("one") == 20  # (buffered spans were lost when a worker exited)


def test_ctrl_c_while_the_workers_start_is_an_interrupted_run(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "slowstart.py").write_text("import time\ntime.sleep(1.5)\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    importer = threading.Thread(target=lambda: __import__("slowstart"))  # the fork waits for it
    program = stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": 1}, writes=["n"])])
    journal = tmp_path / "j"
    importer.start()
    presser = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    presser.start()
    try:
        with pytest.raises(BatchInterrupted) as info:
            stageflow.run_batch(program, data(5), backend="processes", journal=journal, concurrency=2)
    finally:
        presser.join()
        importer.join()
    assert (info.value.summary.remaining, info.value.summary.ran) == (5, 0)
    assert set(journal_statuses(journal).values()) == {"pending"}
    summary = stageflow.run_batch(program, data(5), backend="processes", journal=journal, concurrency=2)
    assert summary.ok
    assert summary.ran == 5


def test_numpy_ints_are_fine_for_the_concurrency_options(backend: Any) -> None:
    import numpy as np

    program = stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": 1}, writes=["n"])])
    summary = stageflow.run_batch(
        program, data(3), backend=backend, concurrency=np.int64(2), max_concurrency=np.int32(2)
    )
    assert summary.ok
    with pytest.raises(ConfigurationError, match="concurrency must be a positive int"):
        stageflow.run_batch(program, data(3), backend=backend, concurrency=np.int64(0))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_ctrl_c_just_as_a_worker_starts_leaves_no_process_behind(
    tmp_path: Path, monkeypatch: Any, method: str
) -> None:
    """A Ctrl-C pressed while a worker process started reached the parent before the process was
    registered: close() did not know it, and the interpreter waited for it forever at exit."""
    import multiprocessing.process

    started: list[Any] = []
    real_start = multiprocessing.process.BaseProcess.start

    def start_then_ctrl_c(self: Any) -> None:
        real_start(self)
        started.append(self.pid)
        if len(started) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # (taken at once by any thread that does not block it)
            time.sleep(0.2)  # (Python raises it in the main thread at its next step: still in here)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start_then_ctrl_c)
    program = stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": 1}, writes=["n"])])
    with pytest.raises(BatchInterrupted):
        stageflow.run_batch(
            program,
            data(4),
            backend=ProcessBackend(processes=2, start_method=method),
            journal=tmp_path / "j",
            concurrency=2,
        )
    assert started
    for pid in started:  # (one was left running: nothing would ever stop it)
        assert _gone(pid)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            return True  # (already reaped by the backend)
        time.sleep(0.05)
    return False


def test_stage_cache_files_written_in_workers_are_kept(backend: Any, tmp_path: Path) -> None:
    """A worker ended without committing its queued cache writes (it exits without running atexit):
    the processes backend left the cache file empty."""
    import sqlite3

    from stageflow.policies.write_queue import flush_all

    def scale(text: str) -> dict[str, str]:
        return {"y": text * 2}

    db = tmp_path / "cache.db"
    program = stageflow.SequentialPipeline(
        [stageflow.CachedStage(stageflow.stage(scale, writes=["y"]), persist_to=db)]
    )
    summary = stageflow.run_batch(program, data(12), backend=backend, concurrency=4)
    assert summary.ok
    flush_all()  # (this process's own queue, for the local backend; workers commit theirs as they exit)
    with sqlite3.connect(db) as con:
        (rows,) = con.execute("select count(*) from stageflow_cache").fetchone()
    assert rows == 12
