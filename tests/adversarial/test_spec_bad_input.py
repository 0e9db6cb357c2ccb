"""Issue 9: every bad pipeline file is a located ``SpecError`` — never a RecursionError, a hang or a crash.

Deep nesting (in the YAML/JSON text or through chains of named nodes), alias bombs, oversized files
and allowed modules that fail to import in any way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from stageflow.spec import MAX_DEPTH, MAX_SPEC_BYTES, SpecError, load_pipeline


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("flow.yaml", "root: " + "[" * 5000 + "]" * 5000 + "\n"),
        ("block.yaml", "root:\n" + "".join(" " * i + "- \n" for i in range(1, 400))),
        ("mapping.yaml", "root: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"),
        ("deep.json", '{"root": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ("shallow-for-json.json", '{"root": ' + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "}"),
    ],
)
def test_files_nested_too_deep_are_refused(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(SpecError) as info:
        load_pipeline(_write(tmp_path, text, name))
    assert info.value.code == "too_deep", str(info.value)
    assert f"{MAX_DEPTH} levels" in str(info.value)


def test_chains_of_named_nodes_are_capped(tmp_path: Path) -> None:
    n = 3000
    lines = ["nodes:", "  root: {type: pipeline, stages: [n0]}"]
    lines += [f"  n{i}: {{type: pipeline, stages: [n{i + 1}]}}" for i in range(n)]
    lines.append(f"  n{n}: {{predict: 'q -> a'}}")
    with pytest.raises(SpecError) as info:
        load_pipeline(_write(tmp_path, "\n".join(lines) + "\n"))
    assert info.value.code == "too_deep", str(info.value)
    assert str(info.value.key).startswith("nodes.n")


def test_a_moderately_deep_tree_still_loads(tmp_path: Path) -> None:
    depth = 20
    lines = ["inputs: [q]", "nodes:", "  root: {type: pipeline, stages: [n0]}"]
    lines += [f"  n{i}: {{type: pipeline, stages: [n{i + 1}]}}" for i in range(depth)]
    lines.append(f"  n{depth}: {{predict: 'q -> a'}}")
    assert load_pipeline(_write(tmp_path, "\n".join(lines) + "\n")).check(["q"]) == ("a", "q")


def test_alias_bombs_are_refused_before_anything_expands_them(tmp_path: Path) -> None:
    # 21 lines of text that expand to 2**22 values: an error message that shows the value, a
    # deep copy or a JSON dump would take seconds and hundreds of MB (and 2**40 with 40 lines)
    lines = ["description:", "- &a0 [x, x]"] + [f"- &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 21)]
    text = "\n".join(lines) + "\nroot: {predict: *a20}\n"
    with pytest.raises(SpecError) as info:
        load_pipeline(_write(tmp_path, text))
    assert info.value.code == "too_large", str(info.value)
    assert "alias" in str(info.value)


def test_a_few_aliases_are_fine(tmp_path: Path) -> None:
    text = (
        "inputs: [q]\nnodes:\n  root:\n    type: parallel\n    groups:\n"
        "    - {predict: 'q -> a'}\n    - {predict: 'q -> b'}\n    merger: &m {on_clash: list}\n"
    )
    assert load_pipeline(_write(tmp_path, text)).check(["q"]) == ("a", "b", "q")


def test_pipeline_files_have_a_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_SPEC_BYTES == 1_000_000
    big = "# " + "x" * MAX_SPEC_BYTES + "\nroot: {predict: 'q -> a'}\n"
    path = _write(tmp_path, big)
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert info.value.code == "file_too_large"
    assert "STAGEFLOW_MAX_SPEC_BYTES" in str(info.value)
    assert load_pipeline(path, max_bytes=2 * MAX_SPEC_BYTES).check(["q"]) == ("a", "q")
    monkeypatch.setenv("STAGEFLOW_MAX_SPEC_BYTES", str(2 * MAX_SPEC_BYTES))
    assert load_pipeline(path).check(["q"]) == ("a", "q")
    monkeypatch.setenv("STAGEFLOW_MAX_SPEC_BYTES", "lots")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert info.value.code == "bad_setting"


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("raise RuntimeError('boom at import')", "RuntimeError: boom at import"),
        ("def f(:\n    pass", "SyntaxError"),
        ("import sys\nsys.exit(0)", "SystemExit"),
        ("import a_package_that_is_not_installed_anywhere", "ModuleNotFoundError"),
        ("x = 1 / 0", "ZeroDivisionError"),
    ],
    ids=["runtime-error", "syntax-error", "sys-exit", "missing-dependency", "zero-division"],
)
def test_an_allowed_module_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, needle: str
) -> None:
    (tmp_path / "brokenmod.py").write_text(source + "\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "brokenmod", raising=False)
    path = _write(tmp_path, "inputs: [text]\nroot: {component: 'brokenmod:f'}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(path, allow_modules=["brokenmod"])
    assert info.value.code == "component_import_failed"
    assert needle in str(info.value)
    assert info.value.line == 2
