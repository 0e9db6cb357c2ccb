"""Declarative pipeline files: building, round trips, the module allowlist and located errors."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import dspy
import pytest
import yaml

import stageflow
from stageflow.errors import ConfigurationError
from stageflow.spec import SpecError, build_pipeline, declared_inputs, dump_spec, load_pipeline, to_spec
from stageflow.testing import FakeLM

COMPONENTS = """
import dspy
import stageflow

LOADED = True

def route(topic):
    return "science" if topic == "science" else "other"

def shout(text):
    return {"shout": text.upper()}

def make_echo(field="text", to="echo"):
    return stageflow.stage(lambda **kw: {to: kw[field]}, reads=[field], writes=[to], name="echo")

def stop_after_two(state, history):
    return len(history) >= 2

def first(members):
    return dict(members[0])

def explode(text):
    raise ValueError("component exploded")

class Answerer(dspy.Module):
    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.predict(question=question)

NOT_A_STAGE = 42
"""

FULL = """\
version: 1
name: everything
inputs: [question]
outputs: [answer]
nodes:
  root:
    type: pipeline
    stages:
    - predict: 'question -> topic'
      instructions: Name the topic in one word.
    - type: conditional
      router: {component: 'sfcomponents:route'}
      branches:
        science: expert
        other: {chain_of_thought: 'question -> answer'}
      default: other
    - type: parallel
      groups:
      - - predict: 'question, answer -> critique'
        - predict: 'question, answer -> score: float'
      merger:
        on_clash: list
    - type: ensemble
      processors:
      - predict: 'question -> answer'
      - chain_of_thought: 'question -> answer'
      aggregator:
        strategy: consensus
        threshold: 0.6
      quorum: 2
    - type: iterative
      stages:
      - predict: 'question, answer -> improved, quality_score: float'
      stopping_condition:
        quality_threshold: 0.8
      max_iterations: 3
    - predict: 'answer -> claims: list[str]'
    - type: foreach
      stage:
        predict: 'claim -> verdict: bool'
      over: claims
      max_concurrency: 2
      on_error: skip
    - component: sfcomponents:make_echo
      args:
        field: answer
        to: final
  expert:
    predict: 'question -> answer'
    inputs:
      question: question
    outputs:
      answer: answer
"""


@pytest.fixture
def components(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "sfcomponents.py").write_text(COMPONENTS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sfcomponents", raising=False)
    return "sfcomponents"


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


QA = """\
version: 1
inputs: [question]
nodes:
  root:
    type: pipeline
    stages:
    - predict: 'question -> sub_questions: list[str]'
    - type: foreach
      stage: lookup
      over: sub_questions
      collect:
        fact: facts
        passages: passages
    - chain_of_thought: question, facts -> answer
  lookup:
    type: pipeline
    stages:
    - bm25: corpus.jsonl
      k: 2
      inputs:
        query: sub_question
    - predict: 'sub_question, passages: list[str] -> fact'
"""


def corpus(tmp_path: Path, lines: int = 3) -> Path:
    path = tmp_path / "corpus.jsonl"
    words = ["alpha", "beta", "gamma", "delta"]
    docs = [{"id": f"d{i}", "title": f"T{i}", "text": f"The {words[i]} fact."} for i in range(lines)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


# -- building and running ---------------------------------------------------------------------------


def test_a_yaml_pipeline_builds_checks_and_runs(tmp_path: Path) -> None:
    corpus(tmp_path)
    pipeline = load_pipeline(write(tmp_path, QA))
    assert isinstance(pipeline, stageflow.SequentialPipeline)
    assert declared_inputs(pipeline) == ["question"]
    assert [n for n, _ in pipeline.named_predictors()] == [
        "stages[0]",
        "stages[1].stage.stages[1]",
        "stages[2].predict",
    ]
    lm = FakeLM({"sub_questions": ["beta?", "gamma?"], "fact": lambda i: i["passages"][0]})
    with dspy.context(lm=lm):
        result = pipeline(question="What about beta and gamma?")
    assert result.facts == ["T1: The beta fact.", "T2: The gamma fact."]
    assert result.passages == [["T1: The beta fact."], ["T2: The gamma fact."]]  # only matching passages


def test_every_node_type_builds(tmp_path: Path, components: str) -> None:
    pipeline = load_pipeline(write(tmp_path, FULL), allow_modules=[components])
    stages = pipeline.stages
    assert type(stages[1]) is stageflow.BranchingPipeline
    assert type(stages[2]) is stageflow.ParallelPipeline
    assert stages[2].merger.on_clash == "list"
    assert type(stages[3]) is stageflow.EnsemblePipeline
    assert stages[3].quorum == 2
    assert stages[4].max_iterations == 3
    assert stages[4].stopping_condition.quality_threshold == 0.8
    assert stages[6].on_error == "skip"
    assert stages[6].item == "claim"
    assert "verdicts" in pipeline.check(["question"])


def test_a_single_module_root_is_wrapped(tmp_path: Path) -> None:
    pipeline = load_pipeline(write(tmp_path, "root: {predict: 'question -> answer'}\n"))
    assert isinstance(pipeline, stageflow.SequentialPipeline)
    assert pipeline.check(["question"]) == ("answer", "question")


def test_shared_named_nodes_are_built_once(tmp_path: Path) -> None:
    text = """\
    nodes:
      root: {type: pipeline, stages: [step, {type: iterative, stages: [step], stopping_condition: {}}]}
      step: {predict: 'question -> answer, quality_score: float'}
    """
    pipeline = load_pipeline(write(tmp_path, text))
    assert pipeline.stages[0] is pipeline.stages[1].stages[0]
    assert [n for n, _ in pipeline.named_predictors()] == ["stages[0]"]


# -- round trip ---------------------------------------------------------------------------------------


def test_round_trip_of_the_canonical_form(tmp_path: Path, components: str) -> None:
    for text in (QA, FULL):
        corpus(tmp_path)
        path = write(tmp_path, text)
        pipeline = load_pipeline(path, allow_modules=[components])
        spec = to_spec(pipeline)
        assert spec == yaml.safe_load(text)
        rebuilt = build_pipeline(spec, allow_modules=[components], base_dir=tmp_path)
        assert to_spec(rebuilt) == spec
        assert [n for n, _ in rebuilt.named_predictors()] == [n for n, _ in pipeline.named_predictors()]


def test_dump_spec_writes_yaml_and_json_that_load_back(tmp_path: Path) -> None:
    corpus(tmp_path)
    spec = to_spec(load_pipeline(write(tmp_path, QA)))
    for name in ("out.yaml", "out.json"):
        text = dump_spec(spec, tmp_path / name)
        assert (tmp_path / name).read_text(encoding="utf-8") == text
        assert to_spec(load_pipeline(tmp_path / name)) == spec
    assert not list(tmp_path.glob(".*.tmp"))


def test_to_spec_of_a_hand_built_pipeline_and_of_a_compiled_copy() -> None:
    pipeline = stageflow.SequentialPipeline(
        [
            dspy.Predict(dspy.Signature("question -> draft", "Write a first draft.")),
            stageflow.Stage(dspy.ChainOfThought("question, context -> answer"), inputs={"context": "draft"}),
        ]
    )
    spec = to_spec(pipeline)
    assert spec["nodes"]["root"]["stages"] == [
        {"predict": "question -> draft", "instructions": "Write a first draft."},
        {"chain_of_thought": "question, context -> answer", "inputs": {"context": "draft"}},
    ]
    rebuilt = build_pipeline(spec)
    assert rebuilt.check(["question"]) == pipeline.check(["question"])

    trainset = [dspy.Example(question="q", answer="a").with_inputs("question")]
    optimizer = dspy.BootstrapFewShot(metric=lambda *a, **k: True, max_bootstrapped_demos=1)
    with dspy.context(lm=FakeLM({"answer": "a"})):
        compiled = optimizer.compile(rebuilt, trainset=trainset)
    assert to_spec(compiled) == spec


def test_to_spec_refuses_plain_functions() -> None:
    pipeline = stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": 1}, writes=["n"])])
    with pytest.raises(ConfigurationError) as info:
        to_spec(pipeline)
    assert info.value.code == "not_expressible"
    assert "component" in str(info.value)


# -- the allowlist ---------------------------------------------------------------------------------


def test_components_need_an_allowed_module_and_are_not_imported_otherwise(
    tmp_path: Path, components: str
) -> None:
    path = write(tmp_path, FULL)
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert info.value.code == "module_not_allowed"
    assert "--allow-module sfcomponents" in str(info.value)
    assert components not in sys.modules
    with pytest.raises(SpecError):
        load_pipeline(path, allow_modules=["sfcomp"])  # a prefix of the name is not its package
    assert components not in sys.modules


@pytest.mark.parametrize(
    ("ref", "code"),
    [
        ("sfcomponents:nope", "unknown_component"),
        ("sfcomponents:_private", "bad_component"),
        ("sfcomponents:route.__globals__", "bad_component"),
        ("sfcomponents.route", "bad_component"),
        ("__import__('os').system('x')", "bad_component"),
        ("sfcomponents:NOT_A_STAGE", "not_a_stage"),
        ("sfcomponents_missing:x", "module_not_allowed"),
    ],
)
def test_bad_component_references(tmp_path: Path, components: str, ref: str, code: str) -> None:
    path = write(tmp_path, f"root: {{component: {json.dumps(ref)}}}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(path, allow_modules=[components])
    assert info.value.code == code
    assert info.value.line == 1


def test_unknown_component_lists_what_exists(tmp_path: Path, components: str) -> None:
    path = write(tmp_path, "root: {component: 'sfcomponents:shuot'}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(path, allow_modules=[components])
    assert "'shout'" in str(info.value)
    assert "make_echo" in str(info.value)


def test_component_kinds(tmp_path: Path, components: str) -> None:
    text = """\
    nodes:
      root:
        type: pipeline
        stages:
        - {component: 'sfcomponents:shout', writes: [shout]}
        - {component: 'sfcomponents:Answerer', inputs: {question: shout}}
    """
    pipeline = load_pipeline(write(tmp_path, text), allow_modules=[components])
    with dspy.context(lm=FakeLM({"answer": lambda i: i["question"] + "!"})):
        assert pipeline(text="hi").answer == "HI!"
    assert to_spec(pipeline)["nodes"]["root"]["stages"][1] == {
        "component": "sfcomponents:Answerer",
        "inputs": {"question": "shout"},
    }


def test_python_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "root: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert info.value.code == "invalid_yaml"


# -- errors point at the file, line and key --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "key", "code"),
    [
        (
            "nodes:\n  root:\n    type: pipeline\n    stages:\n    - predict: 'q -> a'\n   - x\n",
            6,
            None,
            "invalid_yaml",
        ),
        ("nodes:\n  root:\n    type: pipline\n", 3, "nodes.root.type", "bad_node"),
        ("nodes:\n  root:\n    type: pipeline\n    stagse: []\n", 4, "nodes.root.stagse", "unknown_key"),
        (
            "nodes:\n  root:\n    type: pipeline\n    stages: [a, b]\n  a: {predict: 'q -> x'}\n",
            4,
            "nodes.root.stages[1]",
            "unknown_node",
        ),
        (
            "root:\n  type: pipeline\n  stages:\n  - predict: 'q -> -> a'\n",
            4,
            "root.stages[0].predict",
            "bad_signature",
        ),
        (
            "nodes:\n  root: {predict: 'q -> a'}\n  root: {predict: 'q -> b'}\n",
            3,
            "nodes.root",
            "duplicate_key",
        ),
        (
            "nodes:\n  root: {predict: 'q -> a'}\n  spare: {predict: 'q -> b'}\n",
            3,
            "nodes.spare",
            "unused_node",
        ),
        (
            "nodes:\n  root: {type: pipeline, stages: [a]}\n  a: {type: pipeline, stages: [root]}\n",
            3,
            "nodes.a.stages[0]",
            "cycle",
        ),
        (
            "inputs: [question]\nroot:\n  type: pipeline\n  stages:\n  - predict: 'question -> draft'\n"
            "  - predict: 'context, draft -> answer'\n",
            6,
            "root.stages[1].predict",
            "missing_input",
        ),
        ("inputs: [q]\noutputs: [answer]\nroot: {predict: 'q -> a'}\n", 2, "outputs", "missing_output"),
        (
            "root:\n  type: foreach\n  over: xs\n  stage: {predict: 'x -> y, z'}\n  collect: ys\n",
            1,
            "root",
            "bad_option",
        ),
        ("version: 2\nroot: {predict: 'q -> a'}\n", 1, "version", "bad_spec"),
        ("- just\n- a list\n", 1, None, "bad_spec"),
    ],
)
def test_errors_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str | None, code: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    err = info.value
    assert isinstance(err, ConfigurationError)
    assert (err.line, err.key, err.code) == (line, key, code), str(err)
    assert str(err).startswith(f"{path}, line {line}")


def test_json_errors_have_lines_too(tmp_path: Path) -> None:
    path = write(
        tmp_path, '{\n  "root": {\n    "predict": "q -> a",\n    "instructoins": "x"\n  }\n}\n', "p.json"
    )
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert (info.value.line, info.value.key, info.value.code) == (4, "root.instructoins", "unknown_key")
    assert "did you mean 'instructions'" in str(info.value)
    bad = write(tmp_path, '{"root": {"predict": "q -> a",}}', "bad.json")
    with pytest.raises(SpecError) as info:
        load_pipeline(bad)
    assert info.value.code == "invalid_json"
    assert info.value.line == 1


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_pipeline(tmp_path / "nope.yaml")
    assert info.value.code == "spec_not_found"
    with pytest.raises(SpecError, match="empty file"):
        load_pipeline(write(tmp_path, ""))


def test_an_empty_corpus_is_reported_at_the_bm25_key(tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_pipeline(write(tmp_path, QA))
    assert (info.value.code, info.value.key, info.value.line) == (
        "empty_corpus",
        "nodes.lookup.stages[0].bm25",
        18,
    )


def test_explicit_inputs_override_the_declared_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "root: {predict: 'question -> answer'}\n")
    assert load_pipeline(path, inputs=["question"]).check(["question"])
    with pytest.raises(SpecError) as info:
        load_pipeline(path, inputs=["context"])
    assert info.value.code == "missing_input"


def test_build_pipeline_rejects_non_mappings() -> None:
    with pytest.raises(SpecError):
        build_pipeline(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_alias_bombs_do_not_blow_up(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 25)]
    path = write(tmp_path, "\n".join(lines) + "\nroot: {predict: 'q -> a'}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert info.value.code == "too_large"  # 25 lines, 2**26 values: refused before anything expands them


def test_the_shipped_multihop_example_is_canonical_and_runs() -> None:
    from stageflow.examples import example_path

    path = example_path("multihop.yaml")
    pipeline = load_pipeline(path)
    assert to_spec(pipeline) == yaml.safe_load(path.read_text(encoding="utf-8"))
    lm = FakeLM({"sub_questions": ["Who painted The Starry Night?"], "answer": "Zundert"})
    with dspy.context(lm=lm):
        result = pipeline(question="In which town was the painter of The Starry Night born?")
    assert result.answer == "Zundert"
    assert "Starry Night" in result.passages[0][0]


def test_wrong_value_types_are_located(tmp_path: Path) -> None:
    text = "root:\n  type: iterative\n  stages: [{predict: 'q -> a, quality_score: float'}]\n"
    text += "  stopping_condition: {quality_threshold: high}\n"
    with pytest.raises(SpecError) as info:
        load_pipeline(write(tmp_path, text))
    assert (info.value.code, info.value.key, info.value.line) == ("bad_option", "root", 1)
    assert info.value.field == "quality_threshold"
    with pytest.raises(SpecError) as info:
        load_pipeline(
            write(tmp_path, "root: {type: foreach, over: xs, stage: {predict: 'x -> y'}, timeout: soon}\n")
        )
    assert (info.value.code, info.value.key) == ("bad_value", "root.timeout")


def test_a_merge_key_and_a_key_it_overrides_are_not_duplicates(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "inputs: [question]\nnodes:\n  base: &b {predict: 'question -> answer', instructions: A}\n"
        "  root:\n    type: pipeline\n    stages:\n    - <<: *b\n      instructions: B\n    - base\n",
    )
    p = load_pipeline(path)
    assert [s.signature.instructions for s in p.stages] == ["B", "A"]


def test_a_duplicate_key_in_a_json_file_does_not_blame_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, '{"root": {"predict": "q -> a", "predict": "q -> b"}}', "p.json")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert info.value.code == "duplicate_key"
    assert "YAML" not in str(info.value)


def test_a_negative_literal_is_not_called_an_unknown_type(tmp_path: Path) -> None:
    path = write(tmp_path, "inputs: [q]\nroot: {predict: 'q -> score: Literal[-1, 0, 1]'}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert "not one a pipeline file can use" not in str(info.value)  # DSPy's own limit, named as such


@pytest.mark.parametrize(
    ("over", "reads"), [("boxes", "box"), ("caches", "cache"), ("sub_questions", "sub_question")]
)
def test_a_foreach_whose_item_is_the_default_round_trips_without_it(over: str, reads: str) -> None:
    # (helper 115: a spec saved without item: must load with the item the stage reads)
    each = stageflow.ForEach(dspy.Predict(f"{reads} -> size"), over=over)
    spec = to_spec(stageflow.SequentialPipeline([each]))
    assert "item" not in json.dumps(spec)
    rebuilt = build_pipeline(spec)
    assert rebuilt.stages[0].item == reads
    assert to_spec(rebuilt) == spec
