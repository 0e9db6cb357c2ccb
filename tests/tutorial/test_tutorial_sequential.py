"""Tutorial §1 "Sequential Pipeline Architecture" and its example "Multi-hop Question Answering".

Blocks exercised: the ``SequentialPipeline`` implementation (its constructor, ``stage_names``,
``add_stage(stage, position)``, and the result's ``output`` / ``stage_outputs`` / ``trace``) and the
multi-hop QA example, whose user code (signatures, ``QueryDecomposer``, ``InformationRetriever``,
``AnswerSynthesizer``, ``build_multi_hop_qa_pipeline``) is copied as written on stageflow's
``SequentialPipeline``.
"""

from __future__ import annotations

from typing import Any, List  # noqa: UP035 (List: the tutorial's annotation, as written)

import dspy
import pytest

from stageflow import ContractError, SequentialPipeline
from stageflow.testing import FakeLM, call

# -- the tutorial's multi-hop QA example, as written --------------------------------------------


# Define signatures for each stage
class QueryDecompositionSignature(dspy.Signature):
    """Decompose complex query into simpler sub-questions."""

    question = dspy.InputField()
    # ADAPTED: the tutorial's untyped `sub_questions = dspy.OutputField(...)` is a `str` in DSPy 3.4.1,
    # so `for sub_q in sub_questions` below would run once per *character*. Typed as a list of strings.
    sub_questions: list[str] = dspy.OutputField(desc="List of simpler sub-questions")


class InformationRetrievalSignature(dspy.Signature):
    """Retrieve relevant information for each sub-question."""

    sub_question = dspy.InputField()
    # ADAPTED: the tutorial's InformationRetriever passes `context=docs`, but its signature has no
    # `context` input, so DSPy 3.4.1 drops the retrieved passages with a warning ("Input contains fields
    # not in signature") and the LM never sees them. Declared here so the retrieval reaches the LM.
    context = dspy.InputField(desc="Passages retrieved from the knowledge base")
    retrieved_info = dspy.OutputField(desc="Relevant information from knowledge base")


class AnswerSynthesisSignature(dspy.Signature):
    """Synthesize final answer from retrieved information."""

    original_question = dspy.InputField()
    retrieved_facts = dspy.InputField()
    final_answer = dspy.OutputField(desc="Comprehensive answer to original question")


# Create modules for each stage
class QueryDecomposer(dspy.Module):
    def __init__(self):
        super().__init__()
        self.decompose = dspy.ChainOfThought(QueryDecompositionSignature)

    def forward(self, question):
        return self.decompose(question=question)


class InformationRetriever(dspy.Module):
    def __init__(self):
        super().__init__()
        self.retrieve = dspy.ChainOfThought(InformationRetrievalSignature)
        self.rm = dspy.Retrieve(k=3)

    def forward(self, sub_question):
        # First retrieve from knowledge base
        docs = self.rm(sub_question).passages

        # Then synthesize retrieved information
        prediction = self.retrieve(sub_question=sub_question, context=docs)
        return prediction


class AnswerSynthesizer(dspy.Module):
    def __init__(self):
        super().__init__()
        self.synthesize = dspy.ChainOfThought(AnswerSynthesisSignature)

    def forward(self, original_question, retrieved_facts):
        return self.synthesize(original_question=original_question, retrieved_facts=retrieved_facts)


# Build the complete pipeline
def build_multi_hop_qa_pipeline():
    """Build a complete multi-hop QA pipeline."""

    stages = [QueryDecomposer(), InformationRetriever(), AnswerSynthesizer()]

    pipeline = SequentialPipeline(stages)

    # Add custom forward method for multi-hop logic
    def forward(self, question):
        # Stage 1: Decompose query
        decomposition = self.stages[0].forward(question=question)
        sub_questions = decomposition.sub_questions

        # Stage 2: Process each sub-question
        all_facts = []
        for sub_q in sub_questions:
            info = self.stages[1].forward(sub_question=sub_q)
            all_facts.append(info.retrieved_info)

        # Stage 3: Synthesize final answer
        combined_facts = "\n".join(all_facts)
        final_answer = self.stages[2].forward(original_question=question, retrieved_facts=combined_facts)

        return dspy.Prediction(
            question=question, sub_questions=sub_questions, facts=all_facts, answer=final_answer.final_answer
        )

    pipeline.forward = forward.__get__(pipeline, SequentialPipeline)
    return pipeline


# -- test doubles: a scripted LM and a small knowledge base for dspy.Retrieve --------------------


class KnowledgeBase:
    """A retriever for ``dspy.configure(rm=...)``: ``rm(query, k=3)`` returns ``k`` passages."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, int]] = []

    def __call__(self, query: str, k: int = 3, **kwargs: Any) -> list[dspy.Prediction]:
        self.queries.append((query, k))
        return [dspy.Prediction(long_text=f"passage {i} on {query}") for i in range(k)]


def qa_lm() -> FakeLM:
    return FakeLM(
        {
            "sub_questions": ["Who founded the lab?", "Where is it?"],
            "retrieved_info": lambda i: (
                f"fact({i['sub_question']}; {i['context'].count('passage')} passages)"
            ),
            "final_answer": lambda i: "ANSWER from " + " | ".join(i["retrieved_facts"].splitlines()),
        }
    )


QUESTION = "Who founded the lab, and where is it?"


async def test_multi_hop_qa_pipeline_runs_as_written(mode: str) -> None:
    lm, kb = qa_lm(), KnowledgeBase()
    pipeline = build_multi_hop_qa_pipeline()
    with dspy.context(lm=lm, rm=kb):
        result = await call(pipeline, mode, question=QUESTION)
    assert isinstance(result, dspy.Prediction)
    assert result.question == QUESTION
    assert result.sub_questions == ["Who founded the lab?", "Where is it?"]
    assert result.facts == ["fact(Who founded the lab?; 3 passages)", "fact(Where is it?; 3 passages)"]
    assert result.answer == (
        "ANSWER from fact(Who founded the lab?; 3 passages) | fact(Where is it?; 3 passages)"
    )
    # One decomposition, one retrieval + synthesis per sub-question, one final synthesis.
    assert [fields for fields, _ in lm.log] == [
        ("reasoning", "sub_questions"),
        ("reasoning", "retrieved_info"),
        ("reasoning", "retrieved_info"),
        ("reasoning", "final_answer"),
    ]
    assert kb.queries == [("Who founded the lab?", 3), ("Where is it?", 3)]
    # The passages reach the LM (DSPy renders a list input as numbered items).
    assert lm.log[1][1]["context"] == "\n".join(
        f"[{i + 1}] «passage {i} on Who founded the lab?»" for i in range(3)
    )


def test_multi_hop_pipeline_keeps_its_predictors_visible_to_optimizers() -> None:
    pipeline = build_multi_hop_qa_pipeline()
    assert isinstance(pipeline, dspy.Module)
    assert [name for name, _ in pipeline.named_predictors()] == [
        "stages[0].decompose.predict",
        "stages[1].retrieve.predict",
        "stages[2].synthesize.predict",
    ]


async def test_the_examples_stages_in_a_plain_pipeline_stop_before_the_stage_that_lacks_its_input(
    mode: str,
) -> None:
    # Without the custom forward, stage 1 needs `sub_question`, which stage 0 (undeclared outputs)
    # does not return: the run stops at that stage's boundary, before it spends an LM call.
    lm, kb = qa_lm(), KnowledgeBase()
    pipeline = SequentialPipeline([QueryDecomposer(), InformationRetriever(), AnswerSynthesizer()])
    with dspy.context(lm=lm, rm=kb), pytest.raises(ContractError) as info:
        await call(pipeline, mode, question=QUESTION)
    assert info.value.stage_path == "stages[1]"
    assert info.value.field == "sub_question"
    assert "sub_questions" in str(info.value)  # what is available is named
    assert lm.calls == 1
    assert kb.queries == []


def test_check_reports_the_deferred_read_and_strict_mode_refuses_it() -> None:
    pipeline = SequentialPipeline([QueryDecomposer(), InformationRetriever(), AnswerSynthesizer()])
    checked = pipeline.check(["question"])
    assert [(d.stage, d.field, d.candidates) for d in checked.deferred][:1] == [
        ("stages[1]", "sub_question", ("stages[0]",))
    ]
    assert "stages[0]" in checked.warnings[0]

    strict = SequentialPipeline([QueryDecomposer(), InformationRetriever(), AnswerSynthesizer()], strict=True)
    lm = qa_lm()
    with dspy.context(lm=lm, rm=KnowledgeBase()), pytest.raises(ContractError) as info:
        strict(question=QUESTION)
    assert info.value.field == "sub_question"
    assert lm.calls == 0  # refused before anything ran


# -- the SequentialPipeline block: constructor, stage_names, add_stage, result attributes -------


class Draft(dspy.Module):
    """A user module with a hand-written forward returning a dspy.Prediction (undeclared outputs)."""

    def __init__(self):
        super().__init__()
        self.write = dspy.Predict("topic -> draft")

    def forward(self, topic):
        return dspy.Prediction(draft=self.write(topic=topic).draft, words=len(topic.split()))


class Polish(dspy.Module):
    def __init__(self):
        super().__init__()
        self.polish = dspy.ChainOfThought("draft, words -> text")

    def forward(self, draft, words):
        return self.polish(draft=draft, words=words)


def writing_lm() -> FakeLM:
    return FakeLM({"draft": lambda i: f"draft on {i['topic']}", "text": lambda i: i["draft"].upper()})


async def test_stages_run_in_order_over_one_state_with_the_tutorials_result_attributes(mode: str) -> None:
    stages: List[dspy.Module] = [Draft(), Polish()]  # noqa: UP006 (the tutorial's annotation)
    pipeline = SequentialPipeline(stages)
    with dspy.context(lm=writing_lm()):
        result = await call(pipeline, mode, topic="rivers of europe")
    assert result.text == "DRAFT ON RIVERS OF EUROPE"
    # output: the final state (the tutorial's `output=current_input`)
    assert result.output == {
        "topic": "rivers of europe",
        "draft": "draft on rivers of europe",
        "words": 3,
        "reasoning": "ok",
        "text": "DRAFT ON RIVERS OF EUROPE",
    }
    # stage_outputs: each stage's own output, by the pipeline's stage names
    # stageflow keys stages by their DSPy paths; the tutorial's names work as keys too
    assert list(result.stage_outputs) == ["stages[0]", "stages[1]"]
    assert all(name in result.stage_outputs for name in pipeline.stage_names)
    first, second = (result.stage_outputs[name] for name in pipeline.stage_names)
    assert (first.draft, first.words) == ("draft on rivers of europe", 3)
    assert second.text == "DRAFT ON RIVERS OF EUROPE"
    # trace: what ran, in order; run details are attributes, not data fields
    assert [record.path for record in result.trace] == ["stages[0]", "stages[1]"]
    for detail in ("output", "stage_outputs", "trace"):
        assert detail not in result


async def test_add_stage_appends_or_inserts_and_renumbers_the_stage_names(mode: str) -> None:
    class Outline(dspy.Module):
        def forward(self, subject):
            return dspy.Prediction(topic=f"outline of {subject}")

    class Count(dspy.Module):
        def forward(self, text):
            return dspy.Prediction(length=len(text))

    pipeline = SequentialPipeline([Draft(), Polish()])
    names_before = list(pipeline.stage_names)
    pipeline.add_stage(Count())  # position=None: appended
    pipeline.add_stage(Outline(), position=0)  # inserted first; later stages are renamed
    assert len(pipeline.stage_names) == 4
    assert pipeline.stage_names[:2] == names_before
    assert [type(s).__name__ for s in pipeline.stages] == ["Outline", "Draft", "Polish", "Count"]
    with dspy.context(lm=writing_lm()):
        result = await call(pipeline, mode, subject="rivers")
    assert result.topic == "outline of rivers"
    assert result.text == "DRAFT ON OUTLINE OF RIVERS"
    assert result.length == len("DRAFT ON OUTLINE OF RIVERS")
    # stageflow keys stages by their DSPy paths; the tutorial's names work as keys too
    assert list(result.stage_outputs) == [f"stages[{i}]" for i in range(4)]
    assert all(name in result.stage_outputs for name in pipeline.stage_names)


async def test_stage_names_are_the_tutorials_stage_i(mode: str) -> None:
    pipeline = SequentialPipeline([Draft(), Polish()])
    with dspy.context(lm=writing_lm()):
        result = await call(pipeline, mode, topic="rivers")
    assert result.stage_outputs["stage_0"].draft == "draft on rivers"
    assert pipeline.stage_names == ["stage_0", "stage_1"]


async def test_trace_is_the_stage_outputs_by_name(mode: str) -> None:
    pipeline = SequentialPipeline([Draft(), Polish()])
    with dspy.context(lm=writing_lm()):
        result = await call(pipeline, mode, topic="rivers")
    name = pipeline.stage_names[0]
    assert result.trace[name].draft == "draft on rivers"
