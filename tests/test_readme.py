"""The README's Python snippets run, and print exactly the output shown under them.

Each ```python block is executed in order in one namespace per block; when a ```text block
follows it directly, the printed output must match it. Regenerate the outputs after an intended
change with ``python tests/test_readme.py --update``.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```python\n(.*?)```\n(?:\n?```text\n(.*?)```\n)?", re.S)


def _snippets() -> list[tuple[int, str, str | None]]:
    text = README.read_text(encoding="utf-8")
    out = []
    for m in BLOCK.finditer(text):
        line = text[: m.start()].count("\n") + 1
        out.append((line, m.group(1), m.group(2)))
    return out


def _run(code: str) -> str:
    from stageflow.testing import isolated_dspy

    buf = io.StringIO()
    with isolated_dspy(), contextlib.redirect_stdout(buf):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    return buf.getvalue()


SNIPPETS = _snippets()


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 6


@pytest.mark.parametrize(("line", "code", "expected"), SNIPPETS, ids=[f"line{s[0]}" for s in SNIPPETS])
def test_readme_snippet(line: int, code: str, expected: str | None) -> None:
    printed = _run(code)
    if expected is not None:
        assert printed == expected, f"README snippet at line {line} printed:\n{printed}"


def _update() -> None:
    text = README.read_text(encoding="utf-8")

    def fill(m: re.Match[str]) -> str:
        code = m.group(1)
        printed = _run(code)
        if not printed:
            return f"```python\n{code}```\n"
        return f"```python\n{code}```\n\n```text\n{printed}```\n"

    README.write_text(BLOCK.sub(fill, text), encoding="utf-8")


YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


def test_readme_pipeline_files_are_valid(tmp_path: Path) -> None:
    import stageflow

    blocks = YAML_BLOCK.findall(README.read_text(encoding="utf-8"))
    assert blocks, "the README shows a pipeline file"
    for i, text in enumerate(blocks):
        path = tmp_path / f"block{i}.yaml"
        path.write_text(text, encoding="utf-8")
        pipeline = stageflow.load_pipeline(path)
        assert "answer" in pipeline.check(["question"])


if __name__ == "__main__" and "--update" in sys.argv:
    _update()
