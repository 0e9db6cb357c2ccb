"""The multi-hop demo on the real embedded model (SmolLM2-135M on llama.cpp).

Run with ``-m integration``; about a minute on a 2-core machine. They check that every stage
produces something (non-empty sub-questions, facts and answer), not that the 135M model is right.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from stageflow.apps.multihop import load_devset
from stageflow.apps.multihop.demo import DEFAULT_DEMOS, default_question, run_demo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_lm(stageflow_local_lm: Any) -> Any:
    return stageflow_local_lm


def _check(result) -> None:
    assert result.sub_questions
    assert all(isinstance(s, str) and s.strip() for s in result.sub_questions)
    assert len(result.facts) == len(result.sub_questions)
    assert all(isinstance(f, str) and f.strip() for f in result.facts)
    assert result.answer.strip()
    assert {row["stage"] for row in result.stages} >= {"decompose", "retrieve", "extract fact", "synthesize"}


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "standard"])
def test_demo_answers_a_dev_question_with_every_stage_filled(local_lm, compact: bool) -> None:
    example = load_devset()[1]
    result = run_demo(example.question, lm=local_lm, compact=compact)
    _check(result)
    assert result.expected == example.answer


def test_cli_demo_json_on_the_embedded_model() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("STAGEFLOW_LM", "STAGEFLOW_MODEL_PATH")}
    proc = subprocess.run(
        [sys.executable, "-m", "stageflow.cli", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if proc.returncode == 2 and "not installed" in proc.stderr:
        pytest.skip(proc.stderr)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["question"] == default_question()
    assert data["prompt_style"] == "compact"
    assert data["demos"] == DEFAULT_DEMOS
    assert data["sub_questions"]
    assert all(s.strip() for s in data["sub_questions"])
    assert data["facts"]
    assert all(f.strip() for f in data["facts"])
    assert data["answer"].strip()
    assert proc.stderr == ""  # no progress line when stderr is not a terminal
