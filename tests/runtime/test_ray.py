"""The Ray backend on a real local cluster (one cluster for all these tests, 2 CPUs): a 200-record
run with injected failures, a run killed and resumed, and a program that cannot be pickled."""

from __future__ import annotations

import functools
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import dspy
import pytest
from batchfake import failing, log_counts, make_fake_lm, make_stage, pipeline_yaml, reject_every

import stageflow
from conftest import stageflow_cmd, subprocess_env
from stageflow.errors import ConfigurationError
from stageflow.runtime import RayBackend

pytestmark = pytest.mark.integration


def data(n: int) -> list[dict[str, Any]]:
    return [{"id": f"t-{i}", "text": f"t-{i}"} for i in range(n)]


def test_200_records_with_injected_failures(ray_cluster: Any, tmp_path: Path) -> None:
    program = stageflow.SequentialPipeline(
        [dspy.Predict("text -> answer"), stageflow.stage(reject_every(9), writes=["checked"])]
    )
    out = tmp_path / "out.jsonl"
    summary = stageflow.run_batch(
        program,
        data(200),
        backend=RayBackend(actors=2, slots=8),
        lm=functools.partial(make_fake_lm, latency=0.002),
        journal=tmp_path / "j",
        output=out,
        concurrency=16,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"t-{i}" for i in range(200)]
    bad = [r for r in rows if r["status"] == "error"]
    assert [r["id"] for r in bad] == [f"t-{i}" for i in range(200) if failing(f"t-{i}", 9)]
    assert bad[0]["error"]["stage_path"] == "stages[1]"
    assert "rejected t-0" in bad[0]["error"]["message"]
    ok = next(r for r in rows if r["status"] == "ok")
    assert ok["outputs"] == {"answer": ok["id"].upper(), "checked": True}
    assert summary.backend == "ray"
    assert (summary.succeeded, summary.failed) == (200 - len(bad), len(bad))
    assert summary.usage.lm_calls == 200
    assert summary.usage.input_tokens > 0


def test_a_program_that_cannot_be_pickled_gets_a_clear_error(ray_cluster: Any, tmp_path: Path) -> None:
    program = stageflow.SequentialPipeline([make_stage(str(tmp_path / "log"))])  # its FakeLM holds a lock
    with pytest.raises(ConfigurationError) as info:
        stageflow.run_batch(program, data(3), backend="ray", journal=tmp_path / "j")
    message = info.value.message
    assert info.value.code == "not_picklable"
    assert "cannot send the program to the Ray workers: program.stages[0].lm._lock" in message
    assert "_thread.lock" in message
    assert "pipeline file" in (info.value.hint or "")


def test_more_actors_than_cpus_is_refused(ray_cluster: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"3 Ray actors with num_cpus=1\.0 each need 3 CPUs"):
        stageflow.run_batch(
            stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": len(text)}, writes=["n"])]),
            data(2),
            backend=RayBackend(actors=3),
            journal=tmp_path / "j",
        )


def test_a_killed_ray_run_resumes_exactly_once(ray_cluster: Any, tmp_path: Path) -> None:
    n = 240
    log = tmp_path / "calls.log"
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(pipeline_yaml(str(log), 0.02, 11), encoding="utf-8")
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in data(n)))
    out, journal = tmp_path / "out.jsonl", tmp_path / "j.sqlite"
    address = ray_cluster.get_runtime_context().gcs_address
    argv = stageflow_cmd("batch", str(pipe), str(source), "-o", str(out), "--journal", str(journal))
    argv += ["--backend", "ray", "--ray-address", address, "--actors", "2", "--concurrency", "8"]
    argv += ["--allow-module", "batchfake", "--quiet"]
    proc = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and sum(log_counts(str(log)).values()) < 30:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    con = sqlite3.connect(journal)
    states = dict(con.execute("SELECT key, status FROM records"))
    con.close()
    finished_then = {k for k, s in states.items() if s in ("done", "failed")}
    running_then = {k for k, s in states.items() if s == "running"}
    calls_then = log_counts(str(log))
    assert 0 < len(finished_then) < n

    done = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # every 11th record fails by design
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"t-{i}" for i in range(n)]
    calls = log_counts(str(log))
    assert all(calls[k] == calls_then[k] for k in finished_then)  # not recomputed
    assert all(calls[k] <= 1 + (k in running_then) for k in calls)
    con = sqlite3.connect(journal)
    repeated, backend = con.execute("SELECT repeated, backend FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    con.close()
    assert (repeated, backend) == (len(running_then), "ray")


def test_the_concurrency_budget_is_split_across_the_actors(ray_cluster: Any, tmp_path: Path) -> None:
    def cap(text: str) -> dict[str, Any]:  # runs in a worker: the budget stageflow has there
        return {"cap": stageflow.get_config()["max_concurrency"]}

    program = stageflow.SequentialPipeline([stageflow.stage(cap, writes=["cap"])])
    with stageflow.limits(max_concurrency=6):  # the driver's budget, which workers cannot see
        summary = stageflow.run_batch(program, data(8), backend=RayBackend(actors=2), journal=tmp_path / "j")
    assert {row.outputs["cap"] for row in summary.rows() if row.outputs} == {3}
