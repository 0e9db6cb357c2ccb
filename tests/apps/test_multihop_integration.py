"""The multi-hop demo on the real embedded model (SmolLM2-135M on llama.cpp).

They check that every stage produces something (passages, candidates, an answer among them;
sub-questions and facts for ``decompose``), not that the 135M model is right.
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
from stageflow.apps.multihop.architectures import DEFAULT_ARCHITECTURE
from stageflow.apps.multihop.demo import DEFAULT_DEMOS, default_question, run_demo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_lm(stageflow_local_lm: Any) -> Any:
    return stageflow_local_lm


@pytest.mark.parametrize("architecture", ["linked-choose", "linked-likelihood"])
def test_linked_architectures_answer_with_a_candidate(local_lm, architecture: str) -> None:
    example = load_devset()[1]
    result = run_demo(example.question, lm=local_lm, compact=True, architecture=architecture)
    steps = result.steps
    assert len(steps["passages"]) >= 2
    assert steps["linked"]
    assert result.answer in steps["candidates"]
    assert set(steps["choice_scores"]) == set(steps["candidates"])
    assert result.lm_calls == (1 if architecture == "linked-choose" else len(steps["candidates"]))
    assert [row["stage"] for row in result.stages] == ["retrieve", "candidates", "answer"]
    assert result.expected == example.answer


def test_decompose_fills_every_stage(local_lm) -> None:
    example = load_devset()[1]
    result = run_demo(example.question, lm=local_lm, compact=True, architecture="decompose")
    steps = result.steps
    assert result.demos == DEFAULT_DEMOS
    assert steps["sub_questions"]
    assert all(isinstance(s, str) and s.strip() for s in steps["sub_questions"])
    assert len(steps["facts"]) == len(steps["sub_questions"])
    assert all(isinstance(f, str) and f.strip() for f in steps["facts"])
    assert result.answer.strip()
    assert {row["stage"] for row in result.stages} >= {"decompose", "retrieve", "extract fact", "synthesize"}


def test_cli_demo_json_on_the_embedded_model() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("STAGEFLOW_LM", "STAGEFLOW_MODEL_PATH")}
    proc = subprocess.run(
        [sys.executable, "-m", "stageflow.cli", "demo", "--json", "--no-cache"],
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
    assert data["architecture"] == DEFAULT_ARCHITECTURE
    assert data["prompt_style"] == "compact"
    assert data["lm_calls"] == 1
    assert data["passages"]
    assert data["answer"] in data["candidates"]
    assert proc.stderr == ""  # no progress line when stderr is not a terminal
