"""Declarative pipelines: a YAML/JSON file describing any stageflow architecture.

The file is the tree :class:`~stageflow.HierarchicalPipeline` builds, with more node types::

    version: 1
    name: qa
    inputs: [question]            # optional: the tree is contract-checked for these at load time
    outputs: [answer]             # optional: checked to be produced
    nodes:
      root:                       # the pipeline that runs (or give a top-level 'root: <node>')
        type: pipeline
        stages:
          - predict: "question -> sub_questions: list[str]"
            instructions: Split the question into simple questions.
          - type: foreach
            over: sub_questions
            item: sub_question
            collect: {fact: facts, passages: passages}
            stage: lookup         # a node name refers to a node under 'nodes'
          - chain_of_thought: "question, facts: list[str] -> answer"
      lookup:
        type: pipeline
        stages:
          - {bm25: corpus.jsonl, k: 3, inputs: {query: sub_question}}
          - predict: "sub_question, passages: list[str] -> fact"

Nodes (``type`` defaults to ``module``):

* ``module``: exactly one of ``predict: "<signature>"``, ``chain_of_thought: "<signature>"`` (both with
  optional ``instructions``), ``component: "pkg.mod:name"`` (optional ``args: {...}`` calls it as a
  factory; a class is instantiated; a function is a stage), ``bm25: <corpus.jsonl>`` (path relative to
  the file, optional ``k``; reads ``query``, writes ``passages``) or ``lm_router: {branches: [...],
  inputs: [...], instructions: ...}``. Optional ``inputs``/``outputs`` renames
  (``{stage_field: state_field}``) and ``reads``/``writes`` declarations, as for :class:`~stageflow.Stage`.
* ``pipeline``: ``stages`` (a list of nodes).
* ``conditional``: ``router`` (a node with a ``branch`` output), ``branches`` (``{name: node}``), optional
  ``default`` (a branch name or a node).
* ``iterative``: ``stages``, ``stopping_condition`` (``{quality_threshold, patience, min_improvement,
  score_field}`` or ``{component: ..., args: ...}``), ``max_iterations`` (5), ``on_limit`` (``return``).
* ``parallel``: ``groups`` (a list of nodes or lists of nodes), ``merger: {on_clash, separator}``.
* ``foreach``: ``stage``, ``over``, optional ``item`` and ``collect``.
* ``ensemble``: ``processors``, ``aggregator: {strategy, field, confidence_field, threshold}``
  (``strategy`` may be a component), ``quorum``.
* ``parallel``, ``foreach`` and ``ensemble`` take the fan-out policies ``max_concurrency``, ``on_error``
  and ``timeout``.

Loading is safe, and a file cannot be turned against the user who loads it:

* YAML's safe loader (or ``json.loads``), no ``eval``; files over 1 MB (:data:`MAX_SPEC_BYTES`,
  ``$STAGEFLOW_MAX_SPEC_BYTES``), nested deeper than :data:`MAX_DEPTH` levels, or whose aliases
  expand to more than a million values are refused before they are built.
* Python objects come only from the modules passed as ``allow_modules`` (``--allow-module``), and
  only objects those modules *define*: ``'mypkg:os.system'`` is refused although ``mypkg`` imports
  ``os`` (see :mod:`stageflow.spec._origin`). Signature strings may use the types of ``typing``,
  builtins and ``dspy.*`` only, so they cannot import modules either.
* File references (``bm25:``) resolve inside the file's own folder; other folders must be allowed
  with ``allow_paths`` (``--allow-path``). Absolute paths, ``..`` and symlinks leading out are refused.

Every error is a :class:`SpecError` (a :class:`~stageflow.ConfigurationError`) naming the file, line
and key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stageflow.errors import ContractError
from stageflow.patterns.base import Pipeline
from stageflow.spec._build import TAG_META, build
from stageflow.spec._export import signature_text, to_spec
from stageflow.spec._hints import file_hint
from stageflow.spec._locate import locate_stage
from stageflow.spec._modules import BM25Stage
from stageflow.spec._source import MAX_DEPTH, MAX_SPEC_BYTES, SpecError, SpecSource, read_spec

__all__ = [
    "MAX_DEPTH",
    "MAX_SPEC_BYTES",
    "SpecError",
    "build_pipeline",
    "declared_inputs",
    "dump_spec",
    "load_pipeline",
    "signature_text",
    "to_spec",
    "uses_retrieval",
]


def _finish(
    src: SpecSource,
    allow_modules: Iterable[str],
    inputs: Iterable[str] | None = None,
    allow_paths: Iterable[str | os.PathLike[str]] = (),
    strict: bool | None = None,
) -> Pipeline:
    if isinstance(allow_modules, str):
        allow_modules = [allow_modules]
    if isinstance(allow_paths, str | os.PathLike):
        allow_paths = [allow_paths]
    roots = tuple(Path(p).expanduser().resolve() for p in allow_paths)
    root, locations = build(src, tuple(allow_modules), roots)
    meta = getattr(root, TAG_META)
    if strict is not None:
        root.strict = strict
    declared = meta.get("inputs")
    inputs = list(inputs) if inputs is not None else declared
    if inputs is None:
        return root
    try:
        fields = root.check(inputs)
    except ContractError as exc:
        where = locate_stage(root, exc.stage_path, locations) or ("inputs",)
        hint = file_hint(exc.hint)
        if exc.code == "missing_input" and declared and exc.field in declared and exc.field not in inputs:
            # (the file has it among its inputs: the caller did not pass it)
            hint = f"pass '{exc.field}' when running the file (the file declares it among its `inputs`)"
        raise src.error(
            where,
            file_hint(exc.message) or exc.message,
            code=exc.code,
            hint=hint,
            field=exc.field,
            stage_path=exc.stage_path,
        ) from exc
    missing = [o for o in meta.get("outputs", []) if o not in fields]
    if missing:
        raise src.error(
            ("outputs",),
            f"the declared output(s) {missing} are not produced for inputs {inputs}. "
            f"Produced: {list(fields)}.",
            code="missing_output",
            field=missing[0],
        )
    return root


def load_pipeline(
    path: str | os.PathLike[str],
    allow_modules: Iterable[str] = (),
    *,
    inputs: Iterable[str] | None = None,
    allow_paths: Iterable[str | os.PathLike[str]] = (),
    max_bytes: int | None = None,
    strict: bool | None = None,
) -> Pipeline:
    """Build the pipeline described by a ``.yaml``/``.yml``/``.json`` file.

    Args:
        path: The pipeline file.
        allow_modules: Modules (or packages) that ``component:`` references may import from; only
            objects those modules define can be used.
        inputs: Contract-check the pipeline for these input names (default: the file's ``inputs``).
        allow_paths: Folders, besides the file's own, that its file references may read from.
        max_bytes: Refuse larger files (default 1 MB, or ``$STAGEFLOW_MAX_SPEC_BYTES``).
        strict: Strict contracts for the check (see :class:`~stageflow.Pipeline`); ``None`` keeps
            the process-wide setting.

    Returns:
        The root pipeline (a ``dspy.Module``; a single module root is wrapped in a one-stage
        ``SequentialPipeline``), contract-checked when input names are known.

    Raises:
        SpecError: anything wrong with the file, pointing to its line and key.
    """
    return _finish(read_spec(path, max_bytes), allow_modules, inputs, allow_paths, strict)


def build_pipeline(
    spec: Mapping[str, Any],
    allow_modules: Iterable[str] = (),
    base_dir: str | os.PathLike[str] | None = None,
    *,
    allow_paths: Iterable[str | os.PathLike[str]] = (),
) -> Pipeline:
    """Build a pipeline from spec data (e.g. :func:`to_spec`'s output).

    File references resolve inside ``base_dir`` (default: the current folder) and ``allow_paths``.
    """
    if not isinstance(spec, Mapping):
        raise SpecError(f"a spec must be a mapping, got {type(spec).__name__}.")
    base = Path(base_dir).expanduser().resolve() if base_dir is not None else Path.cwd().resolve()
    src = SpecSource(spec, None, {}, base)
    return _finish(src, allow_modules, allow_paths=allow_paths)


def declared_inputs(pipeline: Any) -> list[str] | None:
    """The ``inputs`` a pipeline's spec declared, or ``None``."""
    meta = getattr(pipeline, TAG_META, None)
    value = meta.get("inputs") if isinstance(meta, dict) else None
    return list(value) if value is not None else None


def uses_retrieval(pipeline: Any) -> bool:
    """Whether ``pipeline`` has a ``bm25`` stage (so running it needs ``bm25s``)."""
    modules = [pipeline, *(m for _, m in pipeline.named_sub_modules())]
    return any(isinstance(getattr(m, "fn", None), BM25Stage) for m in modules)


def dump_spec(spec: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> str:
    """Serialise spec data as YAML (or JSON when ``path`` ends in ``.json``); write it to ``path``
    with :func:`stageflow.outfile.write_text` (a regular file atomically) when given. Returns the text."""
    import yaml

    as_json = path is not None and str(path).lower().endswith(".json")
    text = (
        json.dumps(spec, indent=2, ensure_ascii=False) + "\n"
        if as_json
        else yaml.safe_dump(dict(spec), sort_keys=False, allow_unicode=True)
    )
    if path is not None:
        from stageflow.outfile import write_text

        write_text(path, text, "the pipeline file")
    return text
