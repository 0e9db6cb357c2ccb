"""Built-in programs written with stageflow's patterns.

* :mod:`stageflow.apps.multihop` — multi-hop question answering over a small shipped corpus:
  decompose → for each sub-question (retrieve, extract a fact) → synthesize. It is the program
  ``stageflow demo`` runs.
"""

from __future__ import annotations

from stageflow._lazy import submodules

__all__: list[str] = []
__getattr__ = submodules(__name__)
