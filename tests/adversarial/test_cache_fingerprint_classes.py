"""Issue 9, caching (follow-up): the fingerprint covers the code of your classes, the module
attributes a function reads, a signature's field types by definition, and your LM's own settings.

Each pair below computes different outputs; before the fix both members of every pair had the same
fingerprint, so a persistent cache served the old program's output after an edit.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import CachedStage, CachePolicy, MemoryStore, SequentialPipeline, Stage
from stageflow.testing import FakeLM, call


def define(source: str, **names: Any) -> dict[str, Any]:
    """Run ``source`` as the body of a module called ``userstages`` (so two versions of a class
    have the same module and qualified name, as after an edit between two runs)."""
    namespace: dict[str, Any] = {"__name__": "userstages", **names}
    exec(textwrap.dedent(source), namespace)
    return namespace


def shared(stage_: Any, policy: CachePolicy, **options: Any) -> SequentialPipeline:
    """A one-stage pipeline whose stage uses ``policy``: two of them share one cache."""
    return SequentialPipeline([Stage(stage_, cache=policy, **options)])


def doubler(k: int) -> Any:
    return define(
        f"""
        class Doubler:
            def __call__(self, x):
                return {{"y": x * {k}}}
        """
    )["Doubler"]()


async def test_a_callable_objects_call_code_is_part_of_the_key(mode: str) -> None:
    policy = CachePolicy(MemoryStore())
    assert (await call(shared(doubler(2), policy, writes=["y"]), mode, x=5)).y == 10
    assert (await call(shared(doubler(3), policy, writes=["y"]), mode, x=5)).y == 15


def test_dunder_methods_are_fingerprinted_but_not_class_bookkeeping() -> None:
    fp = stageflow.fingerprint
    assert fp(doubler(2)) != fp(doubler(3))
    assert fp(doubler(2)) == fp(doubler(2))  # __module__, __dict__, __weakref__ carry no addresses


def my_predict(tag: str) -> Any:
    cls = define(
        f"""
        import dspy
        class MyPredict(dspy.Predict):
            def forward(self, **kw):
                out = super().forward(**kw)
                out.answer = out.answer + {tag!r}
                return out

            async def aforward(self, **kw):
                out = await super().aforward(**kw)
                out.answer = out.answer + {tag!r}
                return out
        """
    )["MyPredict"]
    return cls("question -> answer")


async def test_a_predict_subclass_forward_is_part_of_the_key(mode: str) -> None:
    policy = CachePolicy(MemoryStore())
    with dspy.context(lm=FakeLM({"answer": "A"})):
        assert (await call(shared(my_predict("-v1"), policy), mode, question="q")).answer == "A-v1"
        assert (await call(shared(my_predict("-v2"), policy), mode, question="q")).answer == "A-v2"


async def test_a_predict_subclass_edited_in_place_misses_and_still_hits_when_unchanged(mode: str) -> None:
    """The predictor fast path (a memo per predictor) notices your class and your attributes."""
    pred = my_predict("-v1")
    pred.extra = "a"
    lm = FakeLM({"answer": "A"})
    p = SequentialPipeline([CachedStage(pred)])
    with dspy.context(lm=lm):
        await call(p, mode, question="q")
        hit = await call(p, mode, question="q")
        pred.extra = "b"  # an attribute your subclass uses
        after_attr = await call(p, mode, question="q")
        type(pred).forward = lambda self, **kw: dspy.Prediction(answer="patched")

        async def patched_aforward(self: Any, **kw: Any) -> Any:
            return dspy.Prediction(answer="patched")

        type(pred).aforward = patched_aforward
        patched = await call(p, mode, question="q")
    assert [e.kind for e in hit.run.events] == ["cache_hit"]
    assert [e.kind for e in after_attr.run.events] == []
    assert patched.answer == "patched"
    assert lm.calls == 2


async def test_module_attributes_a_function_reads_are_part_of_the_key(mode: str) -> None:
    cfg = types.ModuleType("cfgmod")
    cfg.FACTOR = 2  # type: ignore[attr-defined]
    cfg.sub = types.ModuleType("cfgmod.sub")  # type: ignore[attr-defined]
    cfg.sub.OFFSET = 0  # type: ignore[attr-defined]
    fn = define("def f(x):\n    return {'y': x * cfgmod.FACTOR + cfgmod.sub.OFFSET}\n", cfgmod=cfg)["f"]
    p = SequentialPipeline([CachedStage(Stage(fn, writes=["y"]))])
    assert (await call(p, mode, x=5)).y == 10
    cfg.FACTOR = 3  # type: ignore[attr-defined]
    assert (await call(p, mode, x=5)).y == 15
    cfg.sub.OFFSET = 1  # type: ignore[attr-defined]  # through a chain of modules
    assert (await call(p, mode, x=5)).y == 16
    again = await call(p, mode, x=5)
    assert [e.kind for e in again.run.events] == ["cache_hit"]


def answer_type(source: str) -> Any:
    return define("import enum, pydantic\n" + textwrap.dedent(source))["Ans"]


def typed_predict(annotation: Any) -> Any:
    return dspy.Predict(
        dspy.Signature({"question": (str, dspy.InputField()), "answer": (annotation, dspy.OutputField())})
    )


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (
            "class Ans(pydantic.BaseModel):\n    text: str\n",
            "class Ans(pydantic.BaseModel):\n    text: str\n    score: int = 7\n",
        ),
        (
            "class Ans(pydantic.BaseModel):\n    n: int = 1\n",
            "class Ans(pydantic.BaseModel):\n    n: int = 2\n",
        ),
        ("class Ans(enum.Enum):\n    RED = 'red'\n", "class Ans(enum.Enum):\n    RED = 'rouge'\n"),
    ],
    ids=["model-gains-a-field", "model-default", "enum-value"],
)
def test_signature_field_types_are_fingerprinted_by_definition(before: str, after: str) -> None:
    fp = stageflow.fingerprint
    old, new = answer_type(before), answer_type(after)
    assert fp(typed_predict(old)) == fp(typed_predict(answer_type(before)))  # stable
    assert fp(typed_predict(old)) != fp(typed_predict(new))
    assert fp(typed_predict(list[old] | None)) != fp(typed_predict(list[new] | None))  # nested


async def test_a_pydantic_output_type_that_gains_a_field_misses(mode: str) -> None:
    old = answer_type("class Ans(pydantic.BaseModel):\n    text: str\n")
    new = answer_type("class Ans(pydantic.BaseModel):\n    text: str\n    score: int = 7\n")
    policy = CachePolicy(MemoryStore())
    with dspy.context(lm=FakeLM({"answer": lambda inputs: {"text": "t", "score": 9}})):
        first = await call(shared(typed_predict(old), policy), mode, question="q")
        second = await call(shared(typed_predict(new), policy), mode, question="q")
    assert not hasattr(first.answer, "score")
    assert second.answer.score == 9


class MyLM(FakeLM):
    """Your own LM class: attributes your code sets (``weights``) decide its answers."""


async def test_a_custom_lms_own_attributes_are_part_of_the_key(mode: str) -> None:
    lm = MyLM({"answer": "from-A"})
    lm.weights = "A.gguf"
    pred = dspy.Predict("question -> answer")
    pred.lm = lm
    p = SequentialPipeline([CachedStage(pred)])
    first = await call(p, mode, question="q")
    again = await call(p, mode, question="q")  # running (call counters, logs) is not a change
    lm.weights = "B.gguf"
    lm.responses["answer"] = "from-B"
    switched = await call(p, mode, question="q")
    assert [first.answer, again.answer, switched.answer] == ["from-A", "from-A", "from-B"]
    assert [e.kind for e in again.run.events] == ["cache_hit"]
    assert lm.calls == 2


def test_a_custom_lm_in_the_context_is_fingerprinted_with_its_attributes() -> None:
    pred = dspy.Predict("question -> answer")
    fps = []
    for weights in ("A.gguf", "B.gguf"):
        lm = MyLM()
        lm.weights = weights
        with dspy.context(lm=lm):
            fps.append(stageflow.fingerprint(pred))
    assert fps[0] != fps[1]


def test_a_functools_cache_wrapped_functions_code_is_fingerprinted() -> None:
    def versions(k: int) -> Any:
        return define(f"import functools\n@functools.cache\ndef f(x):\n    return {{'y': x * {k}}}\n")["f"]

    fp = stageflow.fingerprint
    assert fp(versions(2)) != fp(versions(3))
    assert fp(functools.partial(versions(2), 1)) != fp(functools.partial(versions(3), 1))


# -- across processes: the SQLite cache serves no stale output after these edits -------------------

USERDEFS = """
import functools, dspy, pydantic
from stageflow.testing import FakeLM
import cfgmod

class Doubler:
    def __call__(self, x):
        return {{"y": x * {k}}}

class MyPredict(dspy.Predict):
    def forward(self, **kw):
        out = super().forward(**kw)
        out.answer = out.answer + "-v{k}"
        return out

@functools.cache
def cached_fn(x):
    return {{"y": x * {k}}}

def reads_module(x):
    return {{"y": x * cfgmod.FACTOR}}

class Ans(pydantic.BaseModel):
    text: str
{extra_field}
class MyLM(FakeLM):
    pass
"""

CHILD = """
import json, sys
import dspy, stageflow
from stageflow import CachedStage, SequentialPipeline, Stage, stage
from stageflow.testing import FakeLM
import userdefs as u

sig = dspy.Signature({"question": (str, dspy.InputField()), "answer": (u.Ans, dspy.OutputField())})
typed = dspy.Predict(sig)
typed.lm = FakeLM({"answer": lambda inputs: {"text": "t", "score": 9}})

lm = u.MyLM({"answer": "from-" + sys.argv[2]})
lm.weights = sys.argv[2] + ".gguf"
custom = dspy.Predict("question -> answer")
custom.lm = lm
cases = {
    "callable": (Stage(u.Doubler(), writes=["y"]), {"x": 5}, "y"),
    "predict-subclass": (u.MyPredict("question -> answer"), {"question": "q"}, "answer"),
    "functools-cache": (stage(u.cached_fn, writes=["y"]), {"x": 5}, "y"),
    "module-attribute": (stage(u.reads_module, writes=["y"]), {"x": 5}, "y"),
    "pydantic-output": (typed, {"question": "q"}, "answer"),
    "custom-lm": (custom, {"question": "q"}, "answer"),
}
out = {}
with dspy.context(lm=FakeLM({"answer": "A"})):
    for name, (st, inputs, field) in cases.items():
        cached = CachedStage(st, persist_to=f"{sys.argv[1]}/{name}.db")
        r = SequentialPipeline([cached])(**inputs)
        cached.cache.persistent.flush()
        out[name] = {"value": str(r[field]), "hit": [e.kind for e in r.run.events] == ["cache_hit"]}
print(json.dumps(out))
"""


@pytest.mark.integration
def test_the_sqlite_cache_serves_no_stale_output_after_editing_classes_modules_and_types(
    tmp_path: Path,
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "child.py").write_text(CHILD)
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": os.pathsep.join([str(code), *sys.path]),
    }

    def run(k: int) -> dict[str, Any]:
        (code / "cfgmod.py").write_text(f"FACTOR = {k}\n")
        extra = "    score: int = 7\n" if k == 3 else ""
        (code / "userdefs.py").write_text(USERDEFS.format(k=k, extra_field=extra))
        proc = subprocess.run(
            [sys.executable, str(code / "child.py"), str(tmp_path), f"w{k}"],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    first = run(2)
    edited = run(3)
    again = run(3)
    for name, result in edited.items():
        assert result["hit"] is False, (name, first[name], result)
        assert result["value"] != first[name]["value"], name
        assert again[name] == {"value": result["value"], "hit": True}, name


STABLE_PROGRAM = """
import dataclasses, enum, sys, typing
import dspy, pydantic, stageflow

@dataclasses.dataclass
class Settings:
    k: int = 2
    tags: list = dataclasses.field(default_factory=list)

class Color(enum.Enum):
    RED = 1

class Pair(typing.NamedTuple):
    a: int

class Answer(pydantic.BaseModel):
    text: str = "t"

    @pydantic.field_validator("text")
    @classmethod
    def strip(cls, v):
        return v.strip()

class Scorer:
    def __init__(self):
        self.settings, self.color, self.pair = Settings(), Color.RED, Pair(1)

    def __call__(self, x):
        return {"y": x * self.settings.k}

sig = dspy.Signature({"q": (str, dspy.InputField()), "a": (list[Answer] | None, dspy.OutputField())})
program = stageflow.SequentialPipeline([stageflow.Stage(Scorer(), writes=["y"]), dspy.Predict(sig)])
print(stageflow.fingerprint(program))
"""


@pytest.mark.integration
def test_fingerprints_of_your_classes_and_types_are_stable_across_processes(tmp_path: Path) -> None:
    """No object address (``dataclasses.MISSING``'s repr, a default's repr) leaks into the hash."""
    script = tmp_path / "program.py"
    script.write_text(STABLE_PROGRAM)
    outs = {
        subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=180, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(outs) == 1
