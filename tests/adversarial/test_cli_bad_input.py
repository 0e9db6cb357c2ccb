"""Issue 9: every bad input to every subcommand is exit 2 and one paragraph on stderr — no traceback.

Each row is a hostile argument found by trying the subcommands one by one; on the code before the
fix each of them crashed with exit 1 ("run failed: RecursionError ..."), ran a whole pipeline before
failing, hung, or exited 0 with a silently wrong result.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from stageflow.cli import main

COMPONENT = """
import sys


def shout(text):
    return {'shout': text.upper()}


def leave(text):
    sys.exit(0)
"""


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("cliadv", "clibroken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "cliadv.py").write_text(COMPONENT, encoding="utf-8")
    (tmp_path / "clibroken.py").write_text("raise RuntimeError('broken at import')\n", encoding="utf-8")
    (tmp_path / "ok.yaml").write_text(
        "inputs: [text]\nroot: {component: 'cliadv:shout', writes: [shout]}\n", encoding="utf-8"
    )
    (tmp_path / "broken.yaml").write_text("inputs: [text]\nroot: {component: 'clibroken:f'}\n", "utf-8")
    (tmp_path / "deep.yaml").write_text("root: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    bomb = ["description:", "- &a0 [x, x]"] + [f"- &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 40)]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\nroot: {predict: *a39}\n", encoding="utf-8")
    (tmp_path / "big.yaml").write_text("# " + "x" * 1_000_001 + "\n", encoding="utf-8")
    (tmp_path / "escape.yaml").write_text(
        'root: {predict: "q -> a", "\\e]0;pwned\\a\\e[2J": 1}\n', encoding="utf-8"
    )
    (tmp_path / "nan.yaml").write_text(
        "inputs: [xs]\nroot: {type: foreach, over: xs, stage: {predict: 'x -> y'}, timeout: .nan}\n", "utf-8"
    )
    (tmp_path / "collect.yaml").write_text(
        "inputs: [xs]\nroot: {type: foreach, over: xs, collect: {}, stage: {predict: 'x -> y'}}\n", "utf-8"
    )
    (tmp_path / "name.yaml").write_text("name: {a: 1}\ninputs: [q]\nroot: {predict: 'q -> a'}\n", "utf-8")
    (tmp_path / "latin1.json").write_bytes(b'{"text": "caf\xe9"}')
    (tmp_path / "outdir").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    (tmp_path / "far.yaml").write_text("inputs: [query]\nroot: {bm25: ../corpus.jsonl}\n", "utf-8")
    return tmp_path


RUN = ["run", "ok.yaml", "--allow-module", "cliadv"]
CASES: list[tuple[str, list[str], str]] = [
    ("deep-yaml", ["validate", "deep.yaml"], "nested more than"),
    ("alias-bomb", ["validate", "bomb.yaml"], "alias"),
    ("file-too-large", ["validate", "big.yaml"], "STAGEFLOW_MAX_SPEC_BYTES"),
    (
        "module-fails-to-import",
        ["validate", "broken.yaml", "--allow-module", "clibroken"],
        "broken at import",
    ),
    ("bad-allow-module", ["validate", "ok.yaml", "--allow-module", "..x"], "not a module name"),
    ("empty-allow-module", ["validate", "ok.yaml", "--allow-module", ""], "not a module name"),
    ("nan-timeout", ["validate", "nan.yaml"], "timeout"),
    ("name-not-a-string", ["validate", "name.yaml"], "'name'"),
    ("collect-nothing", ["validate", "collect.yaml"], "collect is empty"),
    ("path-outside-folder", ["validate", "far.yaml"], "--allow-path"),
    ("input-surrogate", [*RUN, "--input", '{"text": "\udcff"}'], "UTF-8"),
    ("input-json-escaped-surrogate", [*RUN, "--input", '{"text": "\\ud800"}'], "UTF-8"),
    ("input-file-latin1", [*RUN, "--input-file", "latin1.json"], "UTF-8"),
    ("input-too-deep", [*RUN, "--input", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"], "nested"),
    ("input-infinity", [*RUN, "--input", '{"text": 1e999}'], "Infinity"),
    ("input-nan", [*RUN, "--input", '{"text": NaN}'], "NaN"),
    ("output-is-a-directory", [*RUN, "--input", '{"text": "x"}', "--output", "outdir"], "directory"),
    ("demo-question-surrogate", ["demo", "--fake", "caf\udce9?"], "UTF-8"),
]


@pytest.mark.parametrize(("argv", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], files: Path, argv: list[str], needle: str
) -> None:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    assert "\n\n" not in err.strip()
    assert needle in " ".join(err.split()), err
    assert not list(files.glob(".outdir*"))


def test_control_characters_from_a_file_never_reach_the_terminal(
    capsys: pytest.CaptureFixture[str], files: Path
) -> None:
    code = main(["validate", "escape.yaml"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "\x1b" not in err
    assert "\x07" not in err
    assert "\\x1b]0;pwned" in err


@pytest.mark.parametrize(
    ("stdin", "needle"),
    [
        (lambda: io.TextIOWrapper(io.BytesIO(b'{"text": "\xff"}'), "utf-8", "surrogateescape"), "UTF-8"),
        (lambda: io.TextIOWrapper(io.BytesIO(b'{"text": "\xff"}'), "utf-8", "strict"), "UTF-8"),
    ],
    ids=["surrogateescape-stdin", "strict-stdin"],
)
def test_input_from_stdin_must_be_utf8(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    files: Path,
    stdin: Callable[[], io.TextIOWrapper],
    needle: str,
) -> None:
    monkeypatch.setattr(sys, "stdin", stdin())
    code = main([*RUN, "--input-file", "-"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert needle in err


def test_a_good_run_still_works(capsys: pytest.CaptureFixture[str], files: Path) -> None:
    code = main([*RUN, "--input", '{"text": "caf\u00e9"}', "--output", "outdir/result.json"])
    assert code == 0, capsys.readouterr().err
    assert (files / "outdir" / "result.json").read_text(encoding="utf-8").count("CAF\u00c9") == 1


def test_a_stage_calling_sys_exit_is_a_failed_run_not_a_success(
    capsys: pytest.CaptureFixture[str], files: Path
) -> None:
    (files / "leave.yaml").write_text(
        "inputs: [text]\nroot: {component: 'cliadv:leave', writes: [shout]}\n", encoding="utf-8"
    )
    code = main(["run", "leave.yaml", "--allow-module", "cliadv", "--input", '{"text": "x"}'])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert "sys.exit(0)" in err
