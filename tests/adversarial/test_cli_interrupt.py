"""``stageflow run`` exits 130 on Ctrl-C, also while a ForEach is running items (issue 9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_during_a_foreach_exits_130(tmp_path: Path) -> None:
    started = tmp_path / "started"
    (tmp_path / "slowmods.py").write_text(
        textwrap.dedent(
            f"""
            import pathlib, time
            def slow(x):
                pathlib.Path({str(started)!r}).touch()
                time.sleep(30)
                return {{"y": x}}
            """
        ),
        encoding="utf-8",
    )
    spec = tmp_path / "p.yaml"
    spec.write_text(
        textwrap.dedent(
            """\
            version: 1
            inputs: [xs]
            root:
              type: foreach
              over: xs
              item: x
              stage: item
            nodes:
              item:
                component: 'slowmods:slow'
                writes: [y]
            """
        ),
        encoding="utf-8",
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stageflow",
            "run",
            str(spec),
            "--allow-module",
            "slowmods",
            "--input",
            '{"xs": [1, 2, 3]}',
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), proc.communicate(timeout=10)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err.lower()
    assert '"y"' not in out  # no result printed as if the run had succeeded
