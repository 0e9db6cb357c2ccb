"""The fast path for LM stages: DSPy adapters that build the same prompts with less CPU.

* :class:`FastChatAdapter` / :class:`FastJSONAdapter` — DSPy's ``ChatAdapter`` / ``JSONAdapter``
  with what depends only on the signature and demos built once (see :mod:`.adapters`).
* :func:`fast_adapter_for` — the fast twin of the active adapter (or the adapter itself).
* :func:`fast_path_stats` / :func:`reset_fast_path_stats` — how many calls took the fast path,
  and which signatures and adapters went to DSPy's own code, and why.
* :func:`call_predictor` / :func:`acall_predictor` — ``module(**inputs)`` for a ``Predict`` or
  ``ChainOfThought`` stage without the steps that are no-ops in the common case (see :mod:`.call`).

Example:
    >>> import dspy
    >>> from stageflow.lm.fast import fast_adapter_for, fast_path_stats, reset_fast_path_stats
    >>> from stageflow.testing import FakeLM
    >>> reset_fast_path_stats()
    >>> with dspy.context(lm=FakeLM({"answer": "4"}), adapter=fast_adapter_for(None)):
    ...     dspy.Predict("question -> answer")(question="2+2?").answer
    '4'
    >>> fast_path_stats().fast_calls
    1
"""

from __future__ import annotations

from stageflow.lm.fast._stats import FastPathStats, fast_path_stats, reset_fast_path_stats
from stageflow.lm.fast.adapters import FastChatAdapter, FastJSONAdapter
from stageflow.lm.fast.call import acall_predictor, call_predictor
from stageflow.lm.fast.twin import fast_adapter_for

__all__ = [
    "FastChatAdapter",
    "FastJSONAdapter",
    "FastPathStats",
    "acall_predictor",
    "call_predictor",
    "fast_adapter_for",
    "fast_path_stats",
    "reset_fast_path_stats",
]
