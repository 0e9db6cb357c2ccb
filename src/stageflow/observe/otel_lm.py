"""LM-call spans for :mod:`stageflow.observe.otel`, and how to tell that someone else makes them.

stageflow's LM-call spans come from DSPy's ``on_lm_start`` / ``on_lm_end`` callbacks; the callback
is registered in DSPy's settings only for the duration of an instrumented pipeline call.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from typing import Any

from stageflow.engine.hooks import current_path
from stageflow.observe.otel_attributes import (
    content_attributes,
    lm_call_attributes,
    lm_usage_attributes,
    record_failure,
)
from stageflow.usage import unwatch_lm_calls, watch_lm_calls

__all__ = ["LMSpans", "other_lm_instrumentation"]


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
    replaced by a wrapping proxy (``wrapt``), as OpenInference's ``DSPyInstrumentor`` does.
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


class LMSpans:
    """Makes a span per DSPy LM call under the current span; :meth:`callback` is the DSPy callback.

    Args:
        tracer: An OpenTelemetry ``Tracer``.
        trace: The ``opentelemetry.trace`` module.
        record_content: Record prompts and completions (redacted).
    """

    def __init__(self, tracer: Any, trace: Any, *, record_content: bool) -> None:
        self._tracer = tracer
        self._trace = trace
        self.record_content = record_content
        self._open: dict[str, tuple[Any, Any]] = {}
        self._callback: Any = None

    @property
    def callback(self) -> Any:
        """The DSPy ``BaseCallback`` that feeds this object (made on first use: it imports DSPy)."""
        if self._callback is None:
            self._callback = _callback_class()(self)
        return self._callback

    def start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        """A DSPy LM call starts (in the stage's context, so the stage's span is the parent)."""
        name, attrs = lm_call_attributes(instance, inputs, current_path())
        if self.record_content:
            attrs.update(content_attributes("input", inputs.get("messages") or inputs.get("prompt")))
        span = self._tracer.start_span(name, attributes=attrs)
        self._open[call_id] = (span, watch_lm_calls())

    def end(self, call_id: str, outputs: Any, exception: BaseException | None) -> None:
        """The DSPy LM call ``call_id`` ended."""
        item = self._open.pop(call_id, None)
        if item is None:
            return
        span, (calls, token) = item
        # (ValueError: ended in another context than it started; the collection stops anyway.)
        with contextlib.suppress(ValueError):
            unwatch_lm_calls(token)
        if calls:
            span.set_attributes(lm_usage_attributes(calls[-1]))
        if exception is not None:
            record_failure(span, exception, self._trace)
        elif self.record_content and outputs is not None:
            span.set_attributes(content_attributes("output", outputs))
        span.end()


def _callback_class() -> type:
    from dspy.utils.callback import BaseCallback

    class StageflowLMSpans(BaseCallback):  # type: ignore[misc]
        """DSPy callback that turns LM calls into spans (see :class:`LMSpans`)."""

        def __init__(self, spans: LMSpans) -> None:
            self.spans = spans

        def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            self.spans.start(call_id, instance, inputs)

        def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
            self.spans.end(call_id, outputs, exception)

    return StageflowLMSpans
