"""The multi-hop QA program on fake LMs: structure, runs, fallbacks, copies and compiling."""

from __future__ import annotations

import copy
import json
from typing import Any

import dspy
import pytest
from dspy.lm15 import Message, Response, Usage

from stageflow.apps.multihop import (
    CompactJSONAdapter,
    MultiHopQA,
    answer_matches,
    build_program,
    check_sub_questions,
    load_devset,
    load_trainset,
    match_kind,
    normalize_text,
    qa_metric,
    stage_name,
)
from stageflow.apps.multihop.evaluate import compile_program, evaluate_program
from stageflow.testing import FakeLM

QUESTION = "In which village was the author of Pride and Prejudice born?"


class ListRetriever:
    """A retriever returning fixed passages; counts calls."""

    def __init__(self, passages: list[str] | None = None) -> None:
        self.passages = passages or ["Jane Austen: Jane Austen was born in Steventon.", "Other: text."]
        self.queries: list[tuple[str, int]] = []

    def __call__(self, query: str, k: int | None = None) -> list[str]:
        self.queries.append((query, k or 0))
        return self.passages[: k or 3]


def scripted_lm(**overrides: Any) -> FakeLM:
    script: dict[str, Any] = {
        "sub_questions": ["Who wrote Pride and Prejudice?", "Where was Jane Austen born?"],
        "fact": lambda i: f"fact for {i['sub_question']}",
        "reasoning": "from the facts",
        "answer": "Steventon",
    }
    script.update(overrides)
    return FakeLM(script)


def test_structure_and_named_predictors() -> None:
    program = build_program(ListRetriever())
    assert isinstance(program, MultiHopQA)
    names = [name for name, _ in program.named_predictors()]
    assert names == ["stages[0]", "stages[2].stage.stages[1]", "stages[3].predict"]
    assert program.decompose.signature.output_fields["sub_questions"].annotation == list[str]
    assert list(program.extract.signature.input_fields) == ["sub_question", "passages"]
    assert isinstance(program.synthesize, dspy.ChainOfThought)
    assert program.check(["question"]) == (
        "answer",
        "facts",
        "passages",
        "question",
        "reasoning",
        "sub_questions",
    )


def test_compact_program_uses_terse_signatures_and_plain_predict() -> None:
    program = build_program(ListRetriever(), compact=True)
    assert type(program.synthesize) is dspy.Predict
    assert "reasoning" not in program.check(["question"])
    for _, predictor in program.named_predictors():
        assert len(predictor.signature.instructions.splitlines()) == 1
    assert isinstance(program.adapter(), CompactJSONAdapter)
    assert type(build_program(ListRetriever()).adapter()) is dspy.JSONAdapter


@pytest.mark.parametrize("adapter", [dspy.JSONAdapter(), dspy.ChatAdapter()], ids=["json", "chat"])
def test_run_collects_one_fact_per_sub_question(adapter: Any) -> None:
    retriever = ListRetriever()
    program = build_program(retriever, k=2)
    lm = scripted_lm()
    with dspy.context(lm=lm, adapter=adapter):
        result = program(question=QUESTION)
    assert result.sub_questions == ["Who wrote Pride and Prejudice?", "Where was Jane Austen born?"]
    assert result.facts == [f"fact for {s}" for s in result.sub_questions]
    assert result.passages == [retriever.passages[:2]] * 2
    assert result.answer == "Steventon"
    assert sorted(retriever.queries) == sorted((s, 2) for s in result.sub_questions)
    assert lm.calls == 4  # decompose, 2 x extract, synthesize


async def test_async_run_matches_sync() -> None:
    program = build_program(ListRetriever())
    with dspy.context(lm=scripted_lm(), adapter=dspy.JSONAdapter()):
        result = await program.acall(question=QUESTION)
    assert result.answer == "Steventon"
    assert len(result.facts) == 2


def test_empty_decomposition_falls_back_to_the_question() -> None:
    program = build_program(ListRetriever())
    with dspy.context(lm=scripted_lm(sub_questions=[]), adapter=dspy.JSONAdapter()):
        result = program(question=QUESTION)
    assert result.sub_questions == [QUESTION]
    assert len(result.facts) == 1


def test_check_sub_questions_cleans_and_caps() -> None:
    out = check_sub_questions("Q?", [" a ", "", "A", "b", None, "c", "d", "e"])
    assert out == {"sub_questions": ["a", "b", "c", "d"]}
    assert check_sub_questions("Q?", "  ") == {"sub_questions": ["Q?"]}
    assert check_sub_questions("Q?", "single") == {"sub_questions": ["single"]}


def test_default_retriever_is_bm25_over_the_shipped_corpus() -> None:
    from stageflow.retrieval import BM25Retriever

    program = build_program(k=2)
    retriever = program.stages[2].stage.stages[0].fn.retriever
    assert isinstance(retriever, BM25Retriever)
    assert len(retriever) >= 250
    assert "Jane Austen" in retriever("Where was Jane Austen born?", 1)[0]


def test_deep_copies_share_the_retriever_but_not_predictors() -> None:
    program = build_program(ListRetriever())
    clone = copy.deepcopy(program)
    assert clone.stages[2].stage.stages[0].fn.retriever is program.stages[2].stage.stages[0].fn.retriever
    assert clone.decompose is not program.decompose
    assert clone.compact == program.compact


def test_bootstrap_few_shot_compiles_every_predictor_including_the_one_inside_foreach() -> None:
    trainset = load_trainset()[:4]
    gold = {ex.question: ex.answer for ex in trainset}
    lm = scripted_lm(answer=lambda i: gold[i["question"]])
    program = build_program(ListRetriever())
    compiled = compile_program(
        program, trainset, lm=lm, adapter=dspy.JSONAdapter(), max_bootstrapped_demos=2, max_labeled_demos=0
    )
    demos = {name: p.demos for name, p in compiled.named_predictors()}
    assert {name: len(d) for name, d in demos.items()} == {
        "stages[0]": 2,
        "stages[2].stage.stages[1]": 2,
        "stages[3].predict": 2,
    }
    extract_demo = demos["stages[2].stage.stages[1]"][0]
    assert {"sub_question", "passages", "fact"} <= set(extract_demo.keys())
    assert all(not p.demos for _, p in program.named_predictors())  # the original is untouched


def test_labeled_demos_from_the_train_set_fill_decompose_and_synthesize(tmp_path: Any) -> None:
    trainset = load_trainset()[:3]
    program = build_program(ListRetriever())
    compiled = compile_program(
        program,
        trainset,
        lm=scripted_lm(answer="wrong"),
        adapter=dspy.JSONAdapter(),
        max_bootstrapped_demos=0,
        max_labeled_demos=2,
    )
    decompose_demo = compiled.decompose.demos[0]
    assert decompose_demo["sub_questions"] in [ex.sub_questions for ex in trainset]
    path = tmp_path / "program.json"
    compiled.save(str(path))
    fresh = build_program(ListRetriever())
    fresh.load(str(path))
    assert [len(p.demos) for _, p in fresh.named_predictors()] == [2, 2, 2]


# -- a schema-driven fake LM for the compact adapter (FakeLM reads DSPy's standard prompt) ---------


class _SchemaEngine:
    supports_response_schema = True
    supported_params = frozenset({"response_format", "temperature", "max_tokens"})

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.requests: list[Any] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> _SchemaEngine:
        return self

    def complete(self, request: Any) -> Response:
        self.requests.append(request)
        schema = request.config.response_format["schema"]
        text = json.dumps({name: self.values[name] for name in schema["properties"]})
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant(text),
            finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=1),
        )

    def close(self) -> None:
        return None


def schema_lm(values: dict[str, Any]) -> tuple[dspy.LM, _SchemaEngine]:
    engine = _SchemaEngine(values)
    return dspy.LM("schema-fake/lm", engine=engine, cache=False, num_retries=0), engine


def test_compact_adapter_prompt_is_short_and_parses() -> None:
    lm, engine = schema_lm({"sub_questions": ["Who wrote it?"], "fact": "A fact.", "answer": "Steventon"})
    program = build_program(ListRetriever(["P1: one.", "P2: two."]), compact=True)
    with dspy.context(lm=lm, adapter=program.adapter()):
        result = program(question=QUESTION)
    assert (result.sub_questions, result.facts, result.answer) == (
        ["Who wrote it?"],
        ["A fact."],
        "Steventon",
    )
    decompose, extract = engine.requests[0], engine.requests[1]
    assert decompose.system == (
        "List the simple questions needed to answer the question.\n"
        'Reply in JSON with the key "sub_questions".'
    )
    assert decompose.messages[-1].parts[0].text == f"Question: {QUESTION}"
    assert (
        extract.messages[-1].parts[0].text == "Sub question: Who wrote it?\nPassages:\n- P1: one.\n- P2: two."
    )
    assert decompose.config.response_format["schema"]["properties"]["sub_questions"]["type"] == "array"


def test_compact_adapter_formats_demos_as_one_line_json() -> None:
    adapter = CompactJSONAdapter()
    signature = build_program(ListRetriever(), compact=True).decompose.signature
    demo = {"question": "Who?", "sub_questions": ["A?", "B?"]}
    messages = adapter.format(signature, [demo], {"question": "Why?"})
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == '{"sub_questions": ["A?", "B?"]}'
    assert adapter.parse(signature, messages[2]["content"]) == {"sub_questions": ["A?", "B?"]}


def test_compact_program_compiles_with_the_compact_adapter() -> None:
    trainset = load_trainset()[:2]
    lm, _ = schema_lm({"sub_questions": ["x?"], "fact": "f", "answer": trainset[0].answer})
    program = build_program(ListRetriever(), compact=True)
    compiled = compile_program(program, trainset, lm=lm, adapter=program.adapter(), max_labeled_demos=1)
    assert all(p.demos for _, p in compiled.named_predictors())


# -- data and metric ----------------------------------------------------------------------------------


def test_question_sets_are_examples_with_question_as_input() -> None:
    dev, train = load_devset(), load_trainset()
    assert (len(dev), len(train)) == (30, 40)
    assert set(dev[0].inputs().keys()) == {"question"}
    assert dev[0].answer == "Steventon"
    assert train[0].sub_questions
    assert train[0].facts


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        ("Steventon", "exact"),
        ("  steventon. ", "exact"),
        ("Steventon, Hampshire", "exact"),  # an alias
        ("She was born in Steventon in 1775", "contains"),
        ("Stevent", None),
        ("", None),
        ("Bath", None),
    ],
)
def test_match_kind(answer: str, kind: str | None) -> None:
    example = load_devset()[0]
    assert match_kind(answer, example) == kind
    assert answer_matches(dspy.Prediction(answer=answer), example) is (kind is not None)
    assert qa_metric(example, dspy.Prediction(answer=answer)) is (kind is not None)


def test_normalize_text_strips_accents_articles_and_punctuation() -> None:
    assert normalize_text("The city of Málaga!") == "city of malaga"
    assert answer_matches("Malaga", {"answer": "Málaga", "aliases": []})


def test_evaluate_program_scores_and_survives_errors() -> None:
    dev = load_devset()[:3]
    lm = scripted_lm(answer=lambda i: "Steventon" if "Pride" in i["question"] else "nope")
    report = evaluate_program(build_program(ListRetriever()), dev, lm=lm, adapter=dspy.JSONAdapter())
    assert report.n == 3
    assert report.exact == pytest.approx(1 / 3)
    assert report.matched == pytest.approx(1 / 3)

    broken = evaluate_program(build_program(ListRetriever()), dev[:1], lm=FakeLM(fail_times=99))
    assert broken.errors == 1
    assert broken.matched == 0.0
    assert "scripted failure" in (broken.results[0].error or "")


def test_stage_names() -> None:
    assert stage_name("stages[0]") == "decompose"
    assert stage_name("stages[2].stage[1].stages[0]").strip() == "retrieve"
    assert stage_name("stages[2].stage[0].stages[1]").strip() == "extract fact"
    assert stage_name("stages[9]") == "stages[9]"


def test_with_train_demos_adds_labeled_demos_without_model_calls() -> None:
    from stageflow.apps.multihop.evaluate import with_train_demos

    program = build_program(ListRetriever())
    assert with_train_demos(program, 0) is program
    lm = FakeLM()
    with dspy.context(lm=lm):
        shown = with_train_demos(program, 2)
    assert lm.calls == 0
    assert [len(p.demos) for _, p in shown.named_predictors()] == [2, 2, 2]
    assert all(not p.demos for _, p in program.named_predictors())
