"""Process-wide options: ``stageflow.configure(...)`` and ``stageflow.get_config()``.

The modules that act on an option (the concurrency budget, the thread pool) read it from here, and
may register a listener to hear about changes, so this module imports none of them.

Examples:
    >>> import stageflow
    >>> stageflow.configure(strict=True)
    >>> stageflow.get_config()["strict"]
    True
    >>> stageflow.configure(strict=False)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = ["Config", "configure", "get_config", "on_change"]


@dataclass
class Config:
    """The options :func:`configure` sets (one instance, ``CONFIG``)."""

    max_concurrency: int | None = None
    """Cap on concurrent leaf stage calls in stageflow's fan-outs (``None``: no cap)."""
    max_threads: int = 512
    """Size of the shared thread pool."""
    strict: bool = False
    """Strict contracts: a field only a stage with undeclared outputs may produce is refused before
    the run, instead of being checked at run time (a pipeline's own ``strict=`` wins)."""
    fast_path: bool = True
    """Predictors inside pipelines use stageflow's fast path (:mod:`stageflow.lm.fast`: the same
    prompts built with less CPU, and a shorter call). The outermost pipeline of a call decides for
    every predictor in it: its own ``fast_path`` wins over this; a nested pipeline's is not looked at."""


CONFIG = Config()
_LISTENERS: list[Callable[[str, Any], None]] = []


def on_change(listener: Callable[[str, Any], None]) -> None:
    """Call ``listener(option, value)`` after :func:`configure` sets an option."""
    _LISTENERS.append(listener)


def _validate(name: str, value: Any) -> None:
    bad_int = isinstance(value, bool) or not isinstance(value, int) or value < 1
    if name == "max_concurrency" and value is not None and bad_int:
        raise ConfigurationError(
            f"max_concurrency must be a positive int or None, got {value!r}.",
            field=name,
            code="bad_option",
            hint="pass max_concurrency=None for no cap",
        )
    if name == "max_threads" and bad_int:
        raise ConfigurationError(
            f"max_threads must be a positive int, got {value!r}.", field=name, code="bad_option"
        )
    if name in ("strict", "fast_path") and not isinstance(value, bool):
        raise ConfigurationError(
            f"{name} must be True or False, got {value!r}.", field=name, code="bad_option"
        )


def check_options(options: dict[str, Any], where: str, allowed: frozenset[str] | None = None) -> None:
    """Refuse unknown option names (never silently ignored)."""
    known = allowed if allowed is not None else frozenset(f.name for f in fields(Config))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown option(s) {unknown}. Known options: {sorted(known)}.",
            field=unknown[0],
            code="unknown_option",
        )


def configure(**options: Any) -> None:
    """Set process-wide defaults.

    Options: ``max_concurrency`` (cap on concurrent leaf stage calls in stageflow's fan-outs;
    ``None`` = no cap), ``max_threads`` (size of the shared thread pool), ``strict`` (strict
    contracts for every pipeline that does not set its own) and ``fast_path`` (predictors inside
    pipelines take stageflow's fast path; on by default). An unknown option or a bad value raises
    :class:`ConfigurationError`; nothing is silently ignored.
    """
    check_options(options, "stageflow.configure")
    for name, value in options.items():
        _validate(name, value)
    for name, value in options.items():
        setattr(CONFIG, name, value)
        for listener in list(_LISTENERS):
            listener(name, value)


def get_config() -> dict[str, Any]:
    """The current process-wide options."""
    return {f.name: getattr(CONFIG, f.name) for f in fields(Config)}
