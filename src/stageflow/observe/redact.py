"""Remove secrets from content before it leaves the process: one policy for everything stageflow
records — saved traces (:class:`~stageflow.Tracer`), the HTML report, profiles' error messages and
OpenTelemetry spans (content, error status and ``exception`` events).

Two rules, applied to any nesting of mappings, lists and strings:

- a mapping key that names a credential (``api_key``, ``apikey``, ``apiKey``, ``x-api-key``,
  ``authorization``, ``password``, ``secret``, ``token``, ``access_token``, ``cookie``,
  ``private_key``, ``credentials`` … — case-insensitive, matched on the key's last word, so
  ``max_tokens`` and ``prompt_tokens`` stay) has its value replaced, at any depth;
- inside any string (error messages included), text shaped like a credential is replaced:
  ``Bearer …`` / ``Basic …`` authorization values, the password of a URL
  (``https://user:PASSWORD@host/``), OpenAI/Anthropic-style keys (``sk-…``), AWS access key ids,
  GitHub and Slack tokens, JSON Web Tokens, and ``key=value`` pairs whose key names a credential.

The replacement is :data:`REDACTED`. Redaction is deliberately greedy: a false positive costs a
few characters of a trace; a false negative leaks a key.

Examples:
    >>> redact({"api_key": "abc", "question": "use sk-abcdefghijklmnop1234 please", "max_tokens": 5})
    {'api_key': '[REDACTED]', 'question': 'use [REDACTED] please', 'max_tokens': 5}
    >>> redact_text("Authorization: Bearer eyJhbGciOi.abc.def")
    'Authorization: [REDACTED]'
    >>> redact_text("GET https://admin:hunter2@db.internal/ failed")
    'GET https://admin:[REDACTED]@db.internal/ failed'
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "is_secret_key", "redact", "redact_events", "redact_text"]

REDACTED = "[REDACTED]"

_SECRET_WORD = (
    r"api[_-]?key|apikey|api[_-]?token|authorization|auth|password|passwd|pwd|passphrase|secret|"
    r"client[_-]?secret|token|access[_-]?token|refresh[_-]?token|id[_-]?token|session[_-]?token|"
    r"bearer|cookie|set[_-]?cookie|private[_-]?key|secret[_-]?key|access[_-]?key|credentials?|"
    r"signature|x[_-]?api[_-]?key"
)
# A key names a secret when its last word (after _, -, . or a space) is one of the words above.
_SECRET_KEY = re.compile(rf"(?:^|[_\-. ])(?:{_SECRET_WORD})$", re.IGNORECASE)

# Each rule: (pattern, flags, triggers). A rule runs only on text holding one of its triggers (looked
# for in the lower-cased text when the rule ignores case): most text holds no secret, and a few
# substring tests cost far less than the regular expressions. A rule with a ``key`` group keeps
# that group and replaces the rest.
_KEY_HINTS = ("key", "token", "auth", "pass", "pwd", "secret", "bearer", "cookie", "credential", "signature")
_RULES: list[tuple[str, re.RegexFlag, tuple[str, ...]]] = [
    # URL userinfo: "https://user:PASSWORD@host/" keeps the user and the host.
    (
        r"(?P<key>\b[a-z][a-z0-9+.\-]*://[^\s/:@]+:)(?P<value>[^\s/?#]+)(?=@[^\s/@?#]+)",
        re.IGNORECASE,
        ("://",),
    ),
    # Authorization header values: "Bearer <token>", "Basic <base64>", "Token <x>".
    (r"\b(?:Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]{6,}", re.IGNORECASE, ("bearer", "basic", "token")),
    # key=value / key: value / "key": "value" where the key names a credential (the key's text
    # before the credential word, as in my_api_key=, is kept as it is). After "=", a space goes
    # before a quoted value only ("api_key= on dspy.LM" is prose); a placeholder ("...", <your key>)
    # is not a secret, so a fix hint stays readable.
    (
        rf"""(?P<key>(?:{_SECRET_WORD})["']?(?:\s*:\s*|\s*=\s*(?=["'])|\s*=))"""
        r"""(?!["']?\.\.\.["']?(?![^\s,;&)}\]]))(?!<[^>\n]{0,40}>)"""
        r"""(?P<value>"[^"]*"|'[^']*'|[^\s,;&}'"]+)""",
        re.IGNORECASE,
        _KEY_HINTS,
    ),
    # OpenAI / Anthropic / similar API keys.
    (r"\bsk-[A-Za-z0-9_\-]{8,}", re.NOFLAG, ("sk-",)),
    # AWS access key ids.
    (r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", re.NOFLAG, ("AKIA", "ASIA")),
    # GitHub tokens, Slack tokens, Google API keys.
    (r"\bgh[pousr]_[A-Za-z0-9]{20,}\b", re.NOFLAG, ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    (r"\bxox[abposr]-[A-Za-z0-9\-]{10,}\b", re.NOFLAG, ("xox",)),
    (r"\bAIza[0-9A-Za-z_\-]{30,}\b", re.NOFLAG, ("AIza",)),
    # JSON Web Tokens.
    (r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*", re.NOFLAG, ("eyJ",)),
]
_PATTERNS = [(re.compile(source, flags), bool(flags), triggers) for source, flags, triggers in _RULES]
# Every trigger, lower-cased, in one expression: one search over the lower-cased text decides.
_ANY_TRIGGER = re.compile("|".join(sorted({re.escape(t.lower()) for _, _, ts in _RULES for t in ts})))
# camelCase words: "userPassword" is checked as "user_Password".
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def is_secret_key(key: Any) -> bool:
    """Whether a mapping key names a credential (its value must never be recorded).

    Examples:
        >>> keys = ("api_key", "OPENAI_API_KEY", "API KEY", "Authorization", "max_tokens")
        >>> [is_secret_key(k) for k in keys]
        [True, True, True, True, False]
    """
    return isinstance(key, str) and _secret_name(key)


@functools.lru_cache(maxsize=4096)
def _secret_name(key: str) -> bool:  # field names repeat: each is matched once
    return _SECRET_KEY.search(_CAMEL.sub("_", " ".join(key.split()).replace(" ", "_"))) is not None


def _replace_pair(match: re.Match[str]) -> str:
    key = match.group("key")
    if key is None:
        return REDACTED
    return key + REDACTED


def redact_text(text: str) -> str:
    """``text`` with every credential-shaped part replaced by :data:`REDACTED`."""
    low = text.lower()
    if _ANY_TRIGGER.search(low) is None:
        return text
    for pattern, folded, triggers in _PATTERNS:
        seen = low if folded else text
        if any(t in seen for t in triggers):
            text = pattern.sub(_replace_pair if "key" in pattern.groupindex else REDACTED, text)
            low = text.lower()
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
        if len(value) == 2 and is_secret_key(value[0]):  # a header as a pair: ("X-Api-Key", "...")
            return [value[0], REDACTED]
        return [redact(v) for v in value]
    return value


def redact_events(events: list[Any]) -> list[Any]:
    """Trace events with their ``inputs``, ``outputs`` and ``error`` redacted (for traces written by
    hand or by a stageflow that did not redact yet; a current :class:`~stageflow.Tracer` already did)."""
    out: list[Any] = []
    for event in events:
        if isinstance(event, Mapping) and any(k in event for k in ("inputs", "outputs", "error")):
            event = {k: redact(v) if k in ("inputs", "outputs", "error") else v for k, v in event.items()}
        out.append(event)
    return out
