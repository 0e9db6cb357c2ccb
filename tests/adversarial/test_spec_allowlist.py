"""Issue 9: the module allowlist applies to what a name *resolves to*, not to how it is spelled.

A pipeline file may only name (and call) functions, classes and objects that an allowed module
defines. Everything else an allowed module happens to hold — modules it imported, functions and
classes it re-exports, ``functools.partial`` objects, bound methods of foreign objects, builtins,
properties — is refused before anything is called, and nothing outside the allowed modules runs.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import dspy
import pytest

from stageflow.spec import SpecError, load_pipeline, to_spec
from stageflow.testing import FakeLM

# ``advmod`` is the module the user allows; ``advlib`` stands for any third-party library it imports.
ADVLIB = '''
import functools
import pathlib

MARK = pathlib.Path(__file__).with_name("pwned")


def touch(*args, **kwargs):
    MARK.write_text("ran")
    return {"y": "ran"}


class Runner:
    def __init__(self, *args, **kwargs):
        MARK.write_text("ran")

    def __call__(self, text):
        MARK.write_text("ran")
        return {"y": text}


class Spoofed:
    """A class from elsewhere claiming to be defined in the allowed module."""

    __module__ = "advmod"

    def __init__(self, *args, **kwargs):
        MARK.write_text("ran")

    def __call__(self, text):
        MARK.write_text("ran")
        return {"y": text}


def spoofed_function(text):
    MARK.write_text("ran")
    return {"y": text}


spoofed_function.__module__ = "advmod"
spoofed_function.__qualname__ = "spoofed_function"


def logged(fn):
    """A decorator from a library: the wrapper lives here, the function it wraps in advmod."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper
'''

ADVMOD = '''
import dataclasses
import functools
import os
import subprocess
from os import system

import dspy
import stageflow
import advlib
from advlib import Runner, Spoofed, spoofed_function, touch

runner = Runner.__new__(Runner)
partial_touch = functools.partial(advlib.touch, "x")
bound_foreign = runner.__call__
length = len


def ok(text):
    return {"y": text.upper()}


shout = lambda text: {"y": text + "!"}  # noqa: E731


@stageflow.stage(writes=["y"])
def decorated(text):
    return {"y": text * 2}


@advlib.logged
def traced(text):
    return {"y": "traced " + text}


@functools.cache
def make_cached():
    return ok


foreign_stage = stageflow.stage(advlib.touch, reads=["text"], writes=["y"])


class Helper:
    """An allowed class; its attributes lead elsewhere."""

    impl = advlib.Runner
    call_foreign = advlib.touch

    @property
    def prop(self):
        advlib.touch()
        return ok

    @staticmethod
    def static(text):
        return {"y": "static " + text}

    @classmethod
    def make(cls):
        return ok

    def method(self, text):
        return {"y": "method " + text}


helper = Helper()


@dataclasses.dataclass
class Echo:
    suffix: str = "?"

    def __call__(self, text):
        return {"y": text + self.suffix}


class Answerer(dspy.Module):
    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("text -> y")

    def forward(self, text):
        return self.predict(text=text)


answerer = Answerer()
'''


@pytest.fixture
def advmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "advlib.py").write_text(ADVLIB, encoding="utf-8")
    (tmp_path / "advmod.py").write_text(ADVMOD, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # on the code before the fix, `touch pwned` really ran
    for name in ("advmod", "advlib"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path / "pwned"


def _file(tmp_path: Path, node: dict[str, object]) -> Path:
    path = tmp_path / "p.yaml"
    text = "inputs: [text]\nroot:\n  type: pipeline\n  stages:\n  - " + json.dumps(node) + "\n"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


FOREIGN = [
    # the reproducer: a module the allowed module imported
    ({"component": "advmod:os.system", "args": {"command": "touch pwned"}}, "'os'"),
    ({"component": "advmod:subprocess.run", "args": {"args": ["touch", "pwned"]}}, "'subprocess'"),
    # a function re-exported with `from os import system` (a builtin of the posix module)
    ({"component": "advmod:system", "args": {"command": "touch pwned"}}, "posix"),
    # functions and classes re-exported from another package
    ({"component": "advmod:touch"}, "'advlib'"),
    ({"component": "advmod:Runner"}, "'advlib'"),
    ({"component": "advmod:Helper.impl"}, "'advlib'"),
    ({"component": "advmod:Helper.call_foreign"}, "'advlib'"),
    # objects whose class is defined elsewhere
    ({"component": "advmod:partial_touch"}, "'functools'"),
    ({"component": "advmod:runner"}, "'advlib'"),
    ({"component": "advmod:bound_foreign"}, "'advlib'"),
    ({"component": "advmod:foreign_stage"}, "'advlib'"),
    ({"component": "advmod:length"}, "builtins"),
    ({"component": "advmod:Helper.mro"}, "descriptor"),
    # a property runs code when it is read
    ({"component": "advmod:helper.prop"}, "property"),
    # __module__ spoofing: the code lives in advlib whatever the object claims
    ({"component": "advmod:Spoofed"}, "'advlib'"),
    ({"component": "advmod:spoofed_function"}, "'advlib'"),
    # an object of an allowed class reached through a foreign object
    ({"component": "advmod:dspy.Predict", "args": {"signature": "text -> y"}}, "'dspy'"),
    ({"component": "advmod:stageflow.stage"}, "'stageflow'"),
]


@pytest.mark.parametrize(("node", "where"), FOREIGN, ids=[n["component"] for n, _ in FOREIGN])
def test_names_resolving_outside_the_allowed_modules_are_refused(
    tmp_path: Path, advmod: Path, node: dict[str, object], where: str
) -> None:
    path = _file(tmp_path, node)
    with pytest.raises(SpecError) as info:
        load_pipeline(path, allow_modules=["advmod"])
    err = info.value
    assert err.code == "outside_allowed_modules", str(err)
    assert where in str(err)
    assert err.line == 5
    assert "--allow-module" in str(err) or "factory" in str(err)
    assert not advmod.exists(), "code outside the allowed module ran"
    assert not (tmp_path / "pwned").exists()


ALLOWED = [
    ({"component": "advmod:ok"}, "HI"),
    ({"component": "advmod:shout"}, "hi!"),
    ({"component": "advmod:decorated"}, "hihi"),
    ({"component": "advmod:traced"}, "traced hi"),
    ({"component": "advmod:make_cached", "args": {}}, "HI"),
    ({"component": "advmod:Helper.static"}, "static hi"),
    ({"component": "advmod:Helper.make", "args": {}}, "HI"),
    ({"component": "advmod:helper.method", "writes": ["y"]}, "method hi"),
    ({"component": "advmod:Echo", "args": {"suffix": "?!"}, "writes": ["y"]}, "hi?!"),
    ({"component": "advmod:Answerer"}, "model says hi"),
    ({"component": "advmod:answerer"}, "model says hi"),
]


@pytest.mark.parametrize(("node", "expected"), ALLOWED, ids=[n["component"] for n, _ in ALLOWED])
def test_what_the_allowed_module_defines_still_loads_and_runs(
    tmp_path: Path, advmod: Path, node: dict[str, object], expected: str
) -> None:
    pipeline = load_pipeline(_file(tmp_path, node), allow_modules=["advmod"])
    with dspy.context(lm=FakeLM({"y": lambda i: "model says " + i["text"]})):
        assert pipeline(text="hi").y == expected
    assert to_spec(pipeline)["nodes"]["root"]["stages"][0]["component"] == node["component"]
    assert not advmod.exists()


def test_signature_types_cannot_import_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DSPy resolves an unknown type name in a signature string by importing a module of that name."""
    (tmp_path / "sfmarker.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported').write_text('x')\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sfmarker", raising=False)
    for annotation in ("sfmarker", "sfmarker.Thing", "list[sfmarker]", "os.system", "Field(default=os)"):
        path = _file(tmp_path, {"predict": f"text -> y: {annotation}"})
        with pytest.raises(SpecError) as info:
            load_pipeline(path)
        assert info.value.code == "bad_signature", annotation
        assert "sfmarker" not in sys.modules
        assert not (tmp_path / "imported").exists()
    path = _file(tmp_path, {"predict": "text -> y: Optional[list[dict[str, int]]], z: Literal['a', 'b']"})
    assert "z" in load_pipeline(path).check(["text"])
