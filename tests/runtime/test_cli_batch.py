"""``stageflow batch``: exit codes, messages, the summary, Ctrl-C and the resume command."""

from __future__ import annotations

import json
import re
import shlex
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from batchfake import log_counts, pipeline_yaml

from conftest import stageflow_cmd, subprocess_env
from stageflow.cli import main


def write_data(path: Path, n: int, start: int = 0) -> Path:
    path.write_text("".join(json.dumps({"id": f"t-{i}", "text": f"t-{i}"}) + "\n" for i in range(start, n)))
    return path


def setup(tmp_path: Path, n: int = 12, latency: float = 0.0, fail_every: int = 0) -> tuple[Path, Path, Path]:
    log = tmp_path / "calls.log"
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(pipeline_yaml(str(log), latency, fail_every), encoding="utf-8")
    return pipe, write_data(tmp_path / "data.jsonl", n), log


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["batch", *argv, "--allow-module", "batchfake"])
    return code, capsys.readouterr().err


def test_all_good_exits_0_with_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipe, data, log = setup(tmp_path)
    out = tmp_path / "out.jsonl"
    code, err = run(capsys, str(pipe), str(data), "-o", str(out), "--concurrency", "4")
    assert code == 0
    assert "batch summary (local)" in err
    assert "LM calls          12" in err
    assert f"wrote 12 results to {out}" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[5] == {"id": "t-5", "status": "ok", "outputs": {"answer": "T-5"}}
    assert (tmp_path / "out.jsonl.journal").exists()  # the default journal sits next to the output
    code, err = run(capsys, str(pipe), str(data), "-o", str(out))
    assert code == 0
    assert "finished earlier  12 (not run again)" in err
    assert sum(log_counts(str(log)).values()) == 12


def test_failed_records_exit_1_and_say_how_to_retry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipe, data, _ = setup(tmp_path, n=10, fail_every=4)
    out = tmp_path / "out.jsonl"
    code, err = run(capsys, str(pipe), str(data), "-o", str(out), "--quiet")
    assert code == 1
    assert "3 of 10 records failed" in err
    assert '"status": "error" rows' in err
    assert "--retry-failed" in err
    assert "batch summary" not in err
    errors = [json.loads(line) for line in out.read_text().splitlines() if '"error"' in line]
    assert [e["id"] for e in errors] == ["t-0", "t-4", "t-8"]
    assert errors[0]["error"]["stage_path"] == "stages[0]"
    assert "scripted failure for t-0" in errors[0]["error"]["message"]
    rows = [line for line in out.read_text().splitlines() if '"error"' in line]
    assert all(json.dumps(json.loads(r), ensure_ascii=False, separators=(",", ":")) == r for r in rows)


def test_retry_failed_is_not_counted_as_repeated_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipe, data, log = setup(tmp_path, n=10, fail_every=4)
    out = str(tmp_path / "out.jsonl")
    assert run(capsys, str(pipe), str(data), "-o", out, "--quiet")[0] == 1
    for _ in range(2):
        code, err = run(capsys, str(pipe), str(data), "-o", out, "--retry-failed")
        assert code == 1
        assert "ran this run      3 (3 failed ones retried)" in err
        assert "repeated work     0 record(s) in flight at an earlier stop, run again\n" in err
    assert log_counts(str(log))["t-4"] == 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"id": "a", "text": "x"}\n{"id": "b", "text": \n', "line 2 is not valid JSON"),
        ('{"id": "a", "prompt": "x"}\n', "line 1 (record 'a'; fields ['prompt'])"),
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "already used at line 1"),
    ],
)
def test_bad_input_exits_2_before_any_lm_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: str, message: str
) -> None:
    pipe, _, log = setup(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data, encoding="utf-8")
    code, err = run(capsys, str(pipe), str(bad), "-o", str(tmp_path / "o.jsonl"))
    assert code == 2
    assert "invalid input" in err
    assert message in " ".join(err.split())
    assert not log.exists()
    assert not (tmp_path / "o.jsonl").exists()


def test_a_record_missing_a_field_gets_a_fix_for_records_and_pipeline_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # User report: the fix said `Stage(<stage>, inputs={...})` (Python) for a pipeline file.
    pipe, _, log = setup(tmp_path)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"id": "a", "body": "x"}) + "\n", encoding="utf-8")
    code, err = run(capsys, str(pipe), str(wrong), "-o", str(tmp_path / "o.jsonl"))
    text = " ".join(err.split())
    assert code == 2
    assert "give every record of" in text
    assert "Stage(<stage>" not in text
    assert "inputs: {text: body}" in text
    assert not log.exists()


def test_a_changed_pipeline_file_is_refused_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipe, data, log = setup(tmp_path, n=4)
    out = str(tmp_path / "out.jsonl")
    assert run(capsys, str(pipe), str(data), "-o", out)[0] == 0
    with pipe.open("a", encoding="utf-8") as fh:  # one more stage
        fh.write("  - component: 'batchfake:slow_length'\n    writes: [length]\n")
    code, err = run(capsys, str(pipe), str(data), "-o", out)
    err = " ".join(err.split())  # the message is wrapped at 100 columns
    assert code == 2
    assert "the program changed (added stages: stages[1];" in err  # which stage, by its path
    assert "--allow-changed" in err
    code, err = run(capsys, str(pipe), str(data), "-o", out, "--allow-changed")
    assert code == 0
    assert "finished earlier  4" in err
    assert sum(log_counts(str(log)).values()) == 4


def test_ray_options_need_the_ray_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipe, data, log = setup(tmp_path, n=2)
    code, err = run(capsys, str(pipe), str(data), "-o", str(tmp_path / "o"), "--actors", "2")
    assert code == 2
    assert "apply to the Ray backend only" in err
    code, err = run(capsys, str(pipe), str(data), "-o", str(tmp_path / "o"), "--concurrency", "0")
    assert code == 2
    assert "--concurrency must be at least 1" in err
    assert not log.exists()


def test_batch_help_does_not_import_dspy() -> None:
    probe = (
        "import sys; from stageflow.cli import main; main(['batch', '--help']); print('dspy' in sys.modules)"
    )
    done = subprocess.run(
        [stageflow_cmd()[0], "-c", probe], capture_output=True, text=True, env=subprocess_env(), check=True
    )
    assert "--retry-failed" in done.stdout
    assert done.stdout.strip().endswith("False")


def test_ctrl_c_exits_130_and_prints_the_command_that_resumes(tmp_path: Path) -> None:
    pipe, data, log = setup(tmp_path, n=150, latency=0.02)
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "j.sqlite"
    argv = ["batch", str(pipe), str(data), "-o", str(out), "--journal", str(journal), "--concurrency", "4"]
    argv += ["--allow-module", "batchfake"]
    proc = subprocess.Popen(stageflow_cmd(*argv), env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(log_counts(str(log)).values()) < 8:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopping: letting" in err
    assert "batch summary (local) — interrupted" in err
    assert not out.exists()
    command = re.search(r"To resume, run:\n  (.+)\n", err)
    assert command is not None
    resume = shlex.split(command.group(1))
    assert resume[:2] == ["stageflow", "batch"]
    assert "--journal" in resume
    done = subprocess.run(stageflow_cmd(*resume[1:]), env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert rows == [f"t-{i}" for i in range(150)]
    counts = log_counts(str(log))
    assert set(counts) == {f"t-{i}" for i in range(150)}
    assert set(counts.values()) == {1}
    con = sqlite3.connect(journal)
    states = [s for (s,) in con.execute("SELECT state FROM runs ORDER BY id")]
    con.close()
    assert states == ["interrupted", "finished"]


def test_a_second_ctrl_c_stops_without_waiting_and_resume_counts_the_repeats(tmp_path: Path) -> None:
    pipe, data, log = setup(tmp_path, n=40, latency=0.5)
    out, journal = tmp_path / "out.jsonl", tmp_path / "j.sqlite"
    argv = ["batch", str(pipe), str(data), "-o", str(out), "--journal", str(journal), "--concurrency", "4"]
    argv += ["--allow-module", "batchfake", "--quiet"]
    proc = subprocess.Popen(stageflow_cmd(*argv), env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(log_counts(str(log)).values()) < 4:
        time.sleep(0.01)
    time.sleep(0.1)  # the next records are in their 0.5 s LM calls
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "stopping now: records still in flight will run again on resume" in err
    con = sqlite3.connect(journal)
    running = {k for (k,) in con.execute("SELECT key FROM records WHERE status = 'running'")}
    con.close()
    assert running  # abandoned in flight
    done = subprocess.run(stageflow_cmd(*argv), env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"t-{i}" for i in range(40)]
    con = sqlite3.connect(journal)
    repeated = con.execute("SELECT repeated FROM runs ORDER BY id DESC LIMIT 1").fetchone()[0]
    con.close()
    assert repeated == len(running)


def test_id_field_id_named_explicitly_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--id-field id`` on a CSV without an ``id`` column was taken for the default and keyed every
    record by its line number without a word."""
    pipe, _, log = setup(tmp_path)
    data = tmp_path / "data.csv"
    data.write_text("text\na\nb\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code, err = run(capsys, str(pipe), str(data), "-o", str(out), "--id-field", "id", "--quiet")
    assert code == 2
    said = " ".join(err.split())  # (the message is wrapped to the terminal's width)
    assert "data.csv line 1: the CSV header has no 'id' column" in said
    assert not out.exists()
    assert log_counts(str(log)) == {}
    code, err = run(capsys, str(pipe), str(data), "-o", str(out), "--quiet")  # left out: line numbers
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [2, 3]
