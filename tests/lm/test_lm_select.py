"""Unit tests for stageflow.lm.select.resolve_lm (no model loading, no network)."""

from __future__ import annotations

import importlib.util

import dspy
import pytest

from stageflow.errors import ConfigurationError
from stageflow.lm.select import LM_ENV, resolve_lm

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(LM_ENV, raising=False)
    monkeypatch.delenv("STAGEFLOW_MODEL_PATH", raising=False)


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "Mini.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 16)
    return path


def test_provider_string(monkeypatch):
    monkeypatch.delenv("LITELLM_LOCAL_MODEL_COST_MAP", raising=False)
    lm = resolve_lm("openai/gpt-4o-mini", api_base="http://127.0.0.1:9/v1")
    assert isinstance(lm, dspy.LM)
    assert lm.model == "openai/gpt-4o-mini"
    assert lm.kwargs.get("api_base") == "http://127.0.0.1:9/v1"
    import os

    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"


def test_env_spec_is_used(monkeypatch):
    monkeypatch.setenv(LM_ENV, "anthropic/claude-3-5-haiku-latest")
    assert resolve_lm().model == "anthropic/claude-3-5-haiku-latest"


@needs_llama_cpp
def test_local_path_spec(gguf):
    lm = resolve_lm(f"local:{gguf}")
    assert lm.model.startswith("local/mini-")
    assert lm.engine.model_path == gguf.resolve()


@needs_llama_cpp
def test_env_local_path_spec(gguf, monkeypatch):
    monkeypatch.setenv(LM_ENV, f"local:{gguf}")
    assert resolve_lm().model.startswith("local/mini-")


@needs_llama_cpp
def test_default_is_the_embedded_model(gguf, monkeypatch):
    monkeypatch.setenv("STAGEFLOW_MODEL_PATH", str(gguf))  # stand-in for the packaged file
    for spec in (None, "local", " local "):
        lm = resolve_lm(spec)
        assert lm.engine.model_path == gguf.resolve()


@needs_llama_cpp
def test_local_missing_file(tmp_path):
    with pytest.raises(ConfigurationError) as info:
        resolve_lm(f"local:{tmp_path / 'missing.gguf'}")
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize("spec", ["", "   ", "local:", "local:  "])
def test_empty_specs(spec):
    with pytest.raises(ConfigurationError) as info:
        resolve_lm(spec)
    assert info.value.code == "bad_lm_spec"


def test_api_base_with_local_model_is_refused():
    with pytest.raises(ConfigurationError) as info:
        resolve_lm("local", api_base="http://localhost:8080/v1")
    assert info.value.field == "api_base"
