"""OpenTelemetry spans for every pipeline run, stage and LM call (``pip install 'stageflow[otel]'``).

:func:`stageflow.instrument_otel` (:func:`instrument` here) installs one process-wide hook
(:func:`stageflow.engine.hooks.install_hook`):

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
  with an error status. A stage whose task is cancelled (a fail-fast fan-out, an ensemble's
  quorum) ends when it is cancelled, with an error status and ``stageflow.cancelled``; one still
  running when its pipeline call ends (a sync branch abandoned on its thread) ends then, with an
  error status and ``stageflow.abandoned``: every span that starts is exported;
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
``stageflow.instrument_otel(record_content=True)``, as OpenInference's ``input.value`` /
``output.value`` JSON, after :func:`stageflow.observe.redact.redact` removed anything that looks
like a credential.
Model settings such as API keys are never recorded.

**No tracer provider, no cost.** With ``opentelemetry-api`` installed but no SDK tracer provider
set (the API's proxy or no-op provider), :func:`instrument` installs nothing — every span would be
dropped — and logs a warning saying so; stages then cost exactly what they cost uninstrumented.
Set the provider first (``opentelemetry.trace.set_tracer_provider``), or pass
``stageflow.instrument_otel(tracer_provider=...)``, then instrument.

Examples:
    >>> from stageflow.observe import otel
    >>> otel.is_instrumented()
    False
"""

from __future__ import annotations

import logging
import sys
import threading
from contextvars import ContextVar, Token
from typing import Any

from stageflow._version import __version__
from stageflow.engine.hooks import Hook, install_hook, uninstall_hook
from stageflow.errors import ConfigurationError
from stageflow.observe.otel_attributes import (
    add_usage,
    content_attributes,
    describe,
    model_of,
    record_failure,
    usage_attributes,
)
from stageflow.observe.otel_lm import LMSpans, other_lm_instrumentation

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


class OtelHook(Hook):
    """The engine hook that makes the spans (see the module docstring); build it with :func:`instrument`.

    Args:
        tracer: An OpenTelemetry ``Tracer``.
        record_content: Record inputs, outputs, prompts and completions (redacted).
        lm_spans: ``None`` (make LM-call spans unless another instrumentor does), ``True`` (always),
            ``False`` (never; token counts then go on the leaf stage spans).
    """

    #: A forked batch worker process exports its own spans (the process backend flushes them when
    #: the worker stops), so this hook may be in force for ``run_batch(..., backend="processes")``.
    exports_from_workers = True
    #: The tracer provider the spans go to, when known (:func:`instrument` sets it).
    provider: Any = None

    def flush(self, timeout_ms: int = 5000) -> None:
        """Export the spans still buffered (a batch worker process does this before it stops)."""
        provider = self.provider if self.provider is not None else self._trace.get_tracer_provider()
        force = getattr(provider, "force_flush", None)
        if callable(force):
            force(timeout_ms)

    def __init__(self, tracer: Any, *, record_content: bool = False, lm_spans: bool | None = None) -> None:
        trace, context = _otel()
        self._tracer = tracer
        self._trace = trace
        self._context = context
        self.record_content = record_content
        self.lm_spans = lm_spans
        self._frame: ContextVar[_Frame | None] = ContextVar("stageflow_otel_frame", default=None)
        self._lm = LMSpans(tracer, trace, record_content=record_content)

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
        if self.lm_spans is None and other_lm_instrumentation(exclude=self._lm._callback) is not None:
            return _OTHER
        return _OWN

    def _enter_lm_callbacks(self, frame: _Frame) -> None:
        import dspy

        cm = dspy.settings.context(callbacks=[*(dspy.settings.callbacks or ()), self._lm.callback])
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
            attrs.update(content_attributes("input", inputs))
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
            span.set_attributes(usage_attributes(frame.totals, carrier=False))
        if error is not None:
            record_failure(span, error, self._trace)
        elif self.record_content and outputs is not None:
            span.set_attributes(content_attributes("output", outputs))
        span.end()

    # -- stages -----------------------------------------------------------------------------------------
    def before_stage(self, *, path: str, stage: Any, inputs: dict[str, Any], **future: Any) -> None:
        parent = self._frame.get()
        lm_mode = parent.lm_mode if parent is not None else _OFF
        d = describe(stage)
        kind = d.kind if d.kind != "LLM" or lm_mode == _OFF else "CHAIN"
        attrs: dict[str, Any] = {
            "stageflow.stage.path": path,
            "stageflow.stage.type": d.type_name,
            "openinference.span.kind": kind,
        }
        if d.name is not None:
            attrs["stageflow.stage.name"] = d.name
        if d.predictor is not None:
            model = model_of(d.predictor)
            if model is not None:
                attrs["gen_ai.request.model"] = model
                if kind == "LLM":
                    attrs["llm.model_name"] = model
        if self.record_content:
            attrs.update(content_attributes("input", inputs))
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
                    add_usage(run.totals, usage)
        if usage:  # (none reported: no LM call, cache hit, retry or repair happened)
            frame.span.set_attributes(usage_attributes(usage, frame.carrier))
        return frame

    def after_stage(self, *, path: str, outputs: Any, elapsed: float, **future: Any) -> None:
        frame = self._end_stage(path, future.get("usage"))
        if frame is None:
            return
        if self.record_content:
            frame.span.set_attributes(content_attributes("output", outputs))
        frame.span.end()

    def on_stage_error(self, *, path: str, error: BaseException, elapsed: float, **future: Any) -> None:
        frame = self._end_stage(path, future.get("usage"))
        if frame is None:
            return
        record_failure(frame.span, error, self._trace)
        if future.get("cancelled"):
            frame.span.set_attribute("stageflow.cancelled", True)
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
                "opentelemetry.trace.set_tracer_provider(...) and call stageflow.instrument_otel() again, or "
                "pass stageflow.instrument_otel(tracer_provider=...)."
            )
            return None
        provider = tracer_provider or trace.get_tracer_provider()
        hook = OtelHook(
            provider.get_tracer("stageflow", __version__), record_content=record_content, lm_spans=lm_spans
        )
        hook.provider = provider
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
