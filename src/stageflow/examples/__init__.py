"""Example pipeline files.

* ``multihop.yaml`` — the multi-hop QA program of :mod:`stageflow.apps.multihop` written as a
  declarative pipeline (``stageflow validate``/``stageflow run`` it; it retrieves from the shipped
  corpus).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXAMPLES_DIR", "example_path"]

EXAMPLES_DIR = Path(__file__).resolve().parent


def example_path(name: str) -> Path:
    """The path of a shipped example file, e.g. ``example_path("multihop.yaml")``."""
    return EXAMPLES_DIR / name
