"""The fingerprints stored in a batch journal so a resume cannot mix programs.

The whole program's is :func:`stageflow.fingerprint` — the same fingerprint the stage cache uses:
every predictor's signature, instructions, fields, demos and LM settings, every function stage's
code (constants, names, defaults, closure values), and the program's structure. Next to it the
journal keeps one per stage (stage path → :func:`stageflow.fingerprint` of the stage), so a refused
resume can say which stages changed. This module is the one place the runtime takes them from.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

from stageflow._fp_dynamic import dynamic_reads, dynamic_text
from stageflow.fingerprinting import fingerprint

__all__ = [
    "program_fingerprint",
    "stage_changes",
    "stage_fingerprints",
    "stage_objects",
    "warn_dynamic_reads",
]

_SEGMENT = re.compile(r"^(\w+)((?:\[(?:\d+|'[^']*'|\*)\])*)$")
_INDEX = re.compile(r"\[(\d+|'[^']*'|\*)\]")
_MAX_LISTED = 8  # stage paths named per kind of change


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
    return fingerprint(program, fresh=True)  # (a value read from a module may have changed in place)


def stage_fingerprints(program: Any) -> dict[str, str]:
    """``stage path -> fingerprint`` of every stage of ``program`` at every depth (nested pipelines
    and the stages inside them), with the paths traces and errors use.

    The paths are those of the program's picture (:func:`stageflow.observe.graph.graph_of`); a
    program that cannot be drawn gives ``{}`` (the whole-program fingerprint still guards a resume).
    Call it inside the DSPy settings the records will run with, like :func:`program_fingerprint`.

    Examples:
        >>> import stageflow
        >>> p = stageflow.SequentialPipeline([
        ...     stageflow.stage(lambda text: {"n": len(text)}, writes=["n"], name="size"),
        ...     stageflow.stage(lambda n: {"big": n > 9}, writes=["big"], name="big"),
        ... ])
        >>> sorted(stage_fingerprints(p))
        ['stages[0]', 'stages[1]']
    """
    return {path: fingerprint(obj, fresh=True) for path, obj in stage_objects(program)}


def warn_dynamic_reads(program: Any) -> None:
    """Warn when a stage of ``program`` looks module-level names up at run time (``globals()[...]``,
    ``eval``...): the fingerprints cannot hold what it reads that way, so a resumed batch would not
    notice when those values changed."""
    found = sorted({name for _, obj in stage_objects(program) for name in dynamic_reads(obj)})
    if found:
        warnings.warn(
            f"A stage looks module-level names up at run time ({dynamic_text(found)}): the batch "
            "journal cannot tell whether the values it reads that way changed, so a resume after one "
            "changed would keep the finished records' old outputs. Read the names directly, or pass "
            "the values as inputs.",
            UserWarning,
            stacklevel=3,
        )


def stage_objects(program: Any) -> list[tuple[str, Any]]:
    """``(stage path, stage)`` for every stage of ``program`` at every depth, nested pipelines
    included, in path order (``[]`` for a program that cannot be drawn)."""
    from stageflow.observe.graph import graph_of

    try:
        g = graph_of(program)
    except Exception:  # a picture is a nicety here: never let it stop a batch
        return []
    paths = {c.path for c in g.clusters.values() if c.path} | {n.path for n in g.nodes.values() if n.path}
    found = ((path, _resolve(program, path)) for path in sorted(paths))
    return [(path, obj) for path, (ok, obj) in found if ok]


def _resolve(root: Any, path: str) -> tuple[bool, Any]:
    """The object at stage path ``path`` (``stages[1].branches['x']``, ``stage[*]``) under ``root``."""
    from stageflow.stages import Stage

    obj = root
    for segment in path.split("."):
        m = _SEGMENT.match(segment)
        if not m:
            return False, None
        while isinstance(obj, Stage) and not hasattr(obj, m.group(1)):
            obj = obj.module  # a Stage wrapper holds the pipeline the path goes into
        if not hasattr(obj, m.group(1)):
            return False, None
        obj = getattr(obj, m.group(1))
        for idx in _INDEX.findall(m.group(2)):
            if idx == "*":  # ForEach's one stage, run per item
                continue
            try:
                obj = obj[int(idx)] if idx.isdigit() else obj[idx[1:-1]]
            except (IndexError, KeyError, TypeError):
                return False, None
    return True, obj


def stage_changes(planned: Mapping[str, str], now: Mapping[str, str]) -> str:
    """Which stages differ between two :func:`stage_fingerprints`, in words (``""`` when none do).

    A changed stage inside a changed pipeline is named instead of the pipeline.

    Examples:
        >>> stage_changes({"stages[0]": "a", "stages[1]": "b"}, {"stages[0]": "a", "stages[1]": "c"})
        'changed stages: stages[1]'
        >>> stage_changes({"stages[0]": "a", "stages[1]": "b"}, {"stages[0]": "x"})
        'changed stages: stages[0]; removed stages: stages[1]'
    """
    changed = [p for p in now if p in planned and planned[p] != now[p]]
    added = [p for p in now if p not in planned]
    removed = [p for p in planned if p not in now]
    every = {*changed, *added, *removed}

    def deepest(paths: list[str]) -> list[str]:
        inner = [p for p in paths if not any(q.startswith((f"{p}.", f"{p}[")) for q in every)]
        return sorted(inner, key=_path_key)

    parts = []
    for what, paths in (
        ("changed", deepest(changed)),
        ("added", deepest(added)),
        ("removed", deepest(removed)),
    ):
        if paths:
            more = f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
            parts.append(f"{what} stages: {', '.join(paths[:_MAX_LISTED])}{more}")
    return "; ".join(parts)


def _path_key(path: str) -> list[Any]:
    """Sort ``stages[10]`` after ``stages[9]``."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", path)]
