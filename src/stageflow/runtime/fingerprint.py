"""The fingerprint of a whole program, stored in a batch journal so a resume cannot mix programs.

It is :func:`stageflow.fingerprint` — the same fingerprint the stage cache uses: every predictor's
signature, instructions, fields, demos and LM settings, every function stage's code (constants,
names, defaults, closure values), and the program's structure. This module is the one place the
runtime takes it from.
"""

from __future__ import annotations

from typing import Any

from stageflow.fingerprinting import fingerprint

__all__ = ["program_fingerprint"]


def program_fingerprint(program: Any) -> str:
    """A content hash of ``program`` (see :func:`stageflow.fingerprint`).

    The LM of a predictor without its own is the one ``dspy.context``/``dspy.configure`` provides,
    so call this inside the same DSPy settings the records will run with.

    Examples:
        >>> import stageflow
        >>> double = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": 2 * x}, writes=["y"])])
        >>> triple = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": 3 * x}, writes=["y"])])
        >>> program_fingerprint(double) == program_fingerprint(triple)
        False
    """
    return fingerprint(program)
