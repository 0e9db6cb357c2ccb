"""Tutorial §2 "Branching Architecture": ``BranchingPipeline(router_stage, branches)`` and ``TaskRouter``.

The tutorial's ``TaskRouter`` is user code (copied as written, one line adapted); the pipeline is
stageflow's. The tutorial's pipeline calls the router with the inputs, runs
``branches[route_decision.branch]`` with the inputs plus the router's outputs, and returns
``branch``, ``route_decision`` and ``result``; an unknown branch name is an error.
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest

from stageflow import BranchingPipeline, RoutingError
from stageflow.testing import FakeLM, call


# Example routing module
class TaskRouter(dspy.Module):
    def __init__(self):
        super().__init__()
        self.classify = dspy.ChainOfThought(
            # ADAPTED: the tutorial's "question -> task_type (multiple_choice / short_answer / essay)"
            # does not parse in DSPy 3.4.1 (SyntaxError; see the test below). The choices become a
            # Literal type, with spaces, which the tutorial's `.replace(' ', '_')` turns into branch names.
            "question -> task_type: Literal['multiple choice', 'short answer', 'essay']"
        )

    def forward(self, question):
        result = self.classify(question=question)
        return dspy.Prediction(branch=result.task_type.replace(" ", "_"), task_type=result.task_type)


# Branches (the tutorial leaves them to the reader): each reads the inputs and the router's outputs.
class MultipleChoice(dspy.Module):
    def __init__(self):
        super().__init__()
        self.pick = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.pick(question=question)


class ShortAnswer(dspy.Module):
    def __init__(self):
        super().__init__()
        self.answer = dspy.ChainOfThought("question, task_type -> answer")

    def forward(self, question, task_type):
        return self.answer(question=question, task_type=task_type)


class Essay(dspy.Module):
    def __init__(self):
        super().__init__()
        self.write = dspy.Predict("question -> answer")

    def forward(self, **kwargs):
        # Takes everything it is given: the tutorial calls `branch(**kwargs, **route_decision.predictions)`.
        self.received = dict(kwargs)
        return self.write(question=kwargs["question"])


def branches() -> dict[str, Any]:
    return {"multiple_choice": MultipleChoice(), "short_answer": ShortAnswer(), "essay": Essay()}


def router_lm(task_type: str) -> FakeLM:
    return FakeLM({"task_type": task_type, "answer": lambda i: f"answer to {i['question']}"})


def test_the_tutorials_router_signature_does_not_parse_in_dspy() -> None:
    # Why TaskRouter's signature string is adapted above.
    with pytest.raises(SyntaxError):
        dspy.ChainOfThought("question -> task_type (multiple_choice / short_answer / essay)")


@pytest.mark.parametrize(
    ("task_type", "branch"),
    [("multiple choice", "multiple_choice"), ("short answer", "short_answer"), ("essay", "essay")],
)
async def test_task_router_picks_the_branch_that_runs(mode: str, task_type: str, branch: str) -> None:
    lm = router_lm(task_type)
    pipeline = BranchingPipeline(router_stage=TaskRouter(), branches=branches())
    with dspy.context(lm=lm):
        result = await call(pipeline, mode, question="What is the capital of France?")
    assert result.branch == branch
    # route_decision: what the router said (the tutorial's router Prediction: .branch, .task_type)
    assert result.route_decision.branch == branch
    assert result.route_decision.task_type == task_type
    assert result.route_decision.predictions == {"branch": branch, "task_type": task_type}
    # result: the branch's own output
    assert result.result.answer == "answer to What is the capital of France?"
    assert result.answer == "answer to What is the capital of France?"
    # The router's LM call, then the chosen branch's only.
    assert len(lm.log) == 2
    assert lm.log[0][0] == ("reasoning", "task_type")
    for detail in ("route_decision", "result"):
        assert detail not in result


async def test_the_branch_gets_the_inputs_and_the_routers_outputs(mode: str) -> None:
    lm = router_lm("short answer")
    pipeline = BranchingPipeline(TaskRouter(), branches())
    with dspy.context(lm=lm):
        result = await call(pipeline, mode, question="Why is the sky blue?")
    assert result.branch == "short_answer"
    assert lm.log[1][1] == {"question": "Why is the sky blue?", "task_type": "short answer"}

    essay = Essay()
    pipeline = BranchingPipeline(router_stage=TaskRouter(), branches={**branches(), "essay": essay})
    with dspy.context(lm=router_lm("essay")):
        await call(pipeline, mode, question="Discuss tides.")
    assert essay.received == {"question": "Discuss tides.", "branch": "essay", "task_type": "essay"}


async def test_an_unknown_branch_is_an_error_and_no_branch_runs(mode: str) -> None:
    lm = router_lm("essay")
    only_short = {"multiple_choice": MultipleChoice(), "short_answer": ShortAnswer()}
    pipeline = BranchingPipeline(router_stage=TaskRouter(), branches=only_short)
    with dspy.context(lm=lm), pytest.raises(RoutingError) as info:
        await call(pipeline, mode, question="Discuss tides.")
    # The tutorial: ValueError(f"Unknown branch: {branch_name}"); stageflow's error names the known ones.
    assert "essay" in str(info.value)
    assert "multiple_choice" in str(info.value)
    assert "short_answer" in str(info.value)
    assert lm.calls == 1  # the router only
