"""A pipeline that contains itself — directly, through another pipeline or through a wrapper
(``Stage``, ``CachedStage``, ``LazyStage``) — is a :class:`ConfigurationError`, found by walking the
sub-modules the way DSPy finds them (module attributes, and modules held in lists and dicts).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dspy

from stageflow.errors import ConfigurationError

__all__ = ["contains_itself", "find_cycle", "refuse_cycle"]


def contains_itself(pipeline: Any, cycle: str, path: str | None = None) -> ConfigurationError:
    """The error for ``pipeline`` met again inside its own structure (``cycle``: the types on the way)."""
    where = f" at '{path}'" if path else ""
    return ConfigurationError(
        f"{type(pipeline).__name__} contains itself{where} ({cycle}): a pipeline cannot be one of its own "
        "stages, directly, through another pipeline or through a wrapper, because running it would "
        "never end.",
        code="contains_itself",
        hint="use a copy (copy.deepcopy(pipeline)) as the inner stage, or an IterativePipeline to "
        "repeat stages",
    )


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    for name, value in vars(obj).items():
        if isinstance(value, dspy.Module):
            yield name, value
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, dspy.Module):
                    yield f"{name}[{i}]", item
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, dspy.Module):
                    yield f"{name}[{key!r}]", item


def find_cycle(root: Any) -> tuple[Any, str, str] | None:
    """``(module, path, types)`` of the first module found inside itself, walking from ``root``:
    ``path`` is where it appears again (from ``root``), ``types`` the types around the loop.
    ``None`` when nothing reachable from ``root`` contains itself.

    Examples:
        >>> import stageflow
        >>> p = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x}, writes=["y"])])
        >>> find_cycle(p) is None
        True
        >>> p.stages.append(stageflow.Stage(p, writes=["y"]))
        >>> _, path, types = find_cycle(p)
        >>> path, types
        ('stages[1].module', 'SequentialPipeline → Stage → SequentialPipeline')
    """
    # Depth-first, iteratively (a deep tree must not hit the recursion limit): a child that is on
    # the current path closes a loop; a child already finished is shared, not a loop.
    on_path: dict[int, int] = {id(root): 0}
    done: set[int] = set()
    frames: list[tuple[Any, Iterator[tuple[str, Any]]]] = [(root, _children(root))]
    names: list[str] = []
    while frames:
        obj, children = frames[-1]
        step = next(children, None)
        if step is None:
            frames.pop()
            if names:
                names.pop()
            del on_path[id(obj)]
            done.add(id(obj))
            continue
        name, child = step
        key = id(child)
        if key in on_path:
            loop = [type(f[0]).__name__ for f in frames[on_path[key] :]]
            return child, ".".join([*names, name]), " → ".join([*loop, type(child).__name__])
        if key in done:
            continue
        on_path[key] = len(frames)
        frames.append((child, _children(child)))
        names.append(name)
    return None


def refuse_cycle(root: Any) -> None:
    """Raise :func:`contains_itself` when ``root``, or anything it holds, contains itself."""
    found = find_cycle(root)
    if found is not None:
        module, path, types = found
        raise contains_itself(module, types, path)
