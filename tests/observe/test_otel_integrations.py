"""stageflow's spans beside other instrumentation: no provider, DSPy callbacks, OpenInference, MLflow."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
from observe_kit import ROOT, require
from otel_kit import is_lm_span, is_run_span, parent_of, stage_spans

import stageflow
from stageflow.engine.hooks import global_hooks
from stageflow.observe import otel
from stageflow.testing import FakeLM, call

HERE = Path(__file__).resolve().parent


def _program() -> stageflow.SequentialPipeline:
    return stageflow.SequentialPipeline(
        [
            dspy.Predict("question -> answer"),
            stageflow.ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts"),
        ]
    )


def _lm() -> FakeLM:
    return FakeLM({"answer": "A", "fact": "F"})


def test_no_tracer_provider_installs_nothing_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.fail("a test left a global tracer provider behind")
    before = global_hooks()
    with caplog.at_level(logging.WARNING, logger="stageflow"):
        assert otel.instrument() is None
    assert global_hooks() == before
    assert not otel.is_instrumented()
    assert "no tracer provider" in caplog.text
    assert "set_tracer_provider" in caplog.text
    # The warning tells the user what to call: every stageflow function it names exists, and is the
    # one that was just called.
    named = set(re.findall(r"\bstageflow(?:\.\w+)+(?=\()", caplog.text))
    assert named == {"stageflow.instrument_otel"}
    for dotted in named:
        assert _resolve(dotted) is otel.instrument
    assert not re.search(r"(?<![.\w])instrument\(", caplog.text)  # no bare name to guess the module of


def _resolve(dotted: str) -> object:
    obj: object = importlib.import_module(dotted.split(".")[0])
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


@pytest.mark.integration
async def test_an_lm_callback_in_dspy_settings_means_no_stageflow_lm_spans(mode: str, otel_sdk: Any) -> None:
    from dspy.utils.callback import BaseCallback

    class LogLMCalls(BaseCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.started = 0

        def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            self.started += 1

    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider)
    logger_cb = LogLMCalls()
    with dspy.context(lm=_lm(), callbacks=[logger_cb]):
        found = otel.other_lm_instrumentation() or ""
        assert found.startswith(f"DSPy callback {__name__}.")
        assert found.endswith(".LogLMCalls")
        await call(_program(), mode, question="q", sub_questions=["a", "b"])
    spans = list(exporter.get_finished_spans())
    assert logger_cb.started == 3
    assert not [s for s in spans if is_lm_span(s)]
    assert next(s for s in spans if is_run_span(s)).attributes["stageflow.lm_spans"] == "other"
    # lm_spans=True makes them anyway.
    exporter.clear()
    otel.instrument(tracer_provider=provider, lm_spans=True)
    with dspy.context(lm=_lm(), callbacks=[logger_cb]):
        await call(_program(), mode, question="q", sub_questions=["a", "b"])
    assert len([s for s in exporter.get_finished_spans() if is_lm_span(s)]) == 3


@pytest.mark.integration
def test_stageflows_callbacks_are_only_there_during_a_call(otel_sdk: Any) -> None:
    provider, _ = otel_sdk
    otel.instrument(tracer_provider=provider)
    seen: list[int] = []
    program = stageflow.SequentialPipeline(
        [stageflow.stage(lambda x: seen.append(len(dspy.settings.callbacks)) or {"y": x}, writes=["y"])]
    )
    program(x=1)
    assert seen == [1]
    assert dspy.settings.callbacks == []


@contextlib.contextmanager
def _dspy_classes_restored() -> Iterator[None]:
    """Put DSPy's class attributes back afterwards: OpenInference's ``uninstrument()`` leaves
    ``LM.__call__``, ``Module.__call__``, ``Adapter.__call__``... without DSPy's callback decorator
    (seen with openinference-instrumentation-dspy 0.1.48), which would switch DSPy callbacks off for
    the rest of the test session."""
    saved: dict[type, dict[str, Any]] = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "dspy" or module is None:
            continue
        for cls in list(vars(module).values()):
            if inspect.isclass(cls) and cls.__module__ == name:
                saved[cls] = dict(vars(cls))
    try:
        yield
    finally:
        for cls, before in saved.items():
            for k in [k for k in vars(cls) if k not in before]:
                delattr(cls, k)
            for k, v in before.items():
                if vars(cls).get(k) is not v:
                    setattr(cls, k, v)


@pytest.mark.integration
async def test_openinference_dspy_spans_nest_under_stage_spans(mode: str, otel_sdk: Any) -> None:
    if importlib.util.find_spec("openinference.instrumentation.dspy") is None:
        require(False, "openinference-instrumentation-dspy (pip install 'stageflow[dev]')")
    from openinference.instrumentation.dspy import DSPyInstrumentor

    provider, exporter = otel_sdk
    instrumentor = DSPyInstrumentor()
    with _dspy_classes_restored():
        instrumentor.instrument(tracer_provider=provider)
        try:
            assert (otel.other_lm_instrumentation() or "").startswith("LM.__call__ wrapped by")
            otel.instrument(tracer_provider=provider)
            with dspy.context(lm=_lm()):
                await call(_program(), mode, question="q", sub_questions=["a", "b", "c"])
        finally:
            instrumentor.uninstrument()
    assert otel.other_lm_instrumentation() is None
    spans = list(exporter.get_finished_spans())
    assert len({s.context.trace_id for s in spans}) == 1
    stages = stage_spans(spans)
    assert not [s for s in spans if is_lm_span(s)]  # OpenInference's LLM spans only, counted once
    oi_llm = [s for s in spans if s.attributes.get("openinference.span.kind") == "LLM"]
    assert len(oi_llm) == 4
    # Each of OpenInference's LM spans sits under the stage that made the call.
    owners = set()
    for span in oi_llm:
        node = parent_of(span, spans)
        while "stageflow.stage.type" not in node.attributes:
            node = parent_of(node, spans)
        owners.add(node.attributes["stageflow.stage.path"])
    assert owners == {"stages[0]", "stages[1].stage[0]", "stages[1].stage[1]", "stages[1].stage[2]"}
    assert set(stages) >= owners


@pytest.mark.integration
def test_mlflow_autolog_and_stageflow_spans_make_one_nested_tree(tmp_path: Path) -> None:
    if importlib.util.find_spec("mlflow") is None:
        require(False, "MLflow (pip install 'stageflow[dev]': mlflow-skinny, sqlalchemy, alembic, pandas)")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
        # MLflow shares the global OpenTelemetry provider and context (its "unified" mode), so its
        # DSPy spans and stageflow's spans nest in one trace.
        "MLFLOW_USE_DEFAULT_TRACER_PROVIDER": "false",
        "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false",
    }
    done = subprocess.run(
        [sys.executable, str(HERE / "mlflow_scenario.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in runs] == ["sync", "async"]
    for r in runs:
        spans = r["spans"]
        by_id = {s["id"]: s for s in spans}
        assert len({s["trace"] for s in spans}) == 1, r["mode"]
        roots = [s for s in spans if s["parent"] not in by_id]
        assert len(roots) == 1
        run = next(s for s in spans if s["name"] == "invoke_workflow SequentialPipeline")
        assert by_id[run["parent"]] is roots[0]  # MLflow's span for the pipeline module's call
        stages = {s["path"]: s for s in spans if s["path"] is not None}
        items = [f"stages[1].stage[{i}]" for i in range(4)]
        assert set(stages) == {"stages[0]", "stages[1]", "stages[2]", *items}
        for path in ("stages[0]", "stages[1]", "stages[2]"):
            assert stages[path]["parent"] == run["id"]
        predicts = [s for s in spans if s["name"] == "Predict.forward"]
        lm_calls = [s for s in spans if s["name"] == "FakeLM.__call__"]
        assert len(predicts) == len(lm_calls) == r["lm_calls"] == 5
        # MLflow's DSPy spans hang under the stage span that ran them; its LM spans under them.
        assert sorted(by_id[p["parent"]]["path"] for p in predicts) == sorted(["stages[0]", *items])
        assert all(by_id[c["parent"]]["name"] == "Predict.forward" for c in lm_calls)
        # stageflow made no LM spans of its own: MLflow's callback was detected.
        assert not [s for s in spans if s["name"].startswith("chat ")]
