"""The ``stageflow`` command: exit codes, messages for bad input, and a cheap ``--help``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stageflow.cli import main

COMPONENTS = """
def shout(text):
    return {"shout": text.upper()}

def explode(text):
    raise ValueError("component exploded")

def score(text):
    return {"shout": float("nan")}

def forgets(text):
    return {"other": text}

def split(text):
    return {"words": text + "!"}  # (a string where a list belongs: the model gave the wrong shape)

def renamed(text):
    return {"stuff": text + "!"}
"""


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def components(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "clicomponents.py").write_text(COMPONENTS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "clicomponents", raising=False)
    return "clicomponents"


def pipeline_file(tmp_path: Path, component: str = "shout") -> Path:
    path = tmp_path / "shout.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            inputs: [text]
            root:
              type: pipeline
              stages:
              - component: 'clicomponents:{component}'
                writes: [shout]
            """
        ),
        encoding="utf-8",
    )
    return path


# -- --help is cheap ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["run", "--help"], ["--version"]])
def test_help_does_not_import_dspy_or_llama_cpp(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from stageflow.cli import main\n"
        f"rc = main({argv!r})\n"
        "heavy = ('dspy', 'llama_cpp', 'litellm', 'bm25s')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print('RC', rc, 'HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "RC 0 HEAVY []"


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert all(word in out for word in ("demo", "run", "validate"))
    code, out, _ = run_cli(capsys)
    assert code == 0
    assert "usage: stageflow" in out


# -- demo on the fake LM --------------------------------------------------------------------------


def test_demo_fake_prints_every_step(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "demo", "--fake")
    assert code == 0, err
    assert err == ""  # no progress line: stderr is not a terminal
    for section in ("question", "passages", "hop 2", "candidates", "answer", "expected", "retrieve"):
        assert section in out
    assert "telephone" in out
    assert "architecture linked-choose" in out


def test_demo_fake_decompose_prints_every_step(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "demo", "--fake", "--architecture", "decompose")
    assert code == 0, err
    for section in ("question", "sub-questions", "facts", "answer", "expected", "decompose", "extract fact"):
        assert section in out


def test_demo_fake_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "demo", "--fake", "--json", "--demos", "2", "Where was Jane Austen born?")
    assert code == 0
    data = json.loads(out)
    assert data["architecture"] == "linked-choose"
    assert data["demos"] == 2
    assert data["question"] == "Where was Jane Austen born?"
    assert any(p.startswith("Jane Austen: ") for p in data["passages"])
    assert data["answer"] == data["candidates"][0]  # the fake LM picks the first candidate
    assert data["expected"] is None
    assert data["lm_calls"] == 1
    assert [row["stage"] for row in data["stages"]] == ["retrieve", "candidates", "answer"]
    assert all(row["seconds"] >= 0 for row in data["stages"])


def test_demo_fake_json_decompose(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("demo", "--fake", "--json", "-a", "decompose", "--demos", "2", "Where was Jane Austen born?")
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    data = json.loads(out)
    assert data["demos"] == 2
    assert data["sub_questions"] == ["Where was Jane Austen born?"]
    assert "Steventon" in data["facts"][0]
    assert data["answer"]
    assert next(row["stage"] for row in data["stages"]) == "decompose"


def test_demo_control_needs_no_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAGEFLOW_MODEL_PATH", "/nonexistent/model.gguf")  # never opened
    code, out, err = run_cli(capsys, "demo", "--json", "-a", "linked-first")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "no model"
    assert data["lm_calls"] == 0
    assert data["answer"] == data["candidates"][0]


def test_demo_unknown_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "demo", "--fake", "-a", "telepathy")
    _assert_usage_error(code, out, err, "unknown architecture 'telepathy'", "linked-choose")


# -- bad input: exit 2 and one readable paragraph -----------------------------------------------------


def _assert_usage_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    assert err.count("\n\n") == 0
    for needle in needles:
        assert needle in " ".join(err.split()), err


def test_missing_model_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    missing = tmp_path / "nope.gguf"
    code, out, err = run_cli(capsys, "demo", "--lm", f"local:{missing}")
    _assert_usage_error(code, out, err, "Model file not found", str(missing))


def test_missing_model_file_from_the_environment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("STAGEFLOW_MODEL_PATH", str(tmp_path / "gone.gguf"))
    code, out, err = run_cli(capsys, "demo")
    _assert_usage_error(code, out, err, "Model file not found", "STAGEFLOW_MODEL_PATH")


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"not a model at all", "is not a GGUF model"), (b"GGUF\x03\x00\x00\x00truncated", "could not load")],
    ids=["wrong-magic", "truncated"],
)
def test_corrupt_gguf(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, needle: str
) -> None:
    pytest.importorskip("llama_cpp")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    code, out, err = run_cli(capsys, "demo", "--lm", f"local:{bad}")
    _assert_usage_error(code, out, err, needle)


def test_empty_corpus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "demo", "--fake", "--corpus", str(empty))
    _assert_usage_error(code, out, err, "contains no documents")


def test_invalid_yaml(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("root:\n  type: pipeline\n  stages:\n  - predict: 'q -> a'\n - oops\n", encoding="utf-8")
    for command in ("validate", "run"):
        extra = ["--input", "{}"] if command == "run" else []
        code, out, err = run_cli(capsys, command, str(path), *extra)
        _assert_usage_error(code, out, err, f"{path}, line 5", "invalid YAML")


def test_unknown_component(capsys: pytest.CaptureFixture[str], tmp_path: Path, components: str) -> None:
    path = pipeline_file(tmp_path, component="shuot")
    code, out, err = run_cli(capsys, "validate", str(path), "--allow-module", components)
    _assert_usage_error(code, out, err, "line 5", "unknown component 'shuot'", "shout")


def test_component_module_not_allowed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, components: str
) -> None:
    code, out, err = run_cli(capsys, "run", str(pipeline_file(tmp_path)), "--input", '{"text": "hi"}')
    _assert_usage_error(code, out, err, "not in the allowed modules", "--allow-module clicomponents")
    assert components not in sys.modules


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--input", "{bad"], "not valid JSON"),
        (["--input", "[1, 2]"], "must be a JSON object"),
        (["--input", "{}"], "needs input 'text'"),
        (["--input-file", "/nonexistent/input.json"], "cannot read the input file"),
        (["--input", "{}", "--output", "/nonexistent/dir/out.json"], "does not exist"),
    ],
)
def test_bad_run_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, components: str, argv: list[str], needle: str
) -> None:
    path = pipeline_file(tmp_path)
    code, out, err = run_cli(capsys, "run", str(path), "--allow-module", components, *argv)
    _assert_usage_error(code, out, err, needle)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "x.yaml"],
        ["frobnicate"],
        ["demo", "-k", "many"],
        ["run", "x.yaml", "--input", "{}", "--input-file", "f"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "usage:" in err


def test_validate_ok_and_contract_failure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, components: str
) -> None:
    path = pipeline_file(tmp_path)
    code, out, err = run_cli(capsys, "validate", str(path), "--allow-module", components)
    assert code == 0, err
    assert "valid" in out
    assert "'shout'" in out
    code, out, err = run_cli(
        capsys, "validate", str(path), "--allow-module", components, "--inputs", "question"
    )
    _assert_usage_error(code, out, err, "line 5", "needs input 'text'")


def test_validate_without_declared_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("root: {predict: 'question -> answer'}\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "validate", str(path))
    _assert_usage_error(code, out, err, "declares no 'inputs'", "--inputs question")
    code, out, _ = run_cli(capsys, "validate", str(path), "--inputs", "question")
    assert code == 0
    assert "1 predictor(s): stages[0]" in out


# -- run: success, failure (exit 1), nothing written half-way -------------------------------------------


def test_run_prints_the_result_and_writes_output(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, components: str
) -> None:
    path = pipeline_file(tmp_path)
    code, out, err = run_cli(
        capsys, "run", str(path), "--allow-module", components, "--input", '{"text": "hi"}'
    )
    assert code == 0, err
    assert json.loads(out) == {"text": "hi", "shout": "HI"}
    inputs = tmp_path / "in.json"
    inputs.write_text('{"text": "yo"}', encoding="utf-8")
    result = tmp_path / "out.json"
    code, out, _ = run_cli(
        capsys,
        "run",
        str(path),
        "--allow-module",
        components,
        "--input-file",
        str(inputs),
        "--output",
        str(result),
    )
    assert (code, out) == (0, "")
    assert json.loads(result.read_text(encoding="utf-8"))["shout"] == "YO"
    short = tmp_path / "short.json"  # -o, as for batch, graph and report
    code, out, _ = run_cli(
        capsys, "run", str(path), "--allow-module", components, "--input-file", str(inputs), "-o", str(short)
    )
    assert (code, out) == (0, "")
    assert json.loads(short.read_text(encoding="utf-8"))["shout"] == "YO"


def test_a_result_holding_nan_is_written_as_strict_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, components: str
) -> None:
    # Second attack round: a bare NaN was written (exit 0), which strict JSON parsers refuse.
    path = pipeline_file(tmp_path, component="score")
    result = tmp_path / "out.json"
    argv = ["run", str(path), "--allow-module", components, "--input", '{"text": "hi"}', "-o", str(result)]
    code, _, _ = run_cli(capsys, *argv)
    assert code == 0

    def refuse(constant: str) -> None:
        raise ValueError(f"non-JSON constant {constant}")

    assert json.loads(result.read_text(encoding="utf-8"), parse_constant=refuse)["shout"] == "NaN"


def test_a_failing_run_exits_1_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, components: str
) -> None:
    path = pipeline_file(tmp_path, component="explode")
    result = tmp_path / "out.json"
    argv = [
        "run",
        str(path),
        "--allow-module",
        components,
        "--input",
        '{"text": "hi"}',
        "--output",
        str(result),
    ]
    code, _out, err = run_cli(capsys, *argv)
    assert code == 1
    flat = " ".join(err.split())
    assert "run failed" in flat
    assert "component exploded" in flat
    assert "--debug" in flat
    assert "Traceback" not in err
    assert not result.exists()
    assert not list(tmp_path.glob(".out.json*"))
    code, _, err = run_cli(capsys, *argv, "--debug")
    assert code == 1
    assert "Traceback" in err


def test_run_as_a_module_subprocess(tmp_path: Path, components: str) -> None:
    path = pipeline_file(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stageflow.cli",
            "run",
            str(path),
            "--allow-module",
            components,
            "--input",
            '{"text": "a"}',
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shout"] == "A"


def test_console_script_is_installed() -> None:
    assert importlib.util.find_spec("stageflow.cli") is not None
    script = Path(sys.executable).with_name("stageflow")
    if not script.exists():
        pytest.skip("the stageflow console script is not installed in this environment")
    proc = subprocess.run(
        [str(script), "validate", "/nonexistent.yaml"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "pipeline file not found" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "needle"), [(["-k", "0"], "-k must be at least 1"), (["--demos", "-1"], "--demos")]
)
def test_bad_demo_numbers(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    code, out, err = run_cli(capsys, "demo", "--fake", *argv)
    _assert_usage_error(code, out, err, needle)


def test_piping_into_a_closed_reader_is_not_an_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        f"{sys.executable} -m stageflow.cli demo --fake | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.startswith("stageflow demo")
    assert "Error" not in proc.stderr


def test_allow_path_lets_a_file_read_a_sibling_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAGEFLOW_BM25_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.jsonl").write_text(
        '{"title": "Dune", "text": "A novel."}\n', encoding="utf-8"
    )
    (tmp_path / "pipelines").mkdir()
    path = tmp_path / "pipelines" / "p.yaml"
    path.write_text("inputs: [query]\nroot: {bm25: ../data/corpus.jsonl, k: 1}\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "validate", str(path))
    _assert_usage_error(code, out, err, "goes up with '..'", "--allow-path")
    code, out, err = run_cli(
        capsys, "run", str(path), "--allow-path", str(tmp_path / "data"), "--input", '{"query": "Dune"}'
    )
    assert code == 0, err
    assert json.loads(out)["passages"] == ["Dune: A novel."]


# -- an output that cannot be written is refused before any work -------------------------------------


def _output_commands(tmp_path: Path, components: str) -> dict[str, list[str]]:
    """Each command that writes a file, with ``OUT`` where its output path goes."""
    import stageflow

    pipe = pipeline_file(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "a", "text": "hi"}\n', encoding="utf-8")
    trace = tmp_path / "trace.json"
    with stageflow.trace() as tracer:
        stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": len(text)}, writes=["n"])])(
            text="hi"
        )
    tracer.save(trace)
    allow = ["--allow-module", components]
    return {
        "graph": ["graph", str(pipe), *allow, "-o", "OUT"],
        "graph --format dot": ["graph", str(pipe), "--format", "dot", *allow, "-o", "OUT"],
        "report": ["report", str(trace), "-o", "OUT"],
        "run": ["run", str(pipe), *allow, "--input", '{"text": "hi"}', "--output", "OUT"],
        "batch -o": ["batch", str(pipe), str(data), *allow, "--quiet", "-o", "OUT"],
        "batch --journal": [
            "batch",
            str(pipe),
            str(data),
            *allow,
            "--quiet",
            "-o",
            str(tmp_path / "o"),
            "--journal",
            "OUT",
        ],
    }


@pytest.mark.parametrize(
    "command", ["graph", "graph --format dot", "report", "run", "batch -o", "batch --journal"]
)
@pytest.mark.parametrize("where", ["an existing directory", "a missing directory"])
def test_an_output_that_is_a_directory_or_has_no_directory_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, components: str, command: str, where: str
) -> None:
    argv = _output_commands(tmp_path, components)[command]
    capsys.readouterr()
    target = tmp_path / "outdir" if where == "an existing directory" else tmp_path / "missing" / "out.txt"
    if where == "an existing directory":
        target.mkdir()
    code, out, err = run_cli(capsys, *[str(target) if a == "OUT" else a for a in argv])
    assert code == 2, err
    assert out == ""
    said = " ".join(err.split())  # the message is wrapped at 100 columns
    assert str(target) in said
    assert ("is a directory" if where == "an existing directory" else "does not exist") in said
    assert "Traceback" not in err
    assert "run failed" not in err
    assert list(tmp_path.glob("outdir/*")) == []  # nothing left behind in it
    assert not (tmp_path / "o").exists()  # no work was done


def test_a_stage_missing_its_declared_output_is_a_run_failure_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, components: str
) -> None:
    path = pipeline_file(tmp_path, "forgets")
    argv = ["run", str(path), "--allow-module", components, "--input", '{"text": "hi"}']
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert "run failed" in err
    assert "declares output 'shout'" in err


def test_a_field_an_undeclared_stage_did_not_produce_is_a_run_failure_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, components: str
) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            inputs: [text]
            root:
              type: pipeline
              stages:
              - component: '{components}:forgets'
              - component: '{components}:shout'
                inputs: {{text: shout_me}}
            """
        ),
        encoding="utf-8",
    )
    argv = ["run", str(path), "--allow-module", components, "--input", '{"text": "hi"}']
    code, _, err = run_cli(capsys, *argv)
    assert code == 1, err
    assert "run failed" in err
    assert "needs input 'shout_me'" in err
    # A pipeline input the caller did not pass is still bad input (exit 2).
    code, _, err = run_cli(capsys, "run", str(path), "--allow-module", components, "--input", "{}")
    assert code == 2, err


def test_a_foreach_over_a_stage_output_that_is_no_list_is_a_run_failure_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, components: str
) -> None:
    # (a known limit until session 32: exit 2, "invalid input", for the model's wrong shape)
    path = tmp_path / "each.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            inputs: [text]
            root:
              type: pipeline
              stages:
              - component: '{components}:split'
              - type: foreach
                over: words
                collect: {{shout: shouts}}
                stage:
                  component: '{components}:shout'
                  inputs: {{text: word}}
            """
        ),
        encoding="utf-8",
    )
    code, _, err = run_cli(
        capsys, "run", str(path), "--allow-module", components, "--input", '{"text": "hi"}'
    )
    assert code == 1, err
    assert "run failed" in err
    assert "expected a list in 'words'" in err
    # (helper 90: the same with the field renamed onto 'words' by `outputs:` gave exit 2)
    path.write_text(
        path.read_text(encoding="utf-8").replace(
            f"- component: '{components}:split'",
            f"- component: '{components}:renamed'\n    outputs: {{stuff: words}}",
        ),
        encoding="utf-8",
    )
    code, _, err = run_cli(
        capsys, "run", str(path), "--allow-module", components, "--input", '{"text": "hi"}'
    )
    assert code == 1, err
    # The caller's own value that is no list is still bad input (exit 2).
    direct = tmp_path / "direct.yaml"
    direct.write_text(
        textwrap.dedent(
            f"""\
            inputs: [words]
            root:
              type: foreach
              over: words
              collect: {{shout: shouts}}
              stage:
                component: '{components}:shout'
                inputs: {{text: word}}
            """
        ),
        encoding="utf-8",
    )
    code, _, err = run_cli(
        capsys, "run", str(direct), "--allow-module", components, "--input", '{"words": "hi"}'
    )
    assert code == 2, err
    assert "invalid input" in err


def test_a_nan_input_gets_one_fix_and_a_declared_input_not_passed_is_named_as_such(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # (helper 91: two "Fix:" lines for NaN, the second about long numbers; and "add 'question' to the
    # file's inputs" for a file that declares it)
    path = tmp_path / "qa.yaml"
    path.write_text(
        "version: 1\ninputs: [question]\nnodes:\n  root:\n    type: pipeline\n    stages:\n"
        "    - predict: 'question -> answer'\n",
        encoding="utf-8",
    )
    code, _, err = run_cli(capsys, "run", str(path), "--input", '{"question": NaN}')
    said = " ".join(err.split())
    assert code == 2
    assert said.count("Fix:") == 1
    assert "not finite" in said
    assert "long numbers" not in said
    code, _, err = run_cli(capsys, "run", str(path), "--input", '{"q": "x"}')
    said = " ".join(err.split())
    assert code == 2
    assert "pass 'question' when running the file" in said
    assert "add 'question' to the file's" not in said
