"""Turn a user's model choice (``--lm``, ``$STAGEFLOW_LM``) into a DSPy LM.

* ``None`` / ``"local"``: the embedded SmolLM2 model, in-process (:func:`make_local_lm`).
* ``"local:/path/model.gguf"``: another GGUF file, in-process.
* ``"provider/model"``: a DSPy/LiteLLM model string such as ``"openai/gpt-4o-mini"``, with API keys
  read from the usual environment variables, optionally through ``api_base`` (an ``http(s)://`` URL,
  e.g. a local server). A string without a provider (``"smollm"``) is refused with the fix.

llama.cpp (:mod:`stageflow.lm.engine`) is imported only when the in-process model is chosen.
"""

from __future__ import annotations

import os
import re
from typing import Any

import dspy

from stageflow.errors import ConfigurationError

__all__ = ["LM_ENV", "LOCAL_SPEC", "resolve_lm"]

LM_ENV = "STAGEFLOW_LM"
LOCAL_SPEC = "local"
_URL = re.compile(r"^https?://[^\s/]+\S*$")


def resolve_lm(spec: str | None = None, *, api_base: str | None = None, **lm_kwargs: Any) -> dspy.BaseLM:
    """Build the LM named by ``spec`` (or ``$STAGEFLOW_LM``, or the embedded model).

    Args:
        spec: ``None``, ``"local"``, ``"local:<path.gguf>"`` or a provider model string.
        api_base: Endpoint for a provider model (e.g. a local OpenAI-compatible server); refused
            for the in-process model.
        lm_kwargs: Passed on to ``dspy.LM`` / :func:`stageflow.lm.make_local_lm`.

    Raises:
        ConfigurationError: an empty or malformed spec, ``api_base`` with a local model, or a missing
            local model / llama-cpp-python.
    """
    source = ""
    if spec is None:
        spec = os.environ.get(LM_ENV, "").strip() or LOCAL_SPEC
        source = f" (from ${LM_ENV})" if os.environ.get(LM_ENV, "").strip() else ""
    spec = spec.strip()
    if not spec:
        raise ConfigurationError(
            "The model spec is empty.",
            field="lm",
            code="bad_lm_spec",
            hint="pass 'local', 'local:/path/model.gguf' or a model string like 'openai/gpt-4o-mini'",
        )
    if spec == LOCAL_SPEC or spec.startswith(LOCAL_SPEC + ":"):
        if api_base is not None:
            raise ConfigurationError(
                f"api_base={api_base!r} was given with the in-process model {spec!r}, which has no endpoint.",
                field="api_base",
                code="bad_lm_spec",
                hint="drop api_base, or name the served model instead (e.g. 'openai/<model>' with api_base)",
            )
        path = spec[len(LOCAL_SPEC) + 1 :].strip() if spec != LOCAL_SPEC else None
        if path == "":
            raise ConfigurationError(
                "The model spec 'local:' names no file.",
                field="lm",
                code="bad_lm_spec",
                hint="use 'local' for the embedded model or 'local:/path/model.gguf'",
            )
        from stageflow.lm.engine import make_local_lm

        lm: dspy.BaseLM = make_local_lm(path, **lm_kwargs)
        return lm
    provider, _, model = spec.partition("/")
    if not provider.strip() or not model.strip():
        raise ConfigurationError(
            f"The model {spec!r}{source} names no provider: it is neither the local model nor a served one.",
            field="lm",
            code="bad_lm_spec",
            hint="use 'local' for the embedded SmolLM2 model, 'local:/path/model.gguf' for another GGUF "
            "file, or 'provider/model' for a served one, e.g. 'openai/gpt-4o-mini' (add --api-base "
            "http://localhost:8000/v1 for a local OpenAI-compatible server)",
        )
    if api_base is not None and not _URL.match(api_base.strip()):
        raise ConfigurationError(
            f"api_base={api_base!r} is not an http:// or https:// URL.",
            field="api_base",
            code="bad_lm_spec",
            hint="pass the server's base URL, e.g. --api-base http://localhost:8000/v1",
        )
    # Provider models: never block on fetching LiteLLM's model-cost map (the machine may be offline).
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    if api_base is not None:
        lm_kwargs["api_base"] = api_base.strip()
    try:
        return dspy.LM(spec, **lm_kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"Cannot use the model {spec!r}: {exc}",
            field="lm",
            code="bad_lm_spec",
            hint="use a DSPy/LiteLLM model string like 'openai/gpt-4o-mini', or 'local'",
        ) from exc
