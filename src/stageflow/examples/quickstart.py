"""The quickstart demo: routing, a refinement loop and contracts, on the fake LM.

It shows the architectures and the run details stageflow reports. Answers come from
:class:`stageflow.testing.FakeLM`, a deterministic script, not from a real model.
"""

from __future__ import annotations

import re
from typing import Any

import dspy

import stageflow
from stageflow.testing import FakeLM, isolated_dspy

__all__ = ["build_demo", "run_demo"]


def _solve(inputs: dict[str, Any]) -> str:
    nums = [int(n) for n in re.findall(r"\d+", str(inputs.get("question", "")))]
    if len(nums) >= 2 and "times" in str(inputs.get("question", "")):
        return str(nums[0] * nums[1])
    return "I would look that up."


def build_demo() -> stageflow.BranchingPipeline:
    """A router choosing between a math path (draft → refine loop) and a chat path."""

    @stageflow.stage(writes=["quality_score"])
    def score(answer: str) -> dict[str, float]:
        return {"quality_score": 1.0 if answer.strip().isdigit() else 0.3}

    math = stageflow.SequentialPipeline(
        [
            dspy.Predict("question -> answer"),
            stageflow.IterativePipeline(
                [
                    stageflow.Stage(dspy.Predict("question, draft -> answer"), inputs={"draft": "answer"}),
                    score,
                ],
                stageflow.QualityBasedStopping(quality_threshold=0.9, patience=2),
                max_iterations=3,
            ),
        ]
    )
    chat = dspy.Predict("question -> answer")
    return stageflow.BranchingPipeline(stageflow.lm_router(["math", "chat"]), {"math": math, "chat": chat})


def run_demo(question: str) -> int:
    """Run the demo on ``question`` and print what happened; returns an exit code."""
    lm = FakeLM(
        {
            "branch": lambda i: "math" if re.search(r"\d", i.get("question", "")) else "chat",
            "answer": _solve,
        }
    )
    program = build_demo()
    with isolated_dspy(lm), stageflow.profile() as prof:
        result = program(question=question)
    print("stageflow demo (deterministic fake LM; the embedded local model comes in a later release)")
    print(f"question : {question}")
    print(f"branch   : {result.branch}")
    print(f"answer   : {result.answer}")
    print(f"LM calls : {lm.calls}")
    print("stages   :")
    for path, stats in prof.get_performance_summary().items():
        print(f"  {path:<40} x{stats['num_executions']}  {stats['total_time'] * 1000:7.2f} ms")
    return 0
