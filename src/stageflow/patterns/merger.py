"""How a parallel group's outputs merge into the state: :class:`ResultMerger`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from stageflow.errors import ConfigurationError, ContractError, PipelineError
from stageflow.patterns._fields import result_fields

__all__ = [
    "ClashStrategy",
    "ResultMerger",
    "clash_error",
    "clash_hint",
    "merges_its_own_way",
    "produced_fields",
]

ClashStrategy = Literal["error", "list", "concatenate", "first"]


_STRATEGIES = ("error", "list", "concatenate", "first")


def produced_fields(item: Any) -> dict[str, Any] | None:
    """The fields of one stage's result: a dict, a ``dspy.Prediction``, a pydantic model (``None`` for a
    failed one: the tutorial's ``{"error": ...}`` records)."""
    if isinstance(item, Mapping) and item.get("error") and len(item) == 1:
        return None
    return result_fields(item)


def clash_hint(fields: Sequence[str]) -> str:
    """The one-step fix for clashes on ``fields``: a strategy for each of them."""
    each = ", ".join(f"'{f}': 'list'" for f in fields)
    return (
        f"pass merger=ResultMerger(strategies={{{each}}}) (or 'concatenate', 'first' per field; "
        "'content' is concatenated unless you name it), or rename outputs with Stage(<stage>, outputs={...})"
    )


def clash_error(fields: Sequence[str], lead: str) -> ContractError:
    """One :class:`ContractError` naming every clashing field, so one fix resolves them all."""
    listed = ", ".join(f"'{f}'" for f in fields)
    err = ContractError(f"{lead} {listed}.", field=fields[0], code="output_clash", hint=clash_hint(fields))
    err.fields = list(fields)  # type: ignore[attr-defined]  # every clashing field; ``field`` is the first
    return err


class ResultMerger:
    r"""Merge the outputs of one parallel group into the state.

    Fields written by one stage merge as they are. A field written by several stages of the same
    group (a clash) follows its entry in ``strategies``, else ``on_clash``:

    - ``"error"`` (default for other fields): rejected when the pipeline is built
      (:class:`ContractError`) — or, for stages whose outputs are only known at run time, when the
      group has run;
    - ``"concatenate"`` (default for ``content``, as in the tutorial): strings are joined with
      ``separator`` (a newline), lists (or tuples) are concatenated into a list, ``None`` values
      (a stage that had nothing to add) are left out; any other mix — numbers, dicts, a string
      with a list — is a :class:`ContractError` naming the stages, never their ``str()`` joined;
    - ``"list"``: the field becomes the list of values, in stage order;
    - ``"first"``: the first stage's value (in stage order) wins.

    Examples:
        >>> ResultMerger().merge([{"content": "a"}, {"content": "b", "extra": 1}])
        {'content': 'a\nb', 'extra': 1}
        >>> ResultMerger().merge([{"content": None}, {"content": "b"}])
        {'content': 'b'}
    """

    def __init__(
        self,
        on_clash: ClashStrategy = "error",
        separator: str = "\n",
        strategies: Mapping[str, str] | None = None,
    ) -> None:
        if on_clash not in _STRATEGIES:
            raise ConfigurationError(
                f"ResultMerger: on_clash must be one of {list(_STRATEGIES)}, got {on_clash!r}.",
                field="on_clash",
                code="bad_option",
            )
        # The tutorial's default for `content` holds unless the caller names `content` itself.
        given = {"content": "concatenate", **(strategies or {})}
        for name, how in given.items():
            if how not in _STRATEGIES:
                raise ConfigurationError(
                    f"ResultMerger: strategies[{name!r}] must be one of {list(_STRATEGIES)}, got {how!r}.",
                    field=str(name),
                    code="bad_option",
                )
        if not isinstance(separator, str):
            raise ConfigurationError(
                f"ResultMerger: separator must be a string, got {separator!r}.",
                field="separator",
                code="bad_option",
            )
        self.on_clash = on_clash
        self.separator = separator
        self.strategies = given

    def __repr__(self) -> str:
        return f"ResultMerger(on_clash={self.on_clash!r}, strategies={self.strategies!r})"

    def strategy_for(self, field: str) -> str:
        """How a clash on ``field`` is merged."""
        return self.strategies.get(field, self.on_clash)

    def merge(self, produced: Sequence[Any], names: Sequence[str] | None = None) -> dict[str, Any]:
        """Combine the fields produced by the group's stages (in stage order).

        ``produced`` holds each stage's fields (dicts), or — called as in the tutorial — the stages'
        results (predictions, models; ``{"error": ...}`` entries are left out). ``names`` name the
        stages in errors (their stage paths; default ``member 0``, ...). Raises
        :class:`~stageflow.PipelineError` when every entry failed.
        """
        fields_list: list[tuple[str, dict[str, Any]]] = []
        for i, p in enumerate(produced):
            fields = produced_fields(p)
            if fields is not None:
                fields_list.append((names[i] if names else f"member {i}", fields))
        if produced and not fields_list:
            raise PipelineError("All parallel stages failed: nothing to merge.", code="all_failed")
        seen: dict[str, list[tuple[str, Any]]] = {}
        for name, fields in fields_list:
            for k, v in fields.items():
                seen.setdefault(k, []).append((name, v))
        clashes = [k for k, named in seen.items() if len(named) > 1 and self.strategy_for(k) == "error"]
        if clashes:
            raise clash_error(clashes, "Parallel stages both wrote")
        out: dict[str, Any] = {}
        for k, named in seen.items():
            how = self.strategy_for(k)
            values = [v for _, v in named]
            if len(values) == 1:
                out[k] = values[0]
            elif how == "list":
                out[k] = list(values)
            elif how == "first":
                out[k] = values[0]
            else:
                out[k] = self._concatenate(k, named)
        return out

    def _concatenate(self, field: str, named: list[tuple[str, Any]]) -> Any:
        """Strings joined, lists concatenated, ``None`` left out; any other mix is refused."""
        given = [(n, v) for n, v in named if v is not None]
        if len(given) <= 1:
            return given[0][1] if given else None
        values = [v for _, v in given]
        if all(isinstance(v, str) for v in values):
            return self.separator.join(values)
        if all(isinstance(v, list | tuple) for v in values):
            return [x for v in values for x in v]
        kinds = ", ".join(f"'{n}' wrote {type(v).__name__}" for n, v in given)
        raise ContractError(
            f"Parallel stages wrote '{field}' as values 'concatenate' cannot join ({kinds}): it joins "
            "strings, or concatenates lists.",
            stage_path=given[0][0],
            field=field,
            code="merge_types",
            hint=f"pass merger=ResultMerger(strategies={{'{field}': 'list'}}) (or 'first') to keep the "
            "values as they are, or make every stage return a string (or every stage a list)",
        )


def merges_its_own_way(merger: Any) -> bool:
    """Whether ``merger.merge`` is your own code: a :class:`ResultMerger` subclass that overrides
    ``merge`` (the tutorial's ``class M(ResultMerger): def merge(self, results)``) or any other object
    with a ``merge`` method. A parallel group then calls it as the tutorial's ``ParallelPipeline``
    does: ``merger.merge(results)``, each stage's result in stage order (a
    :class:`~stageflow.patterns._fields.Produced` copy of its fields, ``{"error": ...}`` for one that
    failed), and takes the dict it returns as the group's fields; clashes are its to resolve.

    Examples:
        >>> class Joined(ResultMerger):
        ...     def merge(self, results):
        ...         return {"content": " + ".join(r["content"] for r in results)}
        >>> merges_its_own_way(Joined()), merges_its_own_way(ResultMerger())
        (True, False)
    """
    if isinstance(merger, ResultMerger):
        return type(merger).merge is not ResultMerger.merge
    return getattr(merger, "merge", None) is not None
