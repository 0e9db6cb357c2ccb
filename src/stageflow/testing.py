"""Test kit: deterministic fake LMs, sample stages and DSPy isolation.

Examples:
    >>> import dspy, stageflow
    >>> from stageflow.testing import FakeLM
    >>> lm = FakeLM({"answer": lambda inputs: inputs["question"].upper()})
    >>> with dspy.context(lm=lm):
    ...     dspy.Predict("question -> answer")(question="hi").answer
    'HI'
    >>> lm.calls
    1
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import dspy
from dspy.lm15 import Message, Response, Usage

from stageflow.stages import FunctionStage, stage

__all__ = [
    "Counter",
    "Echo",
    "Fail",
    "FakeLM",
    "Upper",
    "isolated_dspy",
    "parse_request",
]

_OUT_LINE = re.compile(r"^\d+\. `(\w+)` \((.*?)\):", re.M)
_SECTION = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond with|\Z)", re.S)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(getattr(p, "text", "") or "" for p in content)


def parse_request(system: str, user: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Read a DSPy adapter prompt: ``({output_field: type_text}, {input_field: value})``."""
    outputs: dict[str, str] = {}
    if "Your output fields are:" in system:
        section = system.split("Your output fields are:", 1)[1]
        section = section.split("All interactions will be structured", 1)[0]
        outputs = {m.group(1): m.group(2) for m in _OUT_LINE.finditer(section)}
    inputs: dict[str, Any] = {}
    for m in _SECTION.finditer(user):
        raw = m.group(2).strip()
        try:
            inputs[m.group(1)] = json.loads(raw) if raw[:1] in "[{" else raw
        except json.JSONDecodeError:
            inputs[m.group(1)] = raw
    return outputs, inputs


def _members(type_text: str) -> list[str]:
    """The members of a union type's text at its top level (``[type_text]`` for any other type).

    >>> _members("Union[str, NoneType]"), _members("Union[list[str], NoneType]"), _members("str | None")
    (['str', 'NoneType'], ['list[str]', 'NoneType'], ['str', 'None'])
    """
    t = type_text.replace(" ", "")
    if t.startswith("Optional[") and t.endswith("]"):
        return [*_members(t[9:-1]), "NoneType"]
    body = t[6:-1] if t.startswith("Union[") and t.endswith("]") else t
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch in ",|" and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts


def _default_for(type_text: str, default: str) -> Any:
    t = type_text.replace(" ", "")
    optional = re.fullmatch(r"(?:Optional\[(.*)\]|Union\[(.*),NoneType\]|(.*)\|None)", t)
    if optional:  # a value of the type it makes optional
        return _default_for(next(g for g in optional.groups() if g), default)
    lit = re.match(r"Literal\[(.*)\]", t)
    if lit:
        first = lit.group(1).split(",")[0]
        return first.strip("'\"")
    item = re.fullmatch(r"(?:list|List)\[(.*)\]", t)
    if item:  # a one-item list of a value of its item type
        return [_default_for(item.group(1), default)]
    if t.startswith(("list", "List")):
        return [default]
    if t in ("float",):
        return 1.0
    if t in ("int",):
        return 1
    if t in ("bool",):
        return True
    return default


class _FakeEngine:
    """A DSPy 3.4 engine that answers each output field from a script."""

    supports_response_schema = False
    supported_params = frozenset({"temperature", "max_tokens", "n", "rollout_id"})

    def __init__(self, owner: FakeLM, enforces_max_tokens: bool) -> None:
        self.owner = owner
        self.enforces_max_tokens = enforces_max_tokens  # budgets trust max_tokens as a bound only then

    def __deepcopy__(self, memo: dict[int, Any]) -> _FakeEngine:
        return self

    def complete(self, request: Any) -> Response:
        self.owner._enter()
        try:
            deadline = time.monotonic() + self.owner.rendezvous_timeout
            while self.owner.peak_active < (self.owner.rendezvous or 0) and time.monotonic() < deadline:
                time.sleep(0.001)
            if self.owner.latency:
                time.sleep(self.owner.latency)
            return self.owner._respond(request)
        finally:
            self.owner._exit()

    def stream(self, request: Any) -> Iterator[Any]:
        """The response as stream events, its text in chunks of ``stream_chunk`` characters."""
        return _chunked(self.complete(request), self.owner.stream_chunk)

    def close(self) -> None:
        return None


def _chunked(response: Response, size: int) -> Iterator[Any]:
    """DSPy stream events for ``response``, each text delta split into pieces of ``size`` characters."""
    from dspy.lm15 import StreamDeltaEvent, TextDelta, response_to_events

    for event in response_to_events(response):
        delta = getattr(event, "delta", None)
        if not isinstance(delta, TextDelta) or len(delta.text) <= size:
            yield event
            continue
        for start in range(0, len(delta.text), size):
            first = start == 0
            yield StreamDeltaEvent(
                delta=TextDelta(
                    text=delta.text[start : start + size],
                    part_index=delta.part_index,
                    logprobs=delta.logprobs if first else (),
                    logprobs_complete=delta.logprobs_complete if first else True,
                )
            )


class _AsyncFakeEngine:
    def __init__(self, owner: FakeLM) -> None:
        self.owner = owner

    def __deepcopy__(self, memo: dict[int, Any]) -> _AsyncFakeEngine:
        return self

    async def complete(self, request: Any) -> Response:
        self.owner._enter()
        try:
            deadline = time.monotonic() + self.owner.rendezvous_timeout
            while self.owner.peak_active < (self.owner.rendezvous or 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            if self.owner.latency:
                await asyncio.sleep(self.owner.latency)
            return self.owner._respond(request)
        finally:
            self.owner._exit()

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        """Async twin of the sync engine's ``stream``."""
        for event in _chunked(await self.complete(request), self.owner.stream_chunk):
            yield event

    async def aclose(self) -> None:
        return None


class FakeLM(dspy.LM):  # type: ignore[misc]
    """A deterministic LM scripted by output field, for tests (works with Chat and JSON adapters).

    Args:
        responses: ``{field: value}``; a value may be a callable ``(inputs) -> value`` that gets the
            call's input fields; a field scripted as ``None`` answers ``None`` (for an optional
            output; in DSPy's chat format not for a ``str | None`` one, which is refused: any text
            is a str there). Fields without a script get ``default``, or a value of the right shape
            for ``int``, ``float``, ``bool``, ``Literal``, ``list`` and ``Optional`` of those (the
            first option, a one-item list, ``1.0``...); script fields of other types (pydantic
            models, enums, dicts).
        default: The text for unscripted string fields.
        latency: Seconds each call takes (``time.sleep`` / ``asyncio.sleep``), for concurrency tests.
        fail_times: Raise ``RuntimeError`` on this many first calls (for error-path tests).
        rendezvous: Calls wait (up to ``rendezvous_timeout`` seconds) until this many calls have been in
            progress at once, so a test can prove ``n`` calls overlap without relying on timing
            (``peak_active`` then reaches ``n`` unless something caps concurrency below it).
        usage: The token usage each call reports: ``"auto"`` (prompt and answer characters / 4),
            ``None`` (no usage at all, as some servers do), an ``(input_tokens, output_tokens)`` pair,
            or a callable ``(inputs) -> (input_tokens, output_tokens)``.
        cost: The cost each call reports (in its response's ``provider_data["cost"]``, which
            stageflow's usage tables and budgets read); ``None``: no cost.
        fail_with: A callable ``(call_number) -> Exception | None``: when it returns an exception, that
            call raises it (e.g. ``dspy.lm15.RateLimitError(retry_after=5)``), after counting the call.
        cache: Let DSPy's LM cache answer repeated calls (off by default).
        lm_kwargs: Passed to ``dspy.LM`` (``max_tokens=``, ``temperature=``...).
        stream_chunk: Under ``dspy.streamify``, the response text arrives in chunks of this many
            characters (sync and async), so stream listeners see several chunks per field.
        enforce_max_tokens: Act like a model that stops at the ``max_tokens`` it is sent: reported
            output tokens are capped at it, and the engine says so (``enforces_max_tokens``), so
            budgets hold ``max_tokens`` as a true bound. Off: the fake may report more, like a custom
            engine that ignores ``max_tokens``.

    Attributes:
        calls: Number of LM calls so far. ``log`` holds ``(output_fields, inputs)`` per call.
        active: LM calls in progress right now; ``peak_active`` is the most there ever were at
            once (a count, so concurrency limits can be asserted without timing).
    """

    def __init__(
        self,
        responses: Mapping[str, Any] | None = None,
        *,
        default: str = "ok",
        latency: float = 0.0,
        fail_times: int = 0,
        rendezvous: int | None = None,
        rendezvous_timeout: float = 5.0,
        model: str = "stageflow-fake/lm",
        usage: Any = "auto",
        cost: float | None = None,
        fail_with: Callable[[int], BaseException | None] | None = None,
        cache: bool = False,
        stream_chunk: int = 8,
        enforce_max_tokens: bool = False,
        **lm_kwargs: Any,
    ) -> None:
        self.responses = dict(responses or {})
        self.default = default
        self.latency = latency
        self.fail_times = fail_times
        self.rendezvous = rendezvous
        self.rendezvous_timeout = rendezvous_timeout
        self.usage = usage
        self.cost = cost
        self.fail_with = fail_with
        self.reported_tokens = 0
        if isinstance(stream_chunk, bool) or not isinstance(stream_chunk, int) or stream_chunk < 1:
            raise ValueError(f"FakeLM: stream_chunk must be an int >= 1, got {stream_chunk!r}")
        self.stream_chunk = stream_chunk
        self.enforce_max_tokens = enforce_max_tokens
        self.calls = 0
        self.active = 0
        self.peak_active = 0
        self.log: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        self._lock = threading.Lock()
        super().__init__(
            model,
            engine=_FakeEngine(self, enforce_max_tokens),
            async_engine=_AsyncFakeEngine(self),
            cache=cache,
            num_retries=0,
            **lm_kwargs,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> FakeLM:
        return self  # one script and one call counter, however often a program is copied

    @property
    def stageflow_identity(self) -> tuple[Any, ...]:
        """What decides this fake's answers besides the prompt (its script and default text): part of
        a stage's cache key and fingerprint, so two fakes with other scripts never share entries."""
        from stageflow.fingerprinting import fingerprint

        return (
            self.default,
            tuple(
                (name, ("fn", fingerprint(v)) if callable(v) else ("value", repr(v)))
                for name, v in sorted(self.responses.items())
            ),
        )

    def _enter(self) -> None:
        with self._lock:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)

    def _exit(self) -> None:
        with self._lock:
            self.active -= 1

    def _respond(self, request: Any) -> Response:
        system = _text(request.system) if request.system is not None else ""
        user = _text(request.messages[-1].parts) if request.messages else ""
        outputs, inputs = parse_request(system, user)
        with self._lock:
            self.calls += 1
            number = self.calls
            self.log.append((tuple(outputs), inputs))
            failing = self.calls <= self.fail_times
        if failing:
            raise RuntimeError(f"FakeLM scripted failure (call {number} of fail_times={self.fail_times})")
        if self.fail_with is not None:
            error = self.fail_with(number)
            if error is not None:
                raise error
        values: dict[str, Any] = {}
        for name, type_text in outputs.items():
            script = self.responses.get(name, None)
            if script is None and name in self.responses:  # scripted as None: the answer is None
                values[name] = None
            elif script is None:
                values[name] = _default_for(type_text, self.default)
            elif callable(script):
                values[name] = script(inputs)
            else:
                values[name] = copy.deepcopy(script)
        if "Respond with a JSON object" in user:
            text = json.dumps(values)
        else:
            for name, value in values.items():
                if value is None and "str" in _members(outputs[name]):
                    raise ValueError(
                        f"FakeLM: the output '{name}' ({outputs[name]}) is scripted as None, which DSPy's "
                        "chat format cannot answer: any text is a str, so it would read 'null' as text. "
                        "Script a string, or use dspy.JSONAdapter()"
                    )
            parts = []
            for k, v in values.items():
                parts.append(f"[[ ## {k} ## ]]\n{v if isinstance(v, str) else json.dumps(v)}")
            text = "\n\n".join([*parts, "[[ ## completed ## ]]"])
        return Response(
            id=None,
            model=self.model,
            message=Message.assistant(text),
            finish_reason="stop",
            usage=self._usage(system + user, text, inputs, request.config.max_tokens),
            provider_data=None if self.cost is None else {"cost": self.cost},
        )

    def _usage(self, prompt: str, text: str, inputs: dict[str, Any], cap: int | None = None) -> Usage:
        script = self.usage
        if script is None:
            return Usage()
        if script == "auto":
            pair = (len(prompt) // 4, len(text) // 4)
        else:
            pair = script(inputs) if callable(script) else script
        tin, tout = int(pair[0]), int(pair[1])
        if cap is not None and self.enforce_max_tokens:
            tout = min(tout, cap)
        with self._lock:
            self.reported_tokens += tin + tout
        return Usage(input_tokens=tin, output_tokens=tout, total_tokens=tin + tout)


@contextlib.contextmanager
def isolated_dspy(lm: Any = None, **settings: Any) -> Iterator[None]:
    """Run a block with memory-only caches off and DSPy settings restored afterwards.

    Also usable as the body of a pytest fixture (``stageflow.testing`` is imported by the
    project's ``conftest.py``).
    """
    from dspy.dsp.utils.settings import DEFAULT_CONFIG

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    overrides = dict(settings)
    if lm is not None:
        overrides["lm"] = lm
    try:
        if overrides:
            with dspy.context(**overrides):
                yield
        else:
            # No context here: dspy.context snapshots settings, which would hide a
            # dspy.configure(...) made inside the block.
            yield
    finally:
        dspy.configure(**copy.deepcopy(DEFAULT_CONFIG))


# -- sample stages ---------------------------------------------------------------------------


def Echo(field: str = "text", to: str = "echo") -> FunctionStage:  # noqa: N802 (named like the stage it builds)
    """A stage copying ``field`` to ``to``."""
    return stage(lambda **kw: {to: kw[field]}, reads=[field], writes=[to], name=f"echo_{field}")


def Upper(field: str = "text", to: str = "upper") -> FunctionStage:  # noqa: N802 (named like the stage it builds)
    """A stage writing ``field`` upper-cased to ``to``."""
    return stage(lambda **kw: {to: str(kw[field]).upper()}, reads=[field], writes=[to], name=f"upper_{field}")


class Counter:
    """A callable stage body that counts its calls (thread-safe): ``stage(counter, ...)``."""

    def __init__(self, to: str = "count") -> None:
        self.to = to
        self.n = 0
        self._lock = threading.Lock()

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        with self._lock:
            self.n += 1
            return {self.to: self.n}

    def as_stage(self, reads: list[str] | None = None) -> FunctionStage:
        """This counter as a stage reading ``reads`` and writing ``to``."""
        return stage(self, reads=reads or [], writes=[self.to], name="counter")


def Fail(  # noqa: N802 (named like the stage it builds)
    times: int = 1,
    error: Callable[[], Exception] = lambda: RuntimeError("boom"),
    reads: tuple[str, ...] = ("text",),
    writes: tuple[str, ...] = ("result",),
) -> FunctionStage:
    """A stage that raises ``error()`` on its first ``times`` calls, then returns ``{writes[0]: 'ok'}``."""
    state = {"n": 0}
    lock = threading.Lock()

    def fail(**kwargs: Any) -> dict[str, Any]:
        with lock:
            state["n"] += 1
            n = state["n"]
        if n <= times:
            raise error()
        return {writes[0]: "ok"}

    return stage(fail, reads=list(reads), writes=list(writes), name="fail")


# -- running a program both ways ---------------------------------------------------------------

#: The two ways to call a program: ``program(**inputs)`` and ``await program.acall(**inputs)``.
MODES = ("sync", "async")


async def call(program: Any, mode: str, /, *args: Any, **inputs: Any) -> Any:
    """Call ``program`` the way ``mode`` says (``"sync"`` or ``"async"``), from async test code.

    One helper for both modes, so a test parametrized over :data:`MODES` runs the same body twice
    and the sync and async paths cannot drift apart unnoticed.

    Examples:
        >>> import asyncio, stageflow
        >>> p = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x + 1}, writes=["y"])])
        >>> [asyncio.run(call(p, mode, x=1)).y for mode in MODES]
        [2, 2]
    """
    if mode == "sync":
        return program(*args, **inputs)
    if mode == "async":
        return await program.acall(*args, **inputs)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
