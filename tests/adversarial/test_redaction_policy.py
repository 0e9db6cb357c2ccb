"""One redaction policy for traces, reports, profiles and OpenTelemetry (r_obs_1, r_obs_2).

Before the fix, ``stageflow.trace()`` (content recorded by default) wrote ``api_key``, ``password``,
``Authorization`` and ``Basic …`` values verbatim into trace.json and the HTML report, while
OpenTelemetry export redacted them; and OpenTelemetry missed the password of a URL
(``https://admin:PASSWORD@host/``) in an error message, on the stage span and the run span.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stageflow
from stageflow.observe.redact import REDACTED, is_secret_key, redact, redact_text
from stageflow.observe.report import render_report
from stageflow.testing import call

KEY, PW, TOK = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX1234567890", "hunter2-pass-XYZ", "MYSECRETVALUE42"
BASIC = "dXNlcjpwYXNzd29yZA=="
URL_PW = "s3cr3t-url-pw"
SECRETS = (KEY, PW, TOK, BASIC, URL_PW)


@stageflow.stage(writes=["out"], name="call_api")
def call_api(question: str, api_key: str, password: str, headers: dict[str, Any]) -> dict[str, Any]:
    return {"out": {"Authorization": "Basic " + BASIC, "nested": [{"userPassword": PW}]}}


@stageflow.stage(writes=["y"], name="fetch")
def fetch(q: str) -> dict[str, Any]:
    raise ConnectionError(f"GET https://admin:{URL_PW}@db.internal/ failed (password={PW})")


def _inputs() -> dict[str, Any]:
    return {"question": "q", "api_key": KEY, "password": PW, "headers": {"Authorization": "Bearer " + TOK}}


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


async def test_trace_and_report_hold_no_secret(mode: str, tmp_path: Path) -> None:
    pipeline = stageflow.SequentialPipeline([call_api])
    with stageflow.trace() as tracer:
        await call(pipeline, mode, **_inputs())
    tracer.save(tmp_path / "trace.json")
    tracer.save_report(tmp_path / "report.html")
    for name in ("trace.json", "report.html"):
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert _leaks(text) == [], name
        assert REDACTED in text
    start = next(e for e in tracer.events if e["event"] == "stage_start")
    assert start["inputs"]["question"] == "q"  # ordinary content is kept


async def test_error_messages_are_redacted_in_traces_and_profiles(mode: str) -> None:
    pipeline = stageflow.SequentialPipeline([fetch])
    prof = stageflow.Profiler()
    with stageflow.trace() as tracer, stageflow.profile(prof), pytest.raises(stageflow.StageError):
        await call(pipeline, mode, q="x")
    errors = [e["error"] for e in tracer.events if "error" in e]
    assert len(errors) == 2  # the stage and the run
    assert all("https://admin:[REDACTED]@db.internal/" in e for e in errors)
    assert _leaks(str(errors)) == []
    assert _leaks(str(prof.to_dict())) == []


def test_a_report_of_an_unredacted_trace_is_redacted() -> None:
    doc = {
        "events": [
            {"event": "input", "stage": "", "t": 0.0, "span": 1, "parent": None, "inputs": _inputs()},
            {"event": "output", "stage": "", "t": 0.1, "span": 1, "outputs": {}, "error": f"x password={PW}"},
        ]
    }
    assert _leaks(render_report(doc)) == []


@pytest.fixture
def otel_exporter() -> Iterator[Any]:
    """stageflow instrumented with an SDK provider and an in-memory exporter (removed afterwards)."""
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from stageflow.observe import otel

    provider, exporter = sdk.TracerProvider(), InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stageflow.instrument_otel(tracer_provider=provider)
    try:
        yield exporter
    finally:
        otel.uninstrument()
        provider.shutdown()


@pytest.mark.integration
async def test_otel_redacts_url_passwords_on_stage_and_run_spans(otel_exporter: Any, mode: str) -> None:
    exporter = otel_exporter
    with pytest.raises(stageflow.StageError):
        await call(stageflow.SequentialPipeline([fetch]), mode, q="x")
    spans = exporter.get_finished_spans()
    failed = [s for s in spans if s.status.description]
    assert len(failed) == 2  # the stage span and the run span
    for span in spans:
        texts = [str(span.status.description), *map(str, span.attributes.values())]
        texts += [str(v) for e in span.events for v in (e.attributes or {}).values()]
        assert _leaks(" ".join(texts)) == [], span.name


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("api_key", True),
        ("apiKey", True),
        ("APIKEY", True),
        ("x-api-key", True),
        ("X-Api-Key", True),
        ("Authorization", True),
        ("userPassword", True),
        ("Cookie", True),
        ("client_secret", True),
        ("token", True),
        ("max_tokens", False),
        ("prompt_tokens", False),
        ("question", False),
    ],
)
def test_secret_keys_case_insensitive(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_text_rules() -> None:
    assert redact_text("ssh://git@github.com/x") == "ssh://git@github.com/x"  # no password: kept
    assert redact_text("postgres://u:p%40ss@h:5432/db") == "postgres://u:[REDACTED]@h:5432/db"
    assert redact_text("http://localhost:8000/v1") == "http://localhost:8000/v1"
    assert redact({"deep": [{"headers": {"authorization": "x"}}]}) == {
        "deep": [{"headers": {"authorization": REDACTED}}]
    }


# Second attack round: key shapes that leaked, and the CLI's own error paragraph.


def test_header_pairs_and_spaced_keys_are_redacted_and_lookalikes_kept() -> None:
    from stageflow.observe.redact import redact

    got = redact(
        {"headers": [["X-Api-Key", "k-secret"], ("Accept", "json")], "API KEY": "v", "token_count": 5}
    )
    assert got == {
        "headers": [["X-Api-Key", "[REDACTED]"], ["Accept", "json"]],
        "API KEY": "[REDACTED]",
        "token_count": 5,
    }


def test_the_cli_error_paragraph_is_redacted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stageflow.cli._common import report_error

    secret = RuntimeError("auth failed for https://bob:hunter2secret@api.example/ with sk-abcdefghijklmnop")
    assert report_error(secret, "run", debug=False) == 1
    err = capsys.readouterr().err
    assert "hunter2secret" not in err
    assert "sk-abcdefghijklmnop" not in err
    assert "api.example" in err
