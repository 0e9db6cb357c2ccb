"""Remove secrets from content before it leaves the process (span attributes, exported traces).

Two rules, applied to any nesting of mappings, lists and strings:

- a mapping key that names a credential (``api_key``, ``apikey``, ``authorization``, ``password``,
  ``secret``, ``token``, ``access_token``, ``cookie``, ``private_key``, ``credentials`` … — matched
  on the key's last word, so ``max_tokens`` and ``prompt_tokens`` stay) has its value replaced;
- inside any string, text shaped like a credential is replaced: ``Bearer …`` / ``Basic …``
  authorization values, OpenAI/Anthropic-style keys (``sk-…``), AWS access key ids, GitHub and
  Slack tokens, JSON Web Tokens, and ``key=value`` pairs whose key names a credential.

The replacement is :data:`REDACTED`. Redaction is deliberately greedy: a false positive costs a
few characters of a trace; a false negative leaks a key.

Examples:
    >>> redact({"api_key": "abc", "question": "use sk-abcdefghijklmnop1234 please", "max_tokens": 5})
    {'api_key': '[REDACTED]', 'question': 'use [REDACTED] please', 'max_tokens': 5}
    >>> redact_text("Authorization: Bearer eyJhbGciOi.abc.def")
    'Authorization: [REDACTED]'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "is_secret_key", "redact", "redact_text"]

REDACTED = "[REDACTED]"

_SECRET_WORD = (
    r"api[_-]?key|apikey|api[_-]?token|authorization|auth|password|passwd|pwd|passphrase|secret|"
    r"client[_-]?secret|token|access[_-]?token|refresh[_-]?token|id[_-]?token|session[_-]?token|"
    r"bearer|cookie|set[_-]?cookie|private[_-]?key|secret[_-]?key|access[_-]?key|credentials?|"
    r"signature|x[_-]?api[_-]?key"
)
# A key names a secret when its last word (after _, -, . or a space) is one of the words above.
_SECRET_KEY = re.compile(rf"(?:^|[_\-. ])(?:{_SECRET_WORD})$", re.IGNORECASE)

_PATTERNS = [
    # Authorization header values: "Bearer <token>", "Basic <base64>", "Token <x>".
    re.compile(r"\b(?:Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]{6,}", re.IGNORECASE),
    # key=value / key: value / "key": "value" where the key names a credential.
    re.compile(
        rf"""(?ix)
        (?P<key>["']?[\w.\-]*(?:{_SECRET_WORD})["']?\s*[:=]\s*)
        (?P<value>"[^"]*"|'[^']*'|[^\s,;&}}'"]+)
        """
    ),
    # OpenAI / Anthropic / similar API keys.
    re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"),
    # AWS access key ids.
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    # GitHub tokens, Slack tokens, Google API keys.
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9\-]{10,}\b"),
    re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}\b"),
    # JSON Web Tokens.
    re.compile(r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*"),
]


def is_secret_key(key: Any) -> bool:
    """Whether a mapping key names a credential (its value must never be recorded).

    Examples:
        >>> [is_secret_key(k) for k in ("api_key", "OPENAI_API_KEY", "Authorization", "max_tokens")]
        [True, True, True, False]
    """
    return isinstance(key, str) and _SECRET_KEY.search(key.strip()) is not None


def _replace_pair(match: re.Match[str]) -> str:
    key = match.group("key")
    if key is None:
        return REDACTED
    return key + REDACTED


def redact_text(text: str) -> str:
    """``text`` with every credential-shaped part replaced by :data:`REDACTED`."""
    for pattern in _PATTERNS:
        text = pattern.sub(_replace_pair if "key" in pattern.groupindex else REDACTED, text)
    return text


def redact(value: Any) -> Any:
    """A copy of ``value`` (mappings, lists, tuples and strings, nested) with secrets removed.

    Other values are returned as they are: convert objects to text (or JSON-ready data) first.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret_key(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value
