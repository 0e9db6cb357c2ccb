"""Tutorial "Performance Optimization" §1 "Stage Fusion": ``StageFusion().can_fuse(a, b)`` / ``.fuse(a, b)``.

The tutorial's text: combine compatible stages to reduce overhead; two ``ChainOfThought`` modules
become one module that executes both reasoning steps in one call. (Its own ``StageFusion`` cannot
run: ``__init__`` refers to ``_fuse_retrieval_processing`` and ``_fuse_filter_transform``, which it
never defines, and its rule keys never match the type names ``can_fuse`` builds.) Incompatible
stages cannot be fused; ``fuse`` then raises.
"""

from __future__ import annotations

import dspy
import pytest

from stageflow import ConfigurationError, SequentialPipeline, StageFusion
from stageflow.testing import FakeLM, call


def fusion_lm() -> FakeLM:
    return FakeLM(
        {
            "keywords": lambda i: f"keywords of {i['question']}",
            "answer": lambda i: f"answer to {i['question']}",
        }
    )


async def test_two_chain_of_thought_stages_become_one_lm_call(mode: str) -> None:
    cot1 = dspy.ChainOfThought("question -> keywords")
    cot2 = dspy.ChainOfThought("question, keywords -> answer")
    fusion = StageFusion()
    assert fusion.can_fuse(cot1, cot2)
    fused = fusion.fuse(cot1, cot2)
    assert isinstance(fused, dspy.Module)

    lm = fusion_lm()
    with dspy.context(lm=lm):
        result = await call(fused, mode, question="Why do rivers meander?")
    assert result.keywords == "keywords of Why do rivers meander?"
    assert result.answer == "answer to Why do rivers meander?"
    assert lm.calls == 1  # both steps in one call

    unfused = SequentialPipeline([cot1, cot2])
    with dspy.context(lm=lm):
        same = await call(unfused, mode, question="Why do rivers meander?")
    assert (same.keywords, same.answer) == (result.keywords, result.answer)
    assert lm.calls == 1 + 2


async def test_a_fused_stage_is_an_ordinary_stage(mode: str) -> None:
    fused = StageFusion().fuse(
        dspy.ChainOfThought("question -> keywords"), dspy.ChainOfThought("question, keywords -> answer")
    )
    pipeline = SequentialPipeline([fused, dspy.Predict("answer -> summary")])
    assert [name for name, _ in pipeline.named_predictors()] == ["stages[0].predict", "stages[1]"]
    with dspy.context(lm=fusion_lm()):
        result = await call(pipeline, mode, question="Q")
    assert result.answer == "answer to Q"
    assert result.summary == "ok"


def test_incompatible_stages_are_not_fused() -> None:
    fusion = StageFusion()
    same_output = (dspy.ChainOfThought("question -> keywords"), dspy.ChainOfThought("question -> keywords"))
    assert not fusion.can_fuse(*same_output)
    # The tutorial raises ValueError(f"Cannot fuse {stage1_type} and {stage2_type}").
    with pytest.raises(ConfigurationError) as info:
        fusion.fuse(*same_output)
    assert "keywords" in str(info.value)

    class Custom(dspy.Module):
        def forward(self, question):
            return dspy.Prediction(keywords=question)

    assert not fusion.can_fuse(Custom(), dspy.ChainOfThought("question, keywords -> answer"))


def test_fusion_rules_are_the_tutorials_table_and_users_can_add_and_remove_rules() -> None:
    # The tutorial keeps `fusion_rules` keyed "<class>_<class>"; readers inspect and extend it.
    class Clean(dspy.Module):
        def forward(self, text):
            return dspy.Prediction(text=text.strip())

    class Lower(dspy.Module):
        def forward(self, text):
            return dspy.Prediction(text=text.lower())

    class CleanLower(dspy.Module):
        def __init__(self, a, b):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, text):
            return self.b(text=self.a(text=text).text)

    fusion = StageFusion()
    assert "ChainOfThought_ChainOfThought" in fusion.fusion_rules
    assert not fusion.can_fuse(Clean(), Lower())
    fusion.fusion_rules["Clean_Lower"] = CleanLower
    assert fusion.can_fuse(Clean(), Lower())
    fused = fusion.fuse(Clean(), Lower())
    assert isinstance(fused, CleanLower)
    assert fused(text="  HeLLo ").text == "hello"

    a, b = dspy.Predict("question -> keywords"), dspy.Predict("question, keywords -> answer")
    del fusion.fusion_rules["Predict_Predict"]
    assert not fusion.can_fuse(a, b)
    with pytest.raises(ConfigurationError, match="no rule for 'Predict_Predict'"):
        fusion.fuse(a, b)
