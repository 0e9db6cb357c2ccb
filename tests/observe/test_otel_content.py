"""Content on spans only when asked for, and never a credential."""

from __future__ import annotations

import json
from typing import Any

import dspy
import pytest
from otel_kit import is_lm_span, is_run_span, stage_spans

import stageflow
from stageflow.observe import otel
from stageflow.observe.redact import REDACTED, is_secret_key, redact, redact_text
from stageflow.testing import FakeLM, call

SECRETS = [
    "sk-proj-abcdefghijklmnopqrstuvwx",
    "hunter2-password-value",
    "AKIAABCDEFGHIJKLMNOP",
    "ghp_abcdefghijklmnopqrstuvwxyz0123",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl",
    "Zm9vOmJhcg-basic-credentials",
    "opaque-bearer-token-123456",
    "cookie-session-abcdef",
]


def _program() -> stageflow.SequentialPipeline:
    def configure(settings: dict[str, Any], question: str) -> dict[str, Any]:
        return {"echo": f"{question} | {settings['headers']['Authorization']}", "settings_seen": settings}

    return stageflow.SequentialPipeline(
        [
            stageflow.stage(configure, writes=["echo", "settings_seen"], name="configure"),
            dspy.Predict("question -> answer"),
        ]
    )


def _inputs() -> dict[str, Any]:
    return {
        "question": f"My key is {SECRETS[0]}, what now?",
        "settings": {
            "api_key": "plain-api-key-value",
            "password": SECRETS[1],
            "aws": SECRETS[2],
            "note": f"token={SECRETS[3]}",
            "jwt": SECRETS[4],
            "headers": {"Authorization": f"Basic {SECRETS[5]}", "X-Other": f"Bearer {SECRETS[6]}"},
            "Cookie": SECRETS[7],
            "max_tokens": 512,
        },
    }


def _all_attribute_text(spans: list[Any]) -> str:
    parts = []
    for s in spans:
        parts.append(json.dumps(dict(s.attributes), default=str))
        parts.extend(json.dumps(dict(e.attributes), default=str) for e in s.events)
        parts.append(s.status.description or "")
    return "\n".join(parts)


@pytest.mark.integration
async def test_no_content_unless_enabled(mode: str, otel_sdk: Any) -> None:
    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider)
    with dspy.context(lm=FakeLM({"answer": "fine"})):
        await call(_program(), mode, **_inputs())
    text = _all_attribute_text(list(exporter.get_finished_spans()))
    assert "input.value" not in text
    assert "output.value" not in text
    assert "what now" not in text


@pytest.mark.integration
async def test_content_is_recorded_with_every_secret_redacted(mode: str, otel_sdk: Any) -> None:
    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider, record_content=True)
    lm = FakeLM({"answer": f"use {SECRETS[0]} carefully"})
    lm.kwargs["api_key"] = "sk-model-kwarg-secret-0123456789"  # how dspy.LM(..., api_key=...) keeps it
    with dspy.context(lm=lm):
        await call(_program(), mode, **_inputs())
    spans = list(exporter.get_finished_spans())
    text = _all_attribute_text(spans)
    for secret in [*SECRETS, "plain-api-key-value", "sk-model-kwarg-secret"]:
        assert secret not in text, secret
    # The content itself is there, in OpenInference's JSON attributes.
    run = next(s for s in spans if is_run_span(s))
    recorded = json.loads(run.attributes["input.value"])
    assert recorded["question"] == f"My key is {REDACTED}, what now?"
    assert recorded["settings"]["api_key"] == REDACTED
    assert recorded["settings"]["max_tokens"] == 512
    assert run.attributes["input.mime_type"] == "application/json"
    configure = stage_spans(spans)["stages[0]"]
    assert "echo" in json.loads(configure.attributes["output.value"])
    lm_span = next(s for s in spans if is_lm_span(s))
    assert "what now" in lm_span.attributes["input.value"]  # the prompt, redacted
    assert REDACTED in lm_span.attributes["output.value"]


def test_redaction_rules() -> None:
    assert [
        is_secret_key(k) for k in ("api_key", "x-api-key", "Authorization", "client_secret", "id_token")
    ] == [True] * 5
    assert [is_secret_key(k) for k in ("max_tokens", "prompt_tokens", "author", "question", "tokenizer")] == [
        False
    ] * 5
    assert redact_text("Authorization: Bearer abc.def-ghi_123") == f"Authorization: {REDACTED}"
    assert redact_text("curl -H 'x-api-key: 12345678'") == f"curl -H 'x-api-key: {REDACTED}'"
    assert redact_text('{"password": "p4ss word"}') == f'{{"password": {REDACTED}}}'
    assert redact_text("the token count was 12; max_tokens=5") == "the token count was 12; max_tokens=5"
    nested = redact({"a": [{"Authorization": "x"}, ("sk-abcdefghijklmnop",)], "n": 3})
    assert nested == {"a": [{"Authorization": REDACTED}, [REDACTED]], "n": 3}
