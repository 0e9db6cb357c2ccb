"""Translate a DSPy (lm15) request into llama-cpp-python arguments (chat messages, sampling settings,
a grammar for the requested JSON schema), and llama.cpp's errors back."""

from __future__ import annotations

import logging
from typing import Any

from dspy.clients.engines.base import validate_request
from dspy.lm15 import ContextLengthError, Request, TextPart, ThinkingPart, UnsupportedFeatureError

from stageflow.lm import grammar as _grammar

__all__ = ["PROVIDER", "chat_messages", "generation_kwargs", "grammar_text", "translate_error"]

logger = logging.getLogger(__name__)

PROVIDER = "llama.cpp"


def _text_parts(parts: Any, where: str) -> str:
    texts: list[str] = []
    for j, part in enumerate(parts):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ThinkingPart):
            continue  # a demo's hidden reasoning is not replayed to the model
        else:
            raise UnsupportedFeatureError(
                f"the local llama.cpp engine reads text only; {where}.parts[{j}] is {type(part).__name__}",
                feature=f"{where}.parts[{j}]",
                provider=PROVIDER,
            )
    return "\n".join(texts)


def chat_messages(request: Request) -> list[dict[str, str]]:
    """The request's system prompt and messages as llama-cpp-python chat messages (text only)."""
    messages: list[dict[str, str]] = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else _text_parts(request.system, "system")
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(request.messages):
        if message.role == "tool":
            raise UnsupportedFeatureError(
                "the local llama.cpp engine does not support tool calls",
                feature=f"messages[{i}]",
                provider=PROVIDER,
            )
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": _text_parts(message.parts, f"messages[{i}]")})
    return messages


def translate_error(exc: Exception) -> Exception | None:
    """A llama.cpp context overflow as lm15's ``ContextLengthError`` (``None`` for other errors)."""
    text = str(exc)
    if "exceed context window" in text or "llama_decode returned 1" in text:
        error: Exception = ContextLengthError(f"llama.cpp: {text}", provider=PROVIDER)
        return error
    return None


def grammar_text(response_format: Any, *, max_string_length: int, max_items: int) -> str | None:
    """The GBNF grammar enforcing ``response_format`` (``None``: free text).

    Raises:
        UnsupportedFeatureError: a ``response_format`` the engine cannot honour.
    """
    try:
        schema, json_mode = _grammar.schema_from_response_format(response_format)
    except ValueError as exc:
        raise UnsupportedFeatureError(
            f"the local llama.cpp engine cannot honour this response_format: {exc}",
            feature="config.response_format",
            provider=PROVIDER,
        ) from exc
    if not json_mode:
        return None
    if schema is None:
        return _grammar.json_object_gbnf()
    try:
        return _grammar.schema_to_gbnf(schema, max_string_length=max_string_length, max_items=max_items)
    except ValueError as exc:
        logger.warning("Falling back to a generic JSON-object grammar: %s", exc)
        return _grammar.json_object_gbnf()


def generation_kwargs(
    request: Request,
    *,
    max_string_length: int,
    max_items: int,
    repeat_penalty: float,
    default_max_tokens: int,
) -> dict[str, Any]:
    """The ``create_chat_completion`` arguments for ``request`` (temperature 0 unless set).

    Raises:
        UnsupportedFeatureError: tools, non-text parts, or an unsupported ``response_format``.
    """
    validate_request(request)
    if request.tools:
        raise UnsupportedFeatureError(
            "the local llama.cpp engine does not support tools", feature="tools", provider=PROVIDER
        )
    config = request.config
    kwargs: dict[str, Any] = {
        "messages": chat_messages(request),
        "temperature": 0.0 if config.temperature is None else config.temperature,
        "max_tokens": config.max_tokens or default_max_tokens,
        "repeat_penalty": repeat_penalty,
    }
    if config.top_p is not None:
        kwargs["top_p"] = config.top_p
    if config.top_k is not None:
        kwargs["top_k"] = config.top_k
    if config.seed is not None:
        kwargs["seed"] = config.seed
    if config.stop:
        kwargs["stop"] = list(config.stop)
    gbnf = grammar_text(config.response_format, max_string_length=max_string_length, max_items=max_items)
    if gbnf is not None:
        from llama_cpp import LlamaGrammar

        kwargs["grammar"] = LlamaGrammar.from_string(gbnf, verbose=False)
    return kwargs
