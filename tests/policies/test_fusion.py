"""Stage fusion: which adjacent stages can share one LM call, the fused signature, stageflow.fuse."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import (
    ConfigurationError,
    ErrorHandlingPipeline,
    ParallelPipeline,
    RetryPolicy,
    SequentialPipeline,
    Stage,
    StageFusion,
    stage,
)
from stageflow.testing import FakeLM, call

SCRIPT = {"s1": "one", "s2": "two", "s3": "three", "s4": "four", "reasoning": "because"}


def chain4() -> SequentialPipeline:
    return SequentialPipeline(
        [
            dspy.Predict(dspy.Signature("text -> s1", "Step one.")),
            dspy.Predict(dspy.Signature("s1 -> s2", "Step two.")),
            dspy.Predict(dspy.Signature("s2 -> s3", "Step three.")),
            dspy.Predict(dspy.Signature("s3 -> s4", "Step four.")),
        ]
    )


# -- can_fuse ---------------------------------------------------------------------------------------


def test_two_predicts_without_lms_can_fuse() -> None:
    assert StageFusion().can_fuse(dspy.Predict("question -> keywords"), dspy.Predict("keywords -> answer"))


def test_two_predicts_on_the_same_lm_can_fuse() -> None:
    lm = FakeLM()
    a, b = dspy.Predict("question -> keywords"), dspy.Predict("keywords -> answer")
    a.lm = b.lm = lm
    assert StageFusion().can_fuse(a, b)
    assert StageFusion().why_not(a, b) is None


def test_different_lms_cannot_fuse() -> None:
    a, b = dspy.Predict("question -> keywords"), dspy.Predict("keywords -> answer")
    a.lm, b.lm = FakeLM(model="fake/a"), FakeLM(model="fake/b")
    f = StageFusion()
    assert not f.can_fuse(a, b)
    assert "different LMs" in (f.why_not(a, b) or "")
    b.lm = None
    assert not f.can_fuse(a, b)


def test_stages_with_demos_cannot_fuse() -> None:
    a, b = dspy.Predict("question -> keywords"), dspy.Predict("keywords -> answer")
    b.demos = [dspy.Example(keywords="k", answer="a")]
    assert not StageFusion().can_fuse(a, b)
    assert "demos" in (StageFusion().why_not(a, b) or "")
    b.demos = []
    a.demos = [dspy.Example(question="q", keywords="k")]
    assert not StageFusion().can_fuse(a, b)


def test_output_clash_cannot_fuse() -> None:
    f = StageFusion()
    assert not f.can_fuse(dspy.Predict("question -> answer"), dspy.Predict("question -> answer"))
    assert "answer" in (f.why_not(dspy.Predict("question -> answer"), dspy.Predict("draft -> answer")) or "")


def test_second_stage_writing_what_the_first_reads_cannot_fuse() -> None:
    assert not StageFusion().can_fuse(dspy.Predict("a -> b"), dspy.Predict("b -> a"))


class Custom(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("keywords -> answer")

    def forward(self, keywords: str) -> Any:
        return self.predict(keywords=keywords)


@pytest.mark.parametrize(
    "other",
    [
        stage(lambda keywords: {"answer": keywords}, writes=["answer"]),
        Custom(),
        SequentialPipeline([dspy.Predict("keywords -> answer")]),
        Stage(dspy.Predict("kw -> answer"), inputs={"kw": "keywords"}),
        Stage(dspy.Predict("keywords -> answer"), retry=RetryPolicy()),
    ],
    ids=["function", "custom_module", "pipeline", "renamed", "with_policy"],
)
def test_non_predictor_stages_cannot_fuse(other: Any) -> None:
    f = StageFusion()
    a = dspy.Predict("question -> keywords")
    assert not f.can_fuse(a, other)
    with pytest.raises(ConfigurationError) as info:
        f.fuse(a, other)
    assert info.value.code == "not_fusable"


def test_a_plain_stage_wrapper_is_unwrapped_for_fusion() -> None:
    assert StageFusion().can_fuse(
        Stage(dspy.Predict("question -> keywords")), dspy.Predict("keywords -> answer")
    )


# -- fuse(a, b) -------------------------------------------------------------------------------------


def test_fused_signature_combines_inputs_outputs_and_instructions() -> None:
    a = dspy.Predict(dspy.Signature("question -> keywords", "Extract keywords."))
    b = dspy.Predict(dspy.Signature("question, keywords, context -> answer, confidence: float", "Answer it."))
    fused = StageFusion().fuse(a, b)
    assert type(fused) is dspy.Predict
    sig = fused.signature
    assert list(sig.input_fields) == ["question", "context"]
    assert list(sig.output_fields) == ["keywords", "answer", "confidence"]
    assert sig.output_fields["confidence"].annotation is float
    text = sig.instructions
    assert "Extract keywords." in text
    assert "Answer it." in text
    assert text.index("Extract keywords.") < text.index("Answer it.")


def test_fused_predictor_keeps_the_shared_lm() -> None:
    lm = FakeLM({"keywords": "k", "answer": "a"})
    a, b = dspy.Predict("question -> keywords"), dspy.Predict("keywords -> answer")
    a.lm = b.lm = lm
    fused = StageFusion().fuse(a, b)
    assert fused.lm is lm
    out = fused(question="q")
    assert (out.keywords, out.answer) == ("k", "a")
    assert lm.calls == 1


def test_chain_of_thought_and_predict_fuse_to_chain_of_thought() -> None:
    fused = StageFusion().fuse(
        dspy.ChainOfThought("question -> keywords"), dspy.Predict("keywords -> answer")
    )
    assert isinstance(fused, dspy.ChainOfThought)
    sig = fused.predict.signature
    assert list(sig.input_fields) == ["question"]
    assert list(sig.output_fields) == ["reasoning", "keywords", "answer"]
    fused2 = StageFusion().fuse(
        dspy.Predict("question -> keywords"), dspy.ChainOfThought("keywords -> answer")
    )
    assert isinstance(fused2, dspy.ChainOfThought)
    assert list(fused2.predict.signature.output_fields).count("reasoning") == 1


# -- stageflow.fuse(pipeline) ----------------------------------------------------------------------------


async def test_fusing_a_four_stage_chain_makes_one_lm_call(mode: str) -> None:
    original = chain4()
    fused = stageflow.fuse(original)
    assert len(fused.stages) == 1
    assert len(original.stages) == 4  # the original is untouched
    lm = FakeLM(SCRIPT)
    with dspy.context(lm=lm):
        before = await call(original, mode, text="t")
        calls_before = lm.calls
        after = await call(fused, mode, text="t")
    assert calls_before == 4
    assert lm.calls - calls_before == 1
    assert dict(after) == dict(before)
    assert set(fused.check(["text"])) == set(original.check(["text"]))


def test_fused_stage_is_a_named_predictor_with_a_stable_path() -> None:
    fused = stageflow.fuse(chain4())
    named = fused.named_predictors()
    assert [n for n, _ in named] == ["stages[0]"]
    assert named[0][1] is fused.stages[0]
    assert list(fused.stages[0].signature.output_fields) == ["s1", "s2", "s3", "s4"]
    assert all(s in fused.stages[0].signature.instructions for s in ("Step one.", "Step four."))


def test_fused_pipeline_compiles_with_bootstrap_few_shot() -> None:
    lm = FakeLM(SCRIPT)
    fused = stageflow.fuse(chain4())
    train = [dspy.Example(text=f"t{i}", s4="four").with_inputs("text") for i in range(3)]
    opt = dspy.BootstrapFewShot(metric=lambda ex, pred, trace=None: pred.s4 == ex.s4, max_labeled_demos=0)
    with dspy.context(lm=lm):
        compiled = opt.compile(fused, trainset=train)
    demos = dict(compiled.named_predictors())["stages[0]"].demos
    assert len(demos) == 3
    assert all(d["s1"] == "one" and d["s4"] == "four" for d in demos)
    assert {d["text"] for d in demos} == {"t0", "t1", "t2"}
    with dspy.context(lm=lm):
        assert compiled(text="x").s4 == "four"


def test_a_non_fusable_stage_splits_the_chain() -> None:
    p = SequentialPipeline(
        [
            dspy.Predict("text -> s1"),
            dspy.Predict("s1 -> s2"),
            stage(lambda s2: {"s2b": s2 + "!"}, writes=["s2b"]),
            dspy.Predict("s2b -> s3"),
            dspy.Predict("s3 -> s4"),
        ]
    )
    fused = stageflow.fuse(p)
    assert len(fused.stages) == 3
    lm = FakeLM(SCRIPT)
    with dspy.context(lm=lm):
        r = fused(text="t")
    assert lm.calls == 2
    assert r.s2b == "two!"
    assert r.s4 == "four"


def test_fusing_chain_of_thought_and_predict_in_a_pipeline() -> None:
    p = SequentialPipeline([dspy.ChainOfThought("question -> keywords"), dspy.Predict("keywords -> answer")])
    fused = stageflow.fuse(p)
    assert len(fused.stages) == 1
    assert isinstance(fused.stages[0], dspy.ChainOfThought)
    assert [n for n, _ in fused.named_predictors()] == ["stages[0].predict"]
    lm = FakeLM({"reasoning": "r", "keywords": "k", "answer": "a"})
    with dspy.context(lm=lm):
        r = fused(question="q")
    assert lm.calls == 1
    assert (r.reasoning, r.keywords, r.answer) == ("r", "k", "a")


def test_different_lms_are_not_fused() -> None:
    p = chain4()
    other = FakeLM(SCRIPT, model="fake/other")
    p.stages[2].lm = other
    assert len(stageflow.fuse(p).stages) == 3  # (0+1), 2 (its own LM), 3 (the context LM)
    p.stages[3].lm = other
    fused = stageflow.fuse(p)
    assert len(fused.stages) == 2  # (0+1) on the context LM, (2+3) on `other`
    assert fused.stages[0].signature.output_fields.keys() == {"s1", "s2"}
    assert fused.stages[1].lm is other
    lm = FakeLM(SCRIPT)
    with dspy.context(lm=lm):
        assert fused(text="t").s4 == "four"
    assert (lm.calls, other.calls) == (1, 1)


def test_fuse_only_takes_a_sequential_pipeline() -> None:
    with pytest.raises(ConfigurationError):
        stageflow.fuse(ParallelPipeline([dspy.Predict("a -> b"), dspy.Predict("a -> c")]))
    with pytest.raises(ConfigurationError):
        stageflow.fuse(dspy.Predict("a -> b"))


def test_fuse_keeps_the_pipelines_default_policies() -> None:
    p = chain4().set_defaults(retry=3)
    assert stageflow.fuse(p)._default_policy == p._default_policy


def test_fuse_keeps_an_error_handling_pipeline() -> None:
    eh = ErrorHandlingPipeline(chain4().stages, recovery_strategies={0: lambda e, s: s})
    try:
        fused = stageflow.fuse(eh)
    except ConfigurationError:
        return  # refusing is fine too; silently dropping the error handling is not
    assert isinstance(fused, ErrorHandlingPipeline)
