"""OpenTelemetry spans for every pipeline run, stage and LM call (``pip install 'stageflow[otel]'``).

:func:`instrument` installs one process-wide hook (:func:`stageflow.engine.hooks.install_hook`):

- an outermost pipeline call is a span ``invoke_workflow <Pipeline>`` (OpenTelemetry GenAI:
  ``gen_ai.operation.name=invoke_workflow``, ``gen_ai.workflow.name``; OpenInference:
  ``openinference.span.kind=CHAIN``);
- every stage call is a span named by the name the user gave it (a function stage's name) or else
  by its stage path (``stages[1].stage[3]``), a child of the stage or run it ran inside — across
  stageflow's worker threads and event loops, because the engine runs hooks in the stage's own
  context and fan-outs copy it. It carries ``stageflow.stage.path``, ``stageflow.stage.type``,
  ``openinference.span.kind`` (``CHAIN``, ``LLM`` for a predictor, ``RETRIEVER`` for a stage
  whose name or class says it retrieves) and, for a predictor, ``gen_ai.request.model`` — all set
  when the span starts, so samplers see them; when it ends: its usage (``stageflow.usage.*``:
  LM calls, tokens, cost, LM-cache hits; nested stages included for a pipeline stage),
  ``stageflow.cache_hit``, ``stageflow.retries`` / ``stageflow.repairs`` (usage attributes are
  left out when the stage used nothing and nothing happened to it) and, on failure, ``error.type``
  with an error status. A stage still running when its pipeline call ends (a branch cancelled by a
  fail-fast fan-out, or abandoned after a timeout) ends then, with an error status and
  ``stageflow.abandoned``: every span that starts is exported;
- every LM call made inside a stage is a span ``chat <model>`` under that stage's span
  (``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` / ``output_tokens``,
  ``openinference.span.kind=LLM``, ``llm.token_count.*``), from DSPy's ``on_lm_start`` /
  ``on_lm_end`` callbacks — added to DSPy's settings only for the duration of each instrumented
  pipeline call, never globally.

Token counts sit on one level only, so tools that add them up (Phoenix, Langfuse, MLflow) count
each token once: on the LM-call spans, or — with ``lm_spans=False`` — on the leaf stage spans.

**Other LM instrumentation.** When another instrumentor already makes LM spans, stageflow makes
none (``lm_spans=None``, the default): see :func:`other_lm_instrumentation`. MLflow's
``mlflow.dspy.autolog()`` adds an ``MlflowCallback`` to ``dspy.settings.callbacks``; OpenInference's
``DSPyInstrumentor`` (Phoenix, Langfuse, Arize) wraps ``dspy.LM.__call__`` with ``wrapt``. The check
runs at the start of every outermost pipeline call, so it follows instrumentors turned on or off
later.

**Content** (inputs, outputs, prompts, completions) is recorded only with
``instrument(record_content=True)``, as OpenInference's ``input.value`` / ``output.value`` JSON,
after :func:`stageflow.observe.redact.redact` removed anything that looks like a credential.
Model settings such as API keys are never recorded.

**No tracer provider, no cost.** With ``opentelemetry-api`` installed but no SDK tracer provider
set (the API's proxy or no-op provider), :func:`instrument` installs nothing — every span would be
dropped — and logs a warning saying so; stages then cost exactly what they cost uninstrumented.
Set the provider first (``opentelemetry.trace.set_tracer_provider``), or pass
``instrument(tracer_provider=...)``, then instrument.

Examples:
    >>> from stageflow.observe import otel
    >>> otel.is_instrumented()
    False
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import threading
import types
import weakref
from contextvars import ContextVar, Token
from typing import Any, NamedTuple

from stageflow._version import __version__
from stageflow.engine.hooks import Hook, current_path, install_hook, uninstall_hook
from stageflow.errors import ConfigurationError, StageflowError
from stageflow.observe._json import dumps
from stageflow.observe.redact import redact, redact_text
from stageflow.observe.tracer import jsonable
from stageflow.usage import unwatch_lm_calls, watch_lm_calls

__all__ = [
    "OtelHook",
    "has_tracer_provider",
    "instrument",
    "instrument_otel",
    "is_instrumented",
    "other_lm_instrumentation",
    "uninstrument",
    "uninstrument_otel",
]

logger = logging.getLogger("stageflow")

#: Longest JSON text recorded as ``input.value`` / ``output.value`` (characters).
CONTENT_LIMIT = 16_000
# LM-span modes of one pipeline call: stageflow makes them, another instrumentor does, or nobody.
_OWN, _OTHER, _OFF = "own", "other", "off"


def _otel() -> Any:
    try:
        from opentelemetry import context, trace
    except ImportError as e:  # pragma: no cover - exercised without the extra installed
        raise ConfigurationError(
            "OpenTelemetry instrumentation needs the OpenTelemetry API, which is not installed.",
            code="missing_dependency",
            hint="pip install 'stageflow[otel]' (and an SDK or exporter, e.g. opentelemetry-sdk)",
        ) from e
    return trace, context


def has_tracer_provider() -> bool:
    """Whether a real tracer provider is set globally (not the API's proxy or no-op default)."""
    trace, _ = _otel()
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def _is_wrapped(attr: Any) -> bool:
    """A class attribute replaced by a wrapping proxy (``wrapt``), not a plain (decorated) function."""
    # type(), not isinstance(): a proxy reports the wrapped function's class as its own __class__.
    if type(attr) in (types.FunctionType, staticmethod, classmethod):
        return False
    return hasattr(attr, "__wrapped__")


def other_lm_instrumentation(exclude: Any = None) -> str | None:
    """What else makes spans for DSPy's LM calls right now, or ``None``.

    Detected: a DSPy callback in ``dspy.settings.callbacks`` (global or in the current
    ``dspy.context``) that handles LM calls — it overrides ``on_lm_start``, like MLflow's
    ``MlflowCallback`` — other than ``exclude``; or ``dspy.LM`` / ``dspy.BaseLM`` call methods
    replaced by a ``wrapt`` proxy, as OpenInference's ``DSPyInstrumentor`` does.
    """
    dspy = sys.modules.get("dspy")
    if dspy is None:
        return None
    from dspy.utils.callback import BaseCallback

    for cb in dspy.settings.callbacks or ():
        if cb is exclude:
            continue
        handler = getattr(type(cb), "on_lm_start", None)
        if handler is not None and handler is not BaseCallback.on_lm_start:
            return f"DSPy callback {type(cb).__module__}.{type(cb).__qualname__}"
    for cls in (dspy.LM, dspy.BaseLM):
        for name in ("__call__", "acall", "forward", "aforward"):
            attr = inspect.getattr_static(cls, name, None)
            if attr is not None and _is_wrapped(attr):
                return f"{cls.__name__}.{name} wrapped by {type(attr).__module__}.{type(attr).__qualname__}"
    return None


class _Frame:
    """An open span of this hook in the current context (runs and stages nest like the work)."""

    __slots__ = (
        "carrier",
        "dspy_context",
        "ended",
        "is_run",
        "lm_mode",
        "lock",
        "open",
        "otel_token",
        "parent",
        "path",
        "run",
        "span",
        "token",
        "totals",
    )

    def __init__(self, span: Any, path: str, parent: _Frame | None, lm_mode: str, is_run: bool) -> None:
        self.span = span
        self.path = path
        self.parent = parent
        self.lm_mode = lm_mode
        self.is_run = is_run
        self.carrier = False
        self.ended = False
        self.otel_token: Any = None
        self.token: Token[_Frame | None] | None = None
        self.dspy_context: Any = None
        self.totals: dict[str, Any] | None = {} if is_run else None
        self.lock = threading.Lock() if is_run else None
        # Stage spans still open in this run (a cancelled task never reports its stage's end).
        self.open: set[_Frame] | None = set() if is_run else None
        self.run: _Frame | None = self if is_run else (parent.run if parent is not None else None)


def _content(prefix: str, value: Any) -> dict[str, str]:
    text = dumps(redact(jsonable(value, limit=4000)))
    if len(text) > CONTENT_LIMIT:
        text = text[:CONTENT_LIMIT] + "…"
    return {f"{prefix}.value": text, f"{prefix}.mime_type": "application/json"}


def _unwrap(stage: Any) -> Any:
    stages = sys.modules.get("stageflow.stages")
    while stages is not None and isinstance(stage, stages.Stage):
        stage = stage.module
    return stage


def _readable_name(obj: Any) -> str | None:
    name = getattr(obj, "stage_name", None)
    return name if isinstance(name, str) and name and name != "<lambda>" else None


class _Described(NamedTuple):
    """What a stage object is, for its spans (computed once per stage object)."""

    kind: str  # OpenInference span kind: CHAIN, LLM or RETRIEVER
    predictor: Any  # the dspy.Predict whose model the stage calls, or None
    composite: bool  # a stageflow pipeline
    name: str | None  # a readable name the user gave
    type_name: str


_DESCRIBED: weakref.WeakKeyDictionary[Any, _Described] = weakref.WeakKeyDictionary()


def _describe(stage: Any) -> _Described:
    """How a stage (the object a pipeline holds) appears in spans; cached per object."""
    try:
        hit = _DESCRIBED.get(stage)
    except TypeError:  # not weak-referenceable or not hashable: describe it every time
        hit = None
    if hit is not None:
        return hit
    obj = _unwrap(stage)
    name = _readable_name(obj)
    described = _Described("CHAIN", None, False, name, type(obj).__name__)
    base = sys.modules.get("stageflow.patterns.base")
    dspy = sys.modules.get("dspy")
    fn = getattr(obj, "fn", None)
    words = f"{type(obj).__name__} {name or ''} {type(fn).__name__ if fn else ''}".lower()
    if base is not None and isinstance(obj, base.Pipeline):
        described = described._replace(composite=True)
    elif "retriev" in words:
        described = described._replace(kind="RETRIEVER")
    elif dspy is not None and isinstance(obj, dspy.Predict):
        described = described._replace(kind="LLM", predictor=obj)
    elif dspy is not None and isinstance(obj, dspy.ChainOfThought):
        inner = getattr(obj, "predict", None)
        if isinstance(inner, dspy.Predict):
            described = described._replace(kind="LLM", predictor=inner)
    with contextlib.suppress(TypeError):
        _DESCRIBED[stage] = described
    return described


def _model_of(predictor: Any) -> str | None:
    lm = getattr(predictor, "lm", None)
    if lm is None:
        dspy = sys.modules.get("dspy")
        lm = dspy.settings.lm if dspy is not None else None
    model = getattr(lm, "model", None)
    return model if isinstance(model, str) else None


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _usage_attributes(usage: dict[str, Any], carrier: bool) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    lm_calls = usage.get("lm_calls") or 0
    tokens_in = usage.get("input_tokens") or 0
    tokens_out = usage.get("output_tokens") or 0
    if lm_calls or usage.get("lm_cache_hits"):
        attrs["stageflow.usage.lm_calls"] = lm_calls
        attrs["stageflow.usage.input_tokens"] = tokens_in
        attrs["stageflow.usage.output_tokens"] = tokens_out
        attrs["stageflow.usage.lm_cache_hits"] = usage.get("lm_cache_hits") or 0
    cost = _number(usage.get("cost"))
    if cost is not None:
        attrs["stageflow.usage.cost"] = float(cost)
    if carrier and lm_calls:
        attrs["gen_ai.usage.input_tokens"] = tokens_in
        attrs["gen_ai.usage.output_tokens"] = tokens_out
        attrs["llm.token_count.prompt"] = tokens_in
        attrs["llm.token_count.completion"] = tokens_out
        attrs["llm.token_count.total"] = tokens_in + tokens_out
    attrs["stageflow.cache_hit"] = bool(usage.get("cache_hits"))
    if usage.get("retries"):
        attrs["stageflow.retries"] = usage["retries"]
    if usage.get("repairs"):
        attrs["stageflow.repairs"] = usage["repairs"]
    return attrs


def _add(totals: dict[str, Any], usage: dict[str, Any]) -> None:
    for k, v in usage.items():
        if _number(v) is not None:
            totals[k] = totals.get(k, 0) + v


def _error_cause(error: BaseException) -> BaseException:
    """The user's exception behind stageflow's ``StageError`` wrapper (else the error itself)."""
    if isinstance(error, StageflowError) and error.code == "stage_failed" and error.__cause__ is not None:
        return error.__cause__
    return error


class OtelHook(Hook):
    """The engine hook that makes the spans (see the module docstring); build it with :func:`instrument`.

    Args:
        tracer: An OpenTelemetry ``Tracer``.
        record_content: Record inputs, outputs, prompts and completions (redacted).
        lm_spans: ``None`` (make LM-call spans unless another instrumentor does), ``True`` (always),
            ``False`` (never; token counts then go on the leaf stage spans).
    """

    def __init__(self, tracer: Any, *, record_content: bool = False, lm_spans: bool | None = None) -> None:
        trace, context = _otel()
        self._tracer = tracer
        self._trace = trace
        self._context = context
        self.record_content = record_content
        self.lm_spans = lm_spans
        self._frame: ContextVar[_Frame | None] = ContextVar("stageflow_otel_frame", default=None)
        self._lm_calls: dict[str, tuple[Any, Any]] = {}
        self._callback: Any = None

    # -- frames ---------------------------------------------------------------------------------------
    def _push(self, span: Any, path: str, parent: _Frame | None, lm_mode: str, is_run: bool) -> _Frame:
        frame = _Frame(span, path, parent, lm_mode, is_run)
        frame.otel_token = self._context.attach(self._trace.set_span_in_context(span))
        frame.token = self._frame.set(frame)
        return frame

    def _pop(self, path: str, is_run: bool) -> _Frame | None:
        frame = self._frame.get()
        if frame is None or frame.path != path or frame.is_run != is_run:
            return None  # opened before instrumentation started, or its start failed: nothing to end
        self._frame.reset(frame.token)  # type: ignore[arg-type]
        self._context.detach(frame.otel_token)
        return frame

    def _lm_mode(self) -> str:
        if self.lm_spans is False or "dspy" not in sys.modules:
            return _OFF
        if self.lm_spans is None and other_lm_instrumentation(exclude=self._callback) is not None:
            return _OTHER
        return _OWN

    def _enter_lm_callbacks(self, frame: _Frame) -> None:
        import dspy

        if self._callback is None:
            self._callback = _callback_class()(self)
        cm = dspy.settings.context(callbacks=[*(dspy.settings.callbacks or ()), self._callback])
        cm.__enter__()
        frame.dspy_context = cm

    # -- runs -------------------------------------------------------------------------------------------
    def on_run_start(self, *, path: str, pipeline: Any, inputs: dict[str, Any], **future: Any) -> None:
        if path:
            return  # a nested pipeline: the span of the stage that holds it stands for it
        name = type(pipeline).__name__
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_workflow",
            "gen_ai.workflow.name": name,
            "openinference.span.kind": "CHAIN",
            "stageflow.pipeline.type": name,
        }
        if self.record_content:
            attrs.update(_content("input", inputs))
        lm_mode = self._lm_mode()
        attrs["stageflow.lm_spans"] = lm_mode
        span = self._tracer.start_span(f"invoke_workflow {name}", attributes=attrs)
        frame = self._push(span, path, self._frame.get(), lm_mode, True)
        if lm_mode == _OWN:
            self._enter_lm_callbacks(frame)

    def on_run_end(
        self,
        *,
        path: str,
        pipeline: Any,
        outputs: dict[str, Any] | None,
        error: BaseException | None,
        elapsed: float,
        **future: Any,
    ) -> None:
        if path:
            return
        frame = self._pop(path, True)
        if frame is None:
            return
        if frame.dspy_context is not None:
            frame.dspy_context.__exit__(None, None, None)
        self._end_abandoned(frame)
        span = frame.span
        if frame.totals:
            span.set_attributes(_usage_attributes(frame.totals, carrier=False))
        if error is not None:
            self._fail(span, error)
        elif self.record_content and outputs is not None:
            span.set_attributes(_content("output", outputs))
        span.end()

    # -- stages -----------------------------------------------------------------------------------------
    def before_stage(self, *, path: str, stage: Any, inputs: dict[str, Any], **future: Any) -> None:
        parent = self._frame.get()
        lm_mode = parent.lm_mode if parent is not None else _OFF
        d = _describe(stage)
        kind = d.kind if d.kind != "LLM" or lm_mode == _OFF else "CHAIN"
        attrs: dict[str, Any] = {
            "stageflow.stage.path": path,
            "stageflow.stage.type": d.type_name,
            "openinference.span.kind": kind,
        }
        if d.name is not None:
            attrs["stageflow.stage.name"] = d.name
        if d.predictor is not None:
            model = _model_of(d.predictor)
            if model is not None:
                attrs["gen_ai.request.model"] = model
                if kind == "LLM":
                    attrs["llm.model_name"] = model
        if self.record_content:
            attrs.update(_content("input", inputs))
        span = self._tracer.start_span(d.name or path or d.type_name, attributes=attrs)
        frame = self._push(span, path, parent, lm_mode, False)
        frame.carrier = lm_mode == _OFF and not d.composite
        run = frame.run
        if run is not None and run.lock is not None and run.open is not None:
            with run.lock:
                run.open.add(frame)

    def _end_stage(self, path: str, usage: dict[str, Any] | None) -> _Frame | None:
        frame = self._pop(path, False)
        if frame is None:
            return None
        run = frame.run
        if run is not None and run.lock is not None and run.open is not None:
            with run.lock:
                run.open.discard(frame)
                if frame.ended:
                    return None  # the run ended first and closed this span (an abandoned branch)
                if usage and frame.parent is run and run.totals is not None:
                    _add(run.totals, usage)
        if usage:  # (none reported: no LM call, cache hit, retry or repair happened)
            frame.span.set_attributes(_usage_attributes(usage, frame.carrier))
        return frame

    def after_stage(self, *, path: str, outputs: Any, elapsed: float, **future: Any) -> None:
        frame = self._end_stage(path, future.get("usage"))
        if frame is None:
            return
        if self.record_content:
            frame.span.set_attributes(_content("output", outputs))
        frame.span.end()

    def on_stage_error(self, *, path: str, error: BaseException, elapsed: float, **future: Any) -> None:
        frame = self._end_stage(path, future.get("usage"))
        if frame is None:
            return
        self._fail(frame.span, error)
        frame.span.end()

    def _end_abandoned(self, run: _Frame) -> None:
        """End the stage spans of ``run`` that never reported their end: a cancelled task (a
        fail-fast fan-out, a timeout) runs no hook after its stage, and an unended span is never
        exported. They end with an error status saying so."""
        if run.lock is None or run.open is None:
            return
        with run.lock:
            abandoned = list(run.open)
            run.open.clear()
            for frame in abandoned:
                frame.ended = True
        message = "the pipeline call ended before this stage did (cancelled or abandoned)"
        for frame in abandoned:
            frame.span.set_attribute("stageflow.abandoned", True)
            frame.span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, message))
            frame.span.end()

    def _fail(self, span: Any, error: BaseException) -> None:
        cause = _error_cause(error)
        message = redact_text(f"{type(cause).__name__}: {cause}")[:2000]
        attrs: dict[str, Any] = {"error.type": type(cause).__qualname__}
        code = getattr(error, "code", None)
        if isinstance(code, str):
            attrs["stageflow.error.code"] = code
        span.set_attributes(attrs)
        span.add_event(
            "exception",
            {"exception.type": type(cause).__qualname__, "exception.message": message},
        )
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, message))

    # -- LM calls (DSPy callbacks) ---------------------------------------------------------------------
    def lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        """A DSPy LM call starts inside an instrumented pipeline call."""
        model = getattr(instance, "model", None)
        model = model if isinstance(model, str) else type(instance).__name__
        operation = "chat" if getattr(instance, "model_type", "chat") == "chat" else "text_completion"
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "openinference.span.kind": "LLM",
            "llm.model_name": model,
            "stageflow.stage.path": current_path(),
        }
        if "/" in model:
            attrs["gen_ai.provider.name"] = attrs["llm.provider"] = model.split("/", 1)[0]
        settings = {**(getattr(instance, "kwargs", None) or {}), **(inputs.get("kwargs") or {})}
        for key, attr in (("temperature", "temperature"), ("max_tokens", "max_tokens"), ("top_p", "top_p")):
            value = _number(settings.get(key))
            if value is not None:
                attrs[f"gen_ai.request.{attr}"] = value
        if self.record_content:
            messages = inputs.get("messages") or inputs.get("prompt")
            attrs.update(_content("input", messages))
        span = self._tracer.start_span(f"{operation} {model}", attributes=attrs)
        self._lm_calls[call_id] = (span, watch_lm_calls())

    def lm_end(self, call_id: str, outputs: Any, exception: BaseException | None) -> None:
        """The DSPy LM call ``call_id`` ended."""
        item = self._lm_calls.pop(call_id, None)
        if item is None:
            return
        span, (calls, token) = item
        # (ValueError: ended in another context than it started; the collection stops anyway.)
        with contextlib.suppress(ValueError):
            unwatch_lm_calls(token)
        if calls:
            self._lm_usage(span, calls[-1])
        if exception is not None:
            self._fail(span, exception)
        elif self.record_content and outputs is not None:
            span.set_attributes(_content("output", outputs))
        span.end()

    @staticmethod
    def _lm_usage(span: Any, call: dict[str, Any]) -> None:
        usage = call.get("usage") or {}
        attrs: dict[str, Any] = {"stageflow.lm.cache_hit": bool(call.get("cache_hit"))}
        if isinstance(call.get("response_model"), str):
            attrs["gen_ai.response.model"] = call["response_model"]
        if not call.get("cache_hit"):
            tokens_in = _number(usage.get("prompt_tokens", usage.get("input_tokens")))
            tokens_out = _number(usage.get("completion_tokens", usage.get("output_tokens")))
            if tokens_in is not None:
                attrs["gen_ai.usage.input_tokens"] = attrs["llm.token_count.prompt"] = int(tokens_in)
            if tokens_out is not None:
                attrs["gen_ai.usage.output_tokens"] = attrs["llm.token_count.completion"] = int(tokens_out)
            if tokens_in is not None and tokens_out is not None:
                attrs["llm.token_count.total"] = int(tokens_in + tokens_out)
            cost = _number(call.get("cost"))
            if cost is not None:
                attrs["stageflow.usage.cost"] = float(cost)
        span.set_attributes(attrs)


def _callback_class() -> type:
    from dspy.utils.callback import BaseCallback

    class StageflowLMSpans(BaseCallback):  # type: ignore[misc]
        """DSPy callback that turns LM calls into spans of an :class:`OtelHook`."""

        def __init__(self, hook: OtelHook) -> None:
            self.hook = hook

        def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            self.hook.lm_start(call_id, instance, inputs)

        def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
            self.hook.lm_end(call_id, outputs, exception)

    return StageflowLMSpans


_INSTALLED: list[OtelHook | None] = [None]
_LOCK = threading.Lock()


def instrument(
    *, tracer_provider: Any = None, record_content: bool = False, lm_spans: bool | None = None
) -> OtelHook | None:
    """Make OpenTelemetry spans for every pipeline call in the process (see the module docstring).

    Calling it again replaces the previous instrumentation (with the new options).

    Args:
        tracer_provider: The provider to use (default: the global one).
        record_content: Record inputs, outputs, prompts and completions, with secrets redacted.
        lm_spans: ``None``: a span per LM call unless another instrumentor (MLflow, OpenInference)
            already makes them; ``True``: always; ``False``: never.

    Returns:
        The installed hook, or ``None`` when no tracer provider is set (nothing is installed, and a
        warning says so: spans would go nowhere).

    Raises:
        ConfigurationError: ``opentelemetry-api`` is not installed.
    """
    trace, _ = _otel()
    with _LOCK:
        _uninstall_locked()
        if tracer_provider is None and not has_tracer_provider():
            logger.warning(
                "stageflow: OpenTelemetry has no tracer provider set, so no spans would be recorded; "
                "instrumentation is off (no cost per stage). Set one with "
                "opentelemetry.trace.set_tracer_provider(...) and call instrument() again, or pass "
                "instrument(tracer_provider=...)."
            )
            return None
        provider = tracer_provider or trace.get_tracer_provider()
        hook = OtelHook(
            provider.get_tracer("stageflow", __version__), record_content=record_content, lm_spans=lm_spans
        )
        install_hook(hook)
        _INSTALLED[0] = hook
        return hook


def _uninstall_locked() -> None:
    hook = _INSTALLED[0]
    if hook is not None:
        uninstall_hook(hook)
        _INSTALLED[0] = None


def uninstrument() -> None:
    """Stop making spans (no error when not instrumented)."""
    with _LOCK:
        _uninstall_locked()


def is_instrumented() -> bool:
    """Whether :func:`instrument` is in force."""
    return _INSTALLED[0] is not None


#: :func:`instrument` under the name ``stageflow.instrument_otel``.
instrument_otel = instrument
#: :func:`uninstrument` under the name ``stageflow.uninstrument_otel``.
uninstrument_otel = uninstrument
