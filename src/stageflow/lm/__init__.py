"""Language models for stageflow: the embedded local model and model-string resolution.

``import stageflow.lm`` stays cheap: the DSPy engine, llama-cpp-python and the model weights are only
imported or loaded when first used.

* :func:`resolve_lm` — ``None``/``"local"``/``"local:/x.gguf"``/``"openai/..."`` → a DSPy LM.
* :func:`make_local_lm` — a ``dspy.LM`` over an in-process GGUF model (SmolLM2 by default).
* :class:`LlamaCppEngine` / :class:`AsyncLlamaCppEngine` — the DSPy 3.4 engines behind it: a grammar
  for every JSON schema, one prompt-prefix cache per predictor (:mod:`stageflow.lm.prefix`) and token
  log-probabilities (:mod:`stageflow.lm.logprobs`).
* :func:`find_model_path` — where the GGUF weights are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stageflow._lazy import lazy_attributes
from stageflow.lm._locate import MODEL_PATH_ENV, find_model_path

if TYPE_CHECKING:
    from stageflow.lm.engine import AsyncLlamaCppEngine, LlamaCppEngine, default_threads, make_local_lm
    from stageflow.lm.select import resolve_lm

__all__ = [
    "MODEL_PATH_ENV",
    "AsyncLlamaCppEngine",
    "LlamaCppEngine",
    "default_threads",
    "find_model_path",
    "make_local_lm",
    "resolve_lm",
]

_LAZY = {
    "AsyncLlamaCppEngine": "stageflow.lm.engine",
    "LlamaCppEngine": "stageflow.lm.engine",
    "default_threads": "stageflow.lm.engine",
    "make_local_lm": "stageflow.lm.engine",
    "resolve_lm": "stageflow.lm.select",
}


__getattr__, __dir__ = lazy_attributes("stageflow.lm", _LAZY, globals())
