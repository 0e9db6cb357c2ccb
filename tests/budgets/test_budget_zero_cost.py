"""DSPy's LM path is wrapped once, by the first pipeline call or budget; with no budget or rate limit
open, the wrapper only notes each call's result for stageflow's usage accounting."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import dspy

import stageflow
from stageflow.budgets import intercept
from stageflow.testing import FakeLM


def test_dspy_is_wrapped_only_once_a_pipeline_or_budget_is_used() -> None:
    """Importing stageflow leaves DSPy's LM path alone; the first pipeline call wraps it once (its
    usage accounting reads each call's result there), and later calls and budgets wrap nothing more."""
    code = textwrap.dedent(
        """
        import dspy, stageflow
        from dspy.clients import execution
        from stageflow.testing import FakeLM
        original = execution.execute
        dspy.Predict("question -> answer")(question="q", lm=FakeLM())
        print(execution.execute is original)
        pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
        with dspy.context(lm=FakeLM()):
            pipe(question="q")
        wrapped = execution.execute
        print(wrapped is original, wrapped.__module__)
        with dspy.context(lm=FakeLM()), stageflow.budget(max_calls=5):
            pipe(question="q")
        print(execution.execute is wrapped)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["True", "False", "stageflow.budgets.intercept", "True"]


def test_uninstall_gives_dspy_its_functions_back() -> None:
    from dspy.clients import execution

    with stageflow.budget():
        pass
    assert intercept.installed()
    assert execution.execute.__module__ == "stageflow.budgets.intercept"
    intercept.uninstall()
    assert not intercept.installed()
    assert execution.execute.__module__ == "dspy.clients.execution"
    lm = FakeLM()
    with dspy.context(lm=lm), stageflow.budget(max_calls=1) as spent:  # installs it again
        dspy.Predict("question -> answer")(question="q")
    assert spent.calls == 1
    assert intercept.installed()


def test_a_closed_budget_holds_nothing_back_even_in_a_copied_context() -> None:
    import contextvars

    lm = FakeLM()
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm), stageflow.budget(max_calls=0):
        leaked = contextvars.copy_context()  # a context that outlives the block
    with stageflow.budget(max_calls=5) as other:  # some budget is open elsewhere
        leaked.run(qa, question="q")
    assert lm.calls == 1
    assert other.calls == 0  # the copied context was never inside this block


def test_stage_budgets_show_in_pictures() -> None:
    pipe = stageflow.SequentialPipeline(
        [stageflow.Stage(dspy.Predict("question -> answer"), budget={"max_calls": 2})]
    )
    assert "policies: budget" in pipe.to_mermaid()
