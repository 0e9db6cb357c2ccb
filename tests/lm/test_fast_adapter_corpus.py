"""The fast adapters against DSPy's own, one signature at a time: same prompts, same parses.

Every case of the corpus runs through ``ChatAdapter`` and ``JSONAdapter`` and their fast twins:
``format`` (twice: the second call uses the cached parts), ``parse`` of several answers (the
canonical one and malformed ones, errors included), and a whole ``dspy.Predict`` call, sync and
async, comparing what the LM received, the history entry and the prediction. The first-call
self-check of the fast adapters is switched off here, so what is compared is the fast path's
own output.
"""

from __future__ import annotations

import asyncio
import enum
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import dspy
import pydantic
import pytest
from dspy.lm15 import Message, Response, Usage

from stageflow.lm.fast import FastChatAdapter, FastJSONAdapter, fast_path_stats, reset_fast_path_stats
from stageflow.lm.fast import adapters as fast_adapters

# -- a scripted LM that records what it was sent ----------------------------------------------


class _Engine:
    def __init__(self, owner: ScriptedLM, schema: bool) -> None:
        self.owner = owner
        self.supports_response_schema = schema
        self.supported_params = frozenset({"response_format", "temperature", "max_tokens"} if schema else ())

    def __deepcopy__(self, memo: dict[int, Any]) -> _Engine:
        return self

    def complete(self, request: Any) -> Response:
        return self.owner._answer(request)

    def stream(self, request: Any) -> Any:
        """The answer in chunks of a few characters (for streaming listeners)."""
        from dataclasses import replace

        from dspy.lm15 import response_to_events

        for event in response_to_events(self.complete(request)):
            if event.type != "delta":
                yield event
                continue
            text = event.delta.text
            for i in range(0, len(text), 4):
                yield replace(event, delta=replace(event.delta, text=text[i : i + 4]))


class _AsyncEngine(_Engine):
    async def complete(self, request: Any) -> Response:  # type: ignore[override]
        return self.owner._answer(request)


class ScriptedLM(dspy.LM):  # type: ignore[misc]
    """Answers with ``answers`` in turn (the last one repeats) and keeps every request."""

    def __init__(self, answers: list[str], *, schema: bool = False, model: str = "test/scripted") -> None:
        self.answers = list(answers)
        self.requests: list[Any] = []
        super().__init__(
            model,
            engine=_Engine(self, schema),
            async_engine=_AsyncEngine(self, schema),
            cache=False,
            num_retries=0,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> ScriptedLM:
        return self

    def _answer(self, request: Any) -> Response:
        self.requests.append(request)
        text = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return Response(
            id=None,
            model=self.model,
            message=Message.assistant(text),
            finish_reason="stop",
            usage=Usage(input_tokens=7, output_tokens=3, total_tokens=10),
        )


def typed(value: Any) -> Any:
    """A comparable form of ``value`` that keeps every type (1 != 1.0 != True here)."""
    if isinstance(value, pydantic.BaseModel):
        return (type(value), typed(value.model_dump()))
    if isinstance(value, dict):
        return (type(value), tuple((k, typed(v)) for k, v in value.items()))
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return (type(value), tuple(typed(v) for v in items))
    return (type(value), value)


def outcome(fn: Any) -> Any:
    try:
        return ("ok", typed(fn()))
    except Exception as e:
        return ("error", type(e), str(e))


@pytest.fixture
def raw_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compare the fast path's own output, not its first-call self-check."""
    monkeypatch.setattr(fast_adapters, "VERIFY_FIRST_CALL", False)


# -- the corpus --------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Person(pydantic.BaseModel):
    name: str
    age: int


class Address(pydantic.BaseModel):
    street: str
    city: str | None = None
    tags: list[str] = pydantic.Field(default_factory=list)


class Order(pydantic.BaseModel):
    id: int
    buyer: Person
    items: list[str]
    note: Optional[str] = None  # noqa: UP045 (the typing spelling is part of the corpus)
    address: Address | None = None


@dataclass
class Unusual:
    """A type the fast path does not cover (it must hand the signature to DSPy)."""

    label: str


def sig(spec: str, instructions: str | None = None, **types: Any) -> type[dspy.Signature]:
    s = dspy.Signature(spec, instructions) if instructions is not None else dspy.Signature(spec)
    for name, t in types.items():
        s = s.with_updated_fields(name, type_=t)
    return s


class Described(dspy.Signature):
    """Answer the question using the context.

        Keep it short; indented lines stay indented.
    Cite nothing."""

    context: list[str] = dspy.InputField(desc="passages that may help")
    question: str = dspy.InputField(desc="a question — with unicode ✓")
    answer: str = dspy.OutputField(desc="often between 1 and 5 words")
    confidence: float = dspy.OutputField(desc="0 to 1")


class Defaults(dspy.Signature):
    """Outputs with defaults and optional inputs."""

    text: str = dspy.InputField()
    hint: Optional[str] = dspy.InputField(default=None)  # noqa: UP045
    label: str = dspy.OutputField()
    score: int = dspy.OutputField(default=0)
    extra: list[str] = dspy.OutputField(default_factory=list)
    maybe: str | None = dspy.OutputField()


class WithHistory(dspy.Signature):
    """Chat with memory."""

    question: str = dspy.InputField()
    history: dspy.History = dspy.InputField()
    answer: str = dspy.OutputField()


class WithImage(dspy.Signature):
    """Describe the image."""

    image: dspy.Image = dspy.InputField()
    caption: str = dspy.OutputField()


class WithTools(dspy.Signature):
    """Pick a tool."""

    question: str = dspy.InputField()
    tools: list[dspy.Tool] = dspy.InputField()
    calls: dspy.ToolCalls = dspy.OutputField()


class WithUnusual(dspy.Signature):
    """An output of a type the fast path leaves to DSPy."""

    question: str = dspy.InputField()
    thing: Unusual = dspy.OutputField()


def _add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def cot(spec: str | type[dspy.Signature], **types: Any) -> type[dspy.Signature]:
    base = sig(spec, **types) if isinstance(spec, str) else spec
    return dspy.ChainOfThought(base).predict.signature


@dataclass
class Case:
    id: str
    signature: type[dspy.Signature]
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    demos: list[Any] = field(default_factory=list)
    fast: bool = True


ORDER = Order(id=7, buyer=Person(name="Ada", age=36), items=["tea", "cake"], address=Address(street="Main"))
EX = dspy.Example

CASES = [
    Case("str-1-1", sig("question -> answer"), {"question": "What is 2+2?"}, {"answer": "4"}),
    Case("str-2-1", sig("question, context -> answer"), {"question": "q", "context": "c"}, {"answer": "a"}),
    Case(
        "str-3-3", sig("a, b, c -> x, y, z"), {"a": "1", "b": "2", "c": "3"}, {"x": "x", "y": "y", "z": "z"}
    ),
    Case(
        "described",
        Described,
        {"context": ["first «passage»", "second\nline"], "question": "Où? ✓"},
        {"answer": "Paris", "confidence": 0.9},
    ),
    Case(
        "unicode-instructions",
        sig("question -> answer", "Réponds en français — «court». 日本語で 🚀\n  indented\n\ttab"),
        {"question": "Ça va?"},
        {"answer": "Oui 🙂"},
    ),
    Case("empty-instructions", sig("question -> answer", ""), {"question": "q"}, {"answer": "a"}),
    Case("int-out", sig("question -> n", n=int), {"question": "how many?"}, {"n": 3}),
    Case("float-out", sig("question -> x", x=float), {"question": "pi?"}, {"x": 3.14}),
    Case("bool-out", sig("claim -> verdict", verdict=bool), {"claim": "sky is blue"}, {"verdict": True}),
    Case("list-str-out", sig("topic -> items", items=list[str]), {"topic": "fruit"}, {"items": ["a", "b"]}),
    Case("list-int-out", sig("topic -> ns", ns=list[int]), {"topic": "primes"}, {"ns": [2, 3, 5]}),
    Case("dict-out", sig("text -> counts", counts=dict[str, int]), {"text": "a a b"}, {"counts": {"a": 2}}),
    Case(
        "dict-list-out",
        sig("text -> groups", groups=dict[str, list[str]]),
        {"text": "x"},
        {"groups": {"k": ["v1", "v2"]}},
    ),
    Case(
        "literal-str",
        sig("claim -> verdict", verdict=Literal["yes", "no"]),
        {"claim": "c"},
        {"verdict": "yes"},
    ),
    Case("literal-int", sig("q -> pick", pick=Literal[1, 2, 3]), {"q": "pick"}, {"pick": 2}),
    Case(
        "literal-quotes",
        sig("q -> pick", pick=Literal["it's", 'say "hi"', "plain"]),
        {"q": "q"},
        {"pick": "it's"},
    ),
    Case("literal-mixed", sig("q -> pick", pick=Literal["a", 1, True]), {"q": "q"}, {"pick": 1}),
    Case("optional-str", sig("q -> a", a=Optional[str]), {"q": "q"}, {"a": "maybe"}),  # noqa: UP045
    Case("pipe-none", sig("q -> a", a=str | None), {"q": "q"}, {"a": None}),
    Case("optional-int", sig("q -> n", n=Optional[int]), {"q": "q"}, {"n": 4}),  # noqa: UP045
    Case("union-int-str", sig("q -> v", v=Union[int, str]), {"q": "q"}, {"v": 5}),  # noqa: UP007
    Case(
        "model-out",
        sig("text -> person", person=Person),
        {"text": "Ada, 36"},
        {"person": Person(name="A", age=1)},
    ),
    Case(
        "list-model-out",
        sig("text -> people", people=list[Person]),
        {"text": "t"},
        {"people": [Person(name="B", age=2)]},
    ),
    Case("nested-model-out", sig("text -> order", order=Order), {"text": "t"}, {"order": ORDER}),
    Case("enum-out", sig("q -> color", color=Color), {"q": "q"}, {"color": Color.RED}),
    Case("tuple-out", sig("q -> pair", pair=tuple[int, str]), {"q": "q"}, {"pair": (1, "a")}),
    Case("any-out", sig("q -> blob", blob=Any), {"q": "q"}, {"blob": {"k": [1, 2]}}),
    Case(
        "annotated-out",
        sig("q -> n", n=pydantic.conint(ge=0)),
        {"q": "q"},
        {"n": 3},
    ),
    Case("set-out", sig("q -> tags", tags=set[str]), {"q": "q"}, {"tags": {"x"}}),
    Case("list-literal-out", sig("q -> ls", ls=list[Literal["a", "b"]]), {"q": "q"}, {"ls": ["a"]}),
    Case(
        "dict-model-out",
        sig("q -> m", m=dict[str, Person]),
        {"q": "q"},
        {"m": {"k": Person(name="C", age=3)}},
    ),
    Case("nested-list-out", sig("q -> grid", grid=list[list[int]]), {"q": "q"}, {"grid": [[1], [2, 3]]}),
    Case("defaults", Defaults, {"text": "t"}, {"label": "L", "score": 2, "extra": ["e"], "maybe": None}),
    Case(
        "defaults-hint",
        Defaults,
        {"text": "t", "hint": "h"},
        {"label": "L", "score": 1, "extra": [], "maybe": "m"},
    ),
    Case(
        "list-input", sig("docs -> summary"), {"docs": ["one", "two «x»", "three\nlines"]}, {"summary": "s"}
    ),
    Case("list-input-1", sig("docs -> summary"), {"docs": ["only"]}, {"summary": "s"}),
    Case("list-input-0", sig("docs -> summary"), {"docs": []}, {"summary": "s"}),
    Case("typed-list-input", sig("ns -> total", ns=list[int], total=int), {"ns": [1, 2]}, {"total": 3}),
    Case("int-input", sig("n -> doubled", n=int, doubled=int), {"n": 21}, {"doubled": 42}),
    Case("float-input", sig("x -> y", x=float), {"x": 0.1}, {"y": "0.1"}),
    Case("bool-input", sig("flag -> y", flag=bool), {"flag": False}, {"y": "n"}),
    Case(
        "dict-input",
        sig("data -> y", data=dict[str, Any]),
        {"data": {"a": [1, {"b": None}], "é": "ü"}},
        {"y": "y"},
    ),
    Case("model-input", sig("order -> summary", order=Order), {"order": ORDER}, {"summary": "s"}),
    Case(
        "models-input",
        sig("people -> oldest", people=list[Person]),
        {"people": [Person(name="D", age=4)]},
        {"oldest": "D"},
    ),
    Case("none-input", sig("q, hint -> a", hint=Optional[str]), {"q": "q", "hint": None}, {"a": "a"}),  # noqa: UP045
    Case("missing-input", sig("q, hint -> a", hint=Optional[str]), {"q": "q"}, {"a": "a"}),  # noqa: UP045
    Case("int-into-str-field", sig("q -> a"), {"q": 5}, {"a": "a"}),
    Case("model-into-str-field", sig("q -> a"), {"q": Person(name="E", age=5)}, {"a": "a"}),
    Case("cot", cot("question -> answer"), {"question": "q"}, {"reasoning": "because", "answer": "a"}),
    Case("cot-typed", cot("question -> n", n=int), {"question": "q"}, {"reasoning": "r", "n": 1}),
    Case(
        "cot-model",
        cot("text -> person", person=Person),
        {"text": "t"},
        {"reasoning": "r", "person": Person(name="F", age=6)},
    ),
    Case(
        "demos-full",
        sig("question -> answer"),
        {"question": "q3"},
        {"answer": "a3"},
        demos=[EX(question="q1", answer="a1"), EX(question="q2", answer="a2")],
    ),
    Case(
        "demos-dicts",
        sig("question -> answer"),
        {"question": "q3"},
        {"answer": "a3"},
        demos=[{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2", "extra": "ignored"}],
    ),
    Case(
        "demos-partial",
        cot("question -> answer"),
        {"question": "q"},
        {"reasoning": "r", "answer": "a"},
        demos=[
            EX(question="labeled", answer="no reasoning"),  # incomplete: input + output
            EX(question="input only"),  # dropped by DSPy
            EX(question="q1", reasoning="r1", answer="a1", augmented=True),  # bootstrapped
        ],
    ),
    Case(
        "demos-typed",
        sig("question -> n, tags", n=int, tags=list[str]),
        {"question": "q"},
        {"n": 2, "tags": ["t"]},
        demos=[EX(question="q1", n=1, tags=["a", "b"]), EX(question="q2", n=None, tags=[])],
    ),
    Case(
        "demos-model",
        sig("text -> person", person=Person),
        {"text": "t"},
        {"person": Person(name="G", age=7)},
        demos=[EX(text="t1", person=Person(name="H", age=8))],  # not keyable: formatted every call
    ),
    Case(
        "demos-unicode",
        sig("question -> answer", "Traduis. 🌍"),
        {"question": "chat"},
        {"answer": "cat"},
        demos=[EX(question="chien «x»", answer="dog\nline")],
    ),
    Case(
        "demos-json",
        sig("question -> answer, counts", counts=dict[str, int]),
        {"question": "q"},
        {"answer": "a", "counts": {"x": 1}},
        demos=[EX(question="q1", answer="a1", counts={"y": 2, "z": 0})],
    ),
    Case(
        "history",
        WithHistory,
        {"question": "q", "history": dspy.History(messages=[{"question": "q0", "answer": "a0"}])},
        {"answer": "a"},
        fast=False,
    ),
    Case(
        "image",
        WithImage,
        {"image": dspy.Image("https://example.com/cat.png")},
        {"caption": "a cat"},
        fast=False,
    ),
    Case(
        "image-in-str-field",
        sig("q -> a"),
        {"q": dspy.Image("https://example.com/dog.png")},
        {"a": "a"},
        fast=False,  # the signature is covered, but this value makes the prompt DSPy's job
    ),
    Case(
        "tools",
        WithTools,
        {"question": "add", "tools": [dspy.Tool(_add)]},
        {"calls": {"tool_calls": [{"name": "_add", "args": {"a": 1, "b": 2}}]}},
        fast=False,
    ),
    Case("unusual-type", WithUnusual, {"question": "q"}, {"thing": Unusual(label="x")}, fast=False),
]


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 50
    assert sum(c.fast for c in CASES) >= 50


KINDS = {"chat": (dspy.ChatAdapter, FastChatAdapter), "json": (dspy.JSONAdapter, FastJSONAdapter)}


def canonical_answer(kind: str, case: Case) -> str:
    plain = KINDS[kind][0]()
    if kind == "chat":
        return plain.format_assistant_message_content(case.signature, case.outputs)  # type: ignore[no-any-return]
    return plain.format_field_with_value(  # type: ignore[no-any-return]
        {_named(case.signature, k): v for k, v in case.outputs.items()}, role="assistant"
    )


def _named(signature: type[dspy.Signature], name: str) -> Any:
    from dspy.adapters.chat_adapter import FieldInfoWithName

    return FieldInfoWithName(name=name, info=signature.output_fields[name])


def answers(kind: str, case: Case) -> list[str]:
    """The canonical answer and malformed variants (some parse, some raise)."""
    good = canonical_answer(kind, case)
    first = next(iter(case.signature.output_fields))
    variants = [
        good,
        "Sure, here you go.\n" + good + "\n\nThanks!",
        "",
        "no structure at all",
        good.replace("[[ ## ", "   [[ ## ", 1),
    ]
    names = list(case.signature.output_fields)

    def chat_with(value: str) -> str:
        return "".join(f"[[ ## {n} ## ]]\n{value}\n\n" for n in names) + "[[ ## completed ## ]]"

    def json_with(value: Any) -> str:
        return json.dumps(dict.fromkeys(names, value))

    if kind == "chat":
        variants += [
            f"[[ ## {first} ## ]] inline value\n\n" + good,  # duplicate header: the first one wins
            good.split("\n\n[[ ## completed")[0].rsplit("[[ ## ", 1)[0],  # last field missing
            f"[[ ## {first} ## ]]\nnot a valid value {{[\n\n[[ ## completed ## ]]",
            *(chat_with(v) for v in ("42", "3.0", "true", "['x', 'y']", "null", "Literal['yes']", "'it's'")),
            *(chat_with(v) for v in ('"no"', "red", "GREEN", "[1, 'a']", '{"name": "Z", "age": "9"}')),
        ]
    else:
        variants += [
            "```json\n" + good + "\n```",
            "[1, 2, 3]",
            '{"' + first + '": ',
            '{"' + first + '": {"unexpected": ["shape"]}}',
            "prefix text " + good.replace("\n", " ") + " trailing",
            *(json_with(v) for v in ("  padded  ", 42, "42", 3.5, None, True, [1, "a"], ["x", "y"], "yes")),
            *(json_with(v) for v in ({"name": "Z", "age": "9"}, "red", "Literal['no']", {"k": 1})),
        ]
    return variants


IDS = [c.id for c in CASES]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_format_is_identical(case: Case, kind: str, raw_fast_path: None) -> None:
    plain_cls, fast_cls = KINDS[kind]
    plain, fast = plain_cls(), fast_cls()
    expected = plain.format(case.signature, case.demos, case.inputs)
    assert fast.format(case.signature, case.demos, case.inputs) == expected
    assert fast.format(case.signature, case.demos, case.inputs) == expected  # from the cached parts


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parse_is_identical(case: Case, kind: str, raw_fast_path: None) -> None:
    plain_cls, fast_cls = KINDS[kind]
    plain, fast = plain_cls(), fast_cls()
    for text in answers(kind, case) + answers("json" if kind == "chat" else "chat", case):
        expected = outcome(lambda t=text: plain.parse(case.signature, t))
        assert outcome(lambda t=text: fast.parse(case.signature, t)) == expected, text
        assert outcome(lambda t=text: fast.parse(case.signature, t)) == expected, text


def _run_predict(adapter: Any, case: Case, answer: str, mode: str, *, schema: bool) -> dict[str, Any]:
    lm = ScriptedLM([answer], schema=schema)
    predictor = dspy.Predict(case.signature)
    predictor.demos = list(case.demos)
    with dspy.context(lm=lm, adapter=adapter):
        if mode == "sync":
            result = outcome(lambda: predictor(**case.inputs))
        else:
            result = outcome(lambda: asyncio.run(predictor.acall(**case.inputs)))
    entry = lm.history[-1] if lm.history else {}
    kwargs = dict(entry.get("kwargs", {}))
    if isinstance(kwargs.get("response_format"), type):
        kwargs["response_format"] = kwargs["response_format"].model_json_schema()
    from dspy._vendor.lm15.serde import request_to_dict

    return {
        "result": result,
        "messages": entry.get("messages"),
        "kwargs": kwargs,
        "outputs": entry.get("outputs"),
        "requests": [request_to_dict(r) for r in lm.requests],
        "calls": len(lm.history),
    }


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_predict_call_is_identical(case: Case, kind: str, mode: str, raw_fast_path: None) -> None:
    plain_cls, fast_cls = KINDS[kind]
    answer = canonical_answer(kind, case)
    schema = kind == "json"  # JSON: an LM with structured outputs, so the schema path runs too
    reset_fast_path_stats()
    expected = _run_predict(plain_cls(), case, answer, mode, schema=schema)
    got = _run_predict(fast_cls(), case, answer, mode, schema=schema)
    assert got == expected
    stats = fast_path_stats()
    if case.fast:
        assert stats.fast_calls >= 1
    else:
        assert stats.fallback_calls >= 1, stats
        assert stats.fast_calls == 0, stats
