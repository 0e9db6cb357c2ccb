"""Translate a DSPy (lm15) request into llama-cpp-python chat messages, and its errors back."""

from __future__ import annotations

from typing import Any

from dspy.lm15 import ContextLengthError, Request, TextPart, ThinkingPart, UnsupportedFeatureError

__all__ = ["PROVIDER", "chat_messages", "translate_error"]

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
