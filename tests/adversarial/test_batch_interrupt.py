"""A second Ctrl-C stops ``stageflow batch`` at once, also when a record runs a ForEach (r_int_2).

Before the fix, the second Ctrl-C on a pipeline with a ForEach waited for the items in flight (the
ForEach's pool threads are daemon threads there, so ``entry()`` did not see them as busy, but
``concurrent.futures`` joins them at exit): a stage sleeping 30 s kept the process 30 s. With a
plain stage it exited at once. The journal stays consistent: finished records are kept, the
records in flight run again on resume, and every id is in the output exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SLOW = """
import os, pathlib, time

def work(word):
    if word == "slow" and os.environ.get("SLOW_STAGE") == "1":
        pathlib.Path(os.environ["STARTED_DIR"], f"{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(600)
    return {"out": word.upper()}
"""

PIPELINE = """\
version: 1
inputs: [words]
root:
  type: foreach
  over: words
  item: word
  collect: {out: outs}
  stage: {component: 'slowitems:work', writes: [out]}
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_a_second_ctrl_c_stops_a_batch_with_a_foreach_at_once(tmp_path: Path) -> None:
    (tmp_path / "slowitems.py").write_text(SLOW, encoding="utf-8")
    (tmp_path / "p.yaml").write_text(PIPELINE, encoding="utf-8")
    rows = [{"id": "fast1", "words": ["a", "b"]}] + [
        {"id": f"r{i}", "words": ["slow", "x"]} for i in range(4)
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    started = tmp_path / "started"
    started.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "STARTED_DIR": str(started),
    }
    command = [sys.executable, "-m", "stageflow", "batch", "p.yaml", "d.jsonl", "-o", "o.jsonl"]
    command += ["--allow-module", "slowitems", "--concurrency", "2", "--quiet"]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**env, "SLOW_STAGE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(list(started.iterdir())) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(started.iterdir())) == 2, proc.communicate(timeout=10)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    # The items sleep 600 s: waiting for them would run past this timeout.
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "To resume, run:" in err
    # Resume with fast stages: every id once, the interrupted records ran again.
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in lines] == [r["id"] for r in rows]
    assert {row["status"] for row in lines} == {"ok"}
    assert lines[1]["outputs"]["outs"] == ["SLOW", "X"]
