"""``stageflow run --profile`` prints the profiler's table to stderr (the result stays on stdout)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from stageflow.cli import main

COMPONENTS = """
def shout(text):
    return {"shout": text.upper()}

def count(shout):
    return {"n": len(shout)}
"""


def test_run_profile_prints_the_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "profcomponents.py").write_text(COMPONENTS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "profcomponents", raising=False)
    spec = tmp_path / "p.yaml"
    spec.write_text(
        textwrap.dedent(
            """\
            inputs: [text]
            root:
              type: pipeline
              stages:
              - component: 'profcomponents:shout'
                writes: [shout]
              - component: 'profcomponents:count'
                writes: [n]
            """
        ),
        encoding="utf-8",
    )
    argv = ["run", str(spec), "--allow-module", "profcomponents", "--input", '{"text": "hi"}']
    assert main([*argv, "--profile"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"text": "hi", "shout": "HI", "n": 2}
    lines = err.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage ") and "LM calls" in line)
    assert lines[header + 1].split()[:2] == ["stages[0]", "1"]
    assert lines[header + 2].split()[:2] == ["stages[1]", "1"]
    assert lines[header + 3].startswith("all runs (1)")
    assert any(line.startswith("critical path: stages[0] (") for line in lines)
    # Without --profile: no table.
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "critical path" not in err
