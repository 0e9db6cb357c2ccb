"""Span attributes of stageflow's OpenTelemetry instrumentation (:mod:`stageflow.observe.otel`).

Plain functions of stage objects, usage dicts, errors and content: which OpenInference kind a stage
is, its readable name, the GenAI / OpenInference / ``stageflow.*`` attributes of its usage, a failure
as an error status and ``exception`` event, content as redacted JSON.

Examples:
    >>> attrs = usage_attributes({"lm_calls": 1, "input_tokens": 12, "output_tokens": 3}, carrier=True)
    >>> attrs["gen_ai.usage.input_tokens"], attrs["llm.token_count.total"]
    (12, 15)
    >>> content_attributes("input", {"api_key": "x", "q": "hi"})["input.value"]
    '{"api_key": "[REDACTED]", "q": "hi"}'
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from typing import Any, NamedTuple

from stageflow.errors import StageflowError
from stageflow.observe._json import dumps
from stageflow.observe.redact import redact, redact_text
from stageflow.observe.tracer import jsonable

__all__ = [
    "CONTENT_LIMIT",
    "Described",
    "add_usage",
    "content_attributes",
    "describe",
    "lm_call_attributes",
    "lm_usage_attributes",
    "model_of",
    "record_failure",
    "usage_attributes",
]

#: Longest JSON text recorded as ``input.value`` / ``output.value`` (characters).
CONTENT_LIMIT = 16_000


def content_attributes(prefix: str, value: Any) -> dict[str, str]:
    """OpenInference's ``<prefix>.value`` (redacted JSON, cut at :data:`CONTENT_LIMIT`) and ``.mime_type``."""
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


class Described(NamedTuple):
    """What a stage object is, for its spans (computed once per stage object)."""

    kind: str  # OpenInference span kind: CHAIN, LLM or RETRIEVER
    predictor: Any  # the dspy.Predict whose model the stage calls, or None
    composite: bool  # a stageflow pipeline
    name: str | None  # a readable name the user gave
    type_name: str


_DESCRIBED: weakref.WeakKeyDictionary[Any, Described] = weakref.WeakKeyDictionary()


def describe(stage: Any) -> Described:
    """How a stage (the object a pipeline holds) appears in spans; cached per object."""
    try:
        hit = _DESCRIBED.get(stage)
    except TypeError:  # not weak-referenceable or not hashable: describe it every time
        hit = None
    if hit is not None:
        return hit
    obj = _unwrap(stage)
    name = _readable_name(obj)
    described = Described("CHAIN", None, False, name, type(obj).__name__)
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


def model_of(predictor: Any) -> str | None:
    """The model string of the LM a predictor will call (its own, else DSPy's configured one)."""
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


def usage_attributes(usage: dict[str, Any], carrier: bool) -> dict[str, Any]:
    """A stage's (or run's) usage as attributes; token counts in GenAI / OpenInference terms only on
    the ``carrier`` of the LM work (see the module docstring of :mod:`stageflow.observe.otel`)."""
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
    if usage.get("fast_fallbacks"):
        attrs["stageflow.usage.fast_fallbacks"] = usage["fast_fallbacks"]
    return attrs


def add_usage(totals: dict[str, Any], usage: dict[str, Any]) -> None:
    """Add a usage dict's numbers into ``totals``."""
    for k, v in usage.items():
        if _number(v) is not None:
            totals[k] = totals.get(k, 0) + v


def _error_cause(error: BaseException) -> BaseException:
    """The user's exception behind stageflow's ``StageError`` wrapper (else the error itself)."""
    if isinstance(error, StageflowError) and error.code == "stage_failed" and error.__cause__ is not None:
        return error.__cause__
    return error


def record_failure(span: Any, error: BaseException, trace: Any) -> None:
    """Mark ``span`` failed: ``error.type``, an ``exception`` event and an error status, the message
    redacted (``trace`` is the ``opentelemetry.trace`` module)."""
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
    span.set_status(trace.Status(trace.StatusCode.ERROR, message))


def lm_call_attributes(instance: Any, inputs: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """The name and start attributes of the span of a DSPy LM call (``instance`` is the LM)."""
    model = getattr(instance, "model", None)
    model = model if isinstance(model, str) else type(instance).__name__
    operation = "chat" if getattr(instance, "model_type", "chat") == "chat" else "text_completion"
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": model,
        "openinference.span.kind": "LLM",
        "llm.model_name": model,
        "stageflow.stage.path": path,
    }
    if "/" in model:
        attrs["gen_ai.provider.name"] = attrs["llm.provider"] = model.split("/", 1)[0]
    settings = {**(getattr(instance, "kwargs", None) or {}), **(inputs.get("kwargs") or {})}
    for key in ("temperature", "max_tokens", "top_p"):  # numbers only: never a key or a header
        value = _number(settings.get(key))
        if value is not None:
            attrs[f"gen_ai.request.{key}"] = value
    return f"{operation} {model}", attrs


def lm_usage_attributes(call: dict[str, Any]) -> dict[str, Any]:
    """The end attributes of an LM call's span, from what :func:`stageflow.usage.watch_lm_calls` saw."""
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
    return attrs
