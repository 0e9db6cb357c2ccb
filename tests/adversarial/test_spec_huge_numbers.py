"""Numbers too long for Python's int() in pipeline files, --input and batch records (r_cli_2).

Before the fix, a pipeline file with a 10,000-digit integer exited 1 ("run failed: ValueError:
Exceeds the limit (4300 digits) ..."); so did ``--input`` and a JSON Lines record holding one.
Every bad input is exit 2, naming the file and the line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stageflow.cli import main

HUGE = "9" * 10_000
MODEL = ["--lm", "openai/x", "--api-base", "http://127.0.0.1:9"]


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("top.yaml", f"version: {HUGE}\n", 1),
        ("nested.yaml", f"version: 1\ninputs: [x]\nroot: {{predict: 'x -> y', n: -1_{HUGE}}}\n", 3),
        ("top.json", f'{{"version": 1,\n "x": {HUGE}}}\n', 2),
    ],
)
def test_a_pipeline_file_with_a_huge_integer_is_exit_2_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, line: int
) -> None:
    (tmp_path / name).write_text(text, encoding="utf-8")
    assert main(["validate", str(tmp_path / name)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{name}, line {line}: a number with" in err
    assert "Traceback" not in err


def test_a_value_yaml_cannot_convert_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "date.yaml").write_text("version: 1\ndescription: 2001-02-30\nroot: {predict: 'x -> y'}\n")
    assert main(["validate", str(tmp_path / "date.yaml")]) == 2
    assert "date.yaml" in capsys.readouterr().err


def test_input_json_with_a_huge_integer_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.yaml").write_text("inputs: [x]\nroot: {predict: 'x -> y'}\n", encoding="utf-8")
    assert main(["run", str(tmp_path / "p.yaml"), "--input", f'{{"x": {HUGE}}}', *MODEL]) == 2
    assert "--input holds a value that cannot be read" in " ".join(capsys.readouterr().err.split())


def test_a_batch_record_with_a_huge_integer_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text("inputs: [x]\nroot: {predict: 'x -> y'}\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(f'{{"id": 1, "x": "ok"}}\n{{"id": 2, "x": {HUGE}}}\n', encoding="utf-8")
    code = main(
        ["batch", str(tmp_path / "p.yaml"), str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "o"), *MODEL]
    )
    assert code == 2
    assert "d.jsonl line 2 holds a value that cannot be read" in " ".join(capsys.readouterr().err.split())
