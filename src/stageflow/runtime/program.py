"""What a batch runs: the program (an object, a pipeline file or a saved program) and the DSPy
settings (LM, adapter) its records run with. The same functions run in the driver and inside
each Ray worker, so both build the program and its settings the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = ["is_pipeline", "load_program", "resolve_adapter", "resolve_lm_value", "run_settings"]


def is_pipeline(program: Any) -> bool:
    """Whether ``program`` is a stageflow pipeline (contracts to check, usage metered per call)."""
    from stageflow.patterns.base import Pipeline

    return isinstance(program, Pipeline)


def load_program(program: Any, allow_modules: Sequence[str] = ()) -> Any:
    """The program to run: ``program`` itself, or the one a path describes.

    A path is a pipeline file (``.yaml``/``.yml``/``.json``, loaded with
    :func:`stageflow.load_pipeline` and ``allow_modules``) or a directory written by
    ``program.save(dir, save_program=True)`` (loaded with ``dspy.load``).
    """
    if isinstance(program, str | os.PathLike):
        path = Path(program)
        if path.is_dir():
            import dspy

            try:
                return _single_stage(dspy.load(str(path), allow_pickle=True))
            except Exception as exc:
                raise ConfigurationError(
                    f"cannot load the saved program {path}: {type(exc).__name__}: {exc}",
                    code="bad_program",
                    hint="save it with program.save(dir, save_program=True), or pass a pipeline file",
                ) from exc
        from stageflow.spec import load_pipeline

        return load_pipeline(path, allow_modules=allow_modules)
    if not callable(program):
        raise ConfigurationError(
            f"the program must be a stageflow pipeline or dspy.Module (or a path to a pipeline file or a "
            f"saved program), got {type(program).__name__}.",
            code="bad_program",
        )
    return _single_stage(program)


def _single_stage(program: Any) -> Any:
    """A lone stage (``stageflow.stage`` function, ``stageflow.Stage``, ``dspy.Predict``) as a
    one-stage pipeline, so its contract is checked against every record before any call (a record
    missing a field it reads is refused up front, naming the stage and field, instead of each record
    failing with a bare ``TypeError`` or, for ``Predict``, calling the model without the field)."""
    import dspy

    from stageflow.patterns.sequential import SequentialPipeline
    from stageflow.stages import FunctionStage, Stage

    if isinstance(program, FunctionStage | Stage | dspy.Predict):
        return SequentialPipeline([program])
    return program


def resolve_lm_value(lm: Any) -> Any:
    """``lm`` as a DSPy LM: a model spec string (``"local"``, ``"openai/gpt-4o-mini"``) is built with
    :func:`stageflow.lm.resolve_lm`, a zero-argument factory is called, an LM is used as is."""
    if lm is None:
        return None
    import dspy

    if isinstance(lm, dspy.BaseLM):
        return lm
    if isinstance(lm, str):
        from stageflow.lm import resolve_lm

        return resolve_lm(lm)
    if callable(lm):
        return lm()
    raise ConfigurationError(
        f"lm= takes a dspy.LM, a model string or a factory function, got {type(lm).__name__}.",
        field="lm",
        code="bad_option",
    )


def resolve_adapter(adapter: Any) -> Any:
    """``adapter`` as a DSPy adapter: an adapter is used as is, a zero-argument factory is called."""
    if adapter is None:
        return None
    import dspy

    if isinstance(adapter, dspy.Adapter):
        return adapter
    if callable(adapter):
        return adapter()
    raise ConfigurationError(
        f"adapter= takes a dspy.Adapter or a factory function, got {type(adapter).__name__}.",
        field="adapter",
        code="bad_option",
    )


def run_settings(lm: Any, adapter: Any) -> dict[str, Any]:
    """The ``dspy.context`` settings records run with (empty: the caller's DSPy settings)."""
    settings: dict[str, Any] = {}
    value = resolve_lm_value(lm)
    if value is not None:
        settings["lm"] = value
    value = resolve_adapter(adapter)
    if value is not None:
        settings["adapter"] = value
    return settings
