"""The fast chat adapter's own call (``_adapter_call``): DSPy's ``ChatAdapter.__call__`` /
``Adapter.__call__`` with their scopes set directly and ``format`` / ``parse`` called without the
callback wrapper when no callback is in force. What the LM sees during the call, the callbacks that
fire, the JSON fallback and the errors are DSPy's; anything DSPy's call is built from, patched,
sends the call to DSPy's code."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from typing import Any

import dspy
import pydantic
import pytest
from dspy.utils.callback import BaseCallback
from dspy.utils.exceptions import AdapterParseError

from stageflow.lm.fast import FastChatAdapter, fast_adapter_for
from stageflow.lm.fast import _adapter_call as adapter_call
from stageflow.testing import FakeLM

_call_context: Any = sys.modules["dspy.clients.call_context"]
_capabilities: Any = sys.modules["dspy.clients.capabilities"]
_deprecation: Any = sys.modules["dspy.clients._deprecation"]

_SIG = dspy.Signature("question -> answer")


class _Watching(FakeLM):  # type: ignore[misc]
    """A FakeLM that records the DSPy call scopes in force when it is called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[Any, ...]] = []

    def _record(self, messages: Any, kwargs: dict[str, Any]) -> None:
        scope = _capabilities._planning.get()
        marker = _deprecation._adapter_call.get()
        self.seen.append(
            (
                len(_call_context._adapter_calls.get()),
                scope is not None and scope.lm is self,
                marker is not None and marker[0] is self and marker[1] is messages,
                messages,
                sorted(kwargs),
            )
        )

    def __call__(self, *args: Any, messages: Any = None, **kwargs: Any) -> Any:
        self._record(messages, kwargs)
        return super().__call__(*args, messages=messages, **kwargs)

    async def acall(self, *args: Any, messages: Any = None, **kwargs: Any) -> Any:
        self._record(messages, kwargs)
        return await super().acall(*args, messages=messages, **kwargs)


async def _run(adapter: Any, lm: Any, mode: str, lm_kwargs: dict[str, Any] | None = None) -> Any:
    args = (lm, dict(lm_kwargs or {}), _SIG, [], {"question": "q"})
    return adapter(*args) if mode == "sync" else await adapter.acall(*args)


async def test_the_lm_is_called_in_dspys_scopes_with_dspys_messages(mode: str) -> None:
    fast, plain = _Watching({"answer": "4"}), _Watching({"answer": "4"})
    assert adapter_call.untouched()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (DSPy warns when messages= does not come from an adapter)
        got = await _run(fast_adapter_for(None), fast, mode, {"temperature": 0.0})
        expected = await _run(dspy.ChatAdapter(), plain, mode, {"temperature": 0.0})
    assert got == expected == [{"answer": "4"}]
    assert fast.seen == plain.seen
    assert fast.seen[0][:3] == (1, True, True)
    # and nothing of the scopes is left behind
    assert _call_context._adapter_calls.get() == ()
    assert _capabilities._planning.get() is None
    assert _deprecation._adapter_call.get() is None


class _Counting(BaseCallback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_adapter_format_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.events.append("format")

    def on_adapter_parse_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.events.append("parse")


@pytest.mark.parametrize("where", ["global", "adapter"])
async def test_callbacks_in_force_see_format_and_parse(where: str, mode: str) -> None:
    seen = {}
    for name, fast in (("fast", True), ("dspy", False)):
        callback = _Counting()
        user = dspy.ChatAdapter(callbacks=[callback] if where == "adapter" else None)
        adapter = fast_adapter_for(user) if fast else user
        with dspy.context(callbacks=[callback] if where == "global" else []):
            await _run(adapter, FakeLM({"answer": "4"}), mode)
        seen[name] = callback.events
    assert seen["fast"] == seen["dspy"] == ["format", "parse"]


# (an LM answering raw text, through DSPy's legacy BaseLM interface, which warns that it is deprecated)
_LEGACY = pytest.mark.filterwarnings("ignore:Implementing custom LMs:DeprecationWarning")


@_LEGACY
async def test_a_parse_error_falls_back_to_json_as_dspy_does(mode: str) -> None:
    results = [
        await _run_raw(adapter, iter(["no headers at all", '{"answer": "4"}']), mode)
        for adapter in (fast_adapter_for(dspy.ChatAdapter()), dspy.ChatAdapter())
    ]
    assert results[0] == results[1] == [{"answer": "4"}]


async def _run_raw(adapter: Any, answers: Any, mode: str) -> Any:
    class Raw(dspy.BaseLM):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(model="raw")

        def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
            return _response(next(answers))

        async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
            return _response(next(answers))

    return await _run(adapter, Raw(), mode)


def _response(text: str) -> Any:
    from types import SimpleNamespace

    message = SimpleNamespace(content=text, tool_calls=None)
    choice = SimpleNamespace(message=message, finish_reason="stop", logprobs=None)
    return SimpleNamespace(choices=[choice], usage={}, model="raw")


@_LEGACY
async def test_no_fallback_when_it_is_switched_off(mode: str) -> None:
    errors = []
    for adapter in (
        fast_adapter_for(dspy.ChatAdapter(use_json_adapter_fallback=False)),
        dspy.ChatAdapter(use_json_adapter_fallback=False),
    ):
        with pytest.raises(AdapterParseError) as err:
            await _run_raw(adapter, iter(["no headers at all", '{"answer": "4"}']), mode)
        errors.append(str(err.value))
    assert errors[0].replace("FastChatAdapter", "ChatAdapter") == errors[1]


async def test_format_and_parse_set_on_the_adapter_are_called(mode: str) -> None:
    user = dspy.ChatAdapter()
    calls: list[str] = []
    original_format, original_parse = user.format, user.parse

    def format_(*a: Any, **kw: Any) -> Any:
        calls.append("format")
        return original_format(*a, **kw)

    def parse(*a: Any, **kw: Any) -> Any:
        calls.append("parse")
        return original_parse(*a, **kw)

    user.format, user.parse = format_, parse
    got = await _run(fast_adapter_for(user), FakeLM({"answer": "4"}), mode)
    assert got == [{"answer": "4"}]
    assert calls == ["format", "parse"]


def test_each_part_patched_turns_the_shortcut_off_and_dspys_call_runs() -> None:
    script = textwrap.dedent(
        """
        import contextvars
        import dspy
        from stageflow.lm.fast import _adapter_call as a
        from stageflow.lm.fast import fast_adapter_for
        from stageflow.testing import FakeLM

        missed, wrong = [], []
        for owner, name, _ in a._WATCHED:
            assert a.untouched()
            had = name in vars(owner)
            before = vars(owner).get(name)
            original = getattr(owner, name)
            if isinstance(original, type):
                replacement = type(original.__name__, (original,), {})
            elif isinstance(original, contextvars.ContextVar):
                replacement = contextvars.ContextVar(original.name, default=original.get())
            else:
                replacement = lambda *args, f=original, **kw: f(*args, **kw)
            setattr(owner, name, replacement)
            if a.untouched():
                missed.append(name)
            sig = dspy.Signature("q -> answer")
            out = fast_adapter_for(None)(FakeLM({"answer": "4"}), {}, sig, [], {"q": "x"})
            if out != [{"answer": "4"}]:
                wrong.append(name)
            if had:
                setattr(owner, name, before)
            else:
                delattr(owner, name)
        assert a.untouched()
        print(len(a._WATCHED), missed, wrong)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(adapter_call._WATCHED)), "[]", "[]"]


def test_a_patch_made_before_stageflow_was_imported_is_called() -> None:
    script = textwrap.dedent(
        """
        import contextlib
        import dspy
        import dspy.adapters.base as base

        calls = []
        original = base.adapter_message_call

        @contextlib.contextmanager
        def marked(lm, messages):
            calls.append(len(messages))
            with original(lm, messages):
                yield

        base.adapter_message_call = marked
        import stageflow
        from stageflow.testing import FakeLM

        pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
        with dspy.context(lm=FakeLM({"answer": "4"})):
            print(pipe(question="q").answer, len(calls))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4", "1"]


def test_the_fast_class_keeps_dspys_wrappers_to_skip() -> None:
    assert FastChatAdapter._format_wrapper is FastChatAdapter.__dict__["format"]
    assert FastChatAdapter._parse_wrapper.__wrapped__.__qualname__ == "_FastPath.parse"


# -- what the second check found -------------------------------------------------------------------


async def test_a_callback_that_appears_while_one_completion_is_parsed_sees_the_next_parse(mode: str) -> None:
    callbacks: list[Any] = []
    late = _Counting()

    class Value(pydantic.BaseModel):
        v: int

        @pydantic.field_validator("v")
        @classmethod
        def _register(cls, x: int) -> int:  # (the first completion's parse registers a callback)
            if late not in callbacks:
                callbacks.append(late)
            return x

    sig = dspy.Signature({"question": (str, dspy.InputField()), "answer": (Value, dspy.OutputField())})
    seen = {}
    for name, adapter in (("fast", FastChatAdapter()), ("dspy", dspy.ChatAdapter())):
        for _ in ("warm-up", "measured"):  # (a signature's first call is also checked against DSPy's)
            callbacks.clear()
            late.events.clear()
            with dspy.context(lm=FakeLM({"answer": {"v": 1}}), adapter=adapter, callbacks=callbacks):
                predictor = dspy.Predict(sig, n=2)
                if mode == "sync":
                    predictor(question="q")
                else:
                    await predictor.acall(question="q")
        seen[name] = list(late.events)
    assert seen["fast"] == seen["dspy"] == ["parse"]


def test_a_stage_that_edits_the_default_adapter_does_not_change_later_calls() -> None:
    import stageflow

    callback = _Counting()

    def tweak(question: str) -> dict[str, str]:
        adapter = dspy.settings.adapter  # (the fast twin of DSPy's default adapter)
        adapter.callbacks.append(callback)
        adapter.use_json_adapter_fallback = False
        return {"question2": question}

    stageflow.SequentialPipeline([stageflow.stage(tweak, writes=["question2"])])(question="q")
    other = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=FakeLM({"answer": "4"})):
        assert other(question="q").answer == "4"
    assert callback.events == []
    assert fast_adapter_for(None).use_json_adapter_fallback is True


async def test_a_stage_that_edits_the_default_adapter_does_not_change_a_call_running_beside_it() -> None:
    import asyncio

    import stageflow

    callback = _Counting()
    started, edited = asyncio.Event(), asyncio.Event()

    async def tweak(question: str) -> dict[str, str]:
        await started.wait()  # (the other call is running by now)
        adapter = dspy.settings.adapter
        adapter.callbacks.append(callback)
        adapter.use_json_adapter_fallback = False
        edited.set()
        return {"question2": question}

    async def wait(question: str) -> dict[str, str]:
        started.set()
        await edited.wait()  # (runs on after the other call edited its adapter)
        return {"question": question}

    editing = stageflow.SequentialPipeline([stageflow.stage(tweak, writes=["question2"])])
    other = stageflow.SequentialPipeline(
        [stageflow.stage(wait, writes=["question"]), dspy.Predict("question -> answer")]
    )
    with dspy.context(lm=FakeLM({"answer": "4"})):
        _, result = await asyncio.gather(editing.acall(question="q"), other.acall(question="q"))
    assert result.answer == "4"
    assert callback.events == []
