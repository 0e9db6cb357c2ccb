"""Module nodes: ``predict``, ``chain_of_thought``, ``component``, ``bm25`` and ``lm_router``."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy

from stageflow.patterns.base import as_stage
from stageflow.patterns.branching import lm_router
from stageflow.spec._signature import make_signature
from stageflow.spec._source import KeyPath, format_key_path
from stageflow.stages import FunctionStage, Stage

if TYPE_CHECKING:
    from stageflow.spec._build import _Builder

__all__ = ["MODULE_KINDS", "TAG_DECL", "TAG_ORIGIN", "BM25Stage", "build_module"]

MODULE_KINDS = ("predict", "chain_of_thought", "component", "bm25", "lm_router")
TAG_ORIGIN = "_stageflow_spec_origin"  # how a component/bm25/lm_router/part was written
TAG_DECL = "_stageflow_spec_decl"  # reads=/writes= of a Stage wrapper
_ONLY_FOR = {"instructions": ("predict", "chain_of_thought"), "args": ("component",), "k": ("bm25",)}


class BM25Stage:
    """The body of a ``bm25`` node: ``query -> {"passages": [...]}`` (deep copies share the index).

    The index (and ``bm25s``) is loaded on the first query, not when the file is loaded: validating
    a pipeline file never needs the retrieval extra.
    """

    def __init__(self, corpus: Path, k: int) -> None:
        self.corpus = corpus
        self.k = k
        self._retriever: Any = None
        self._lock = threading.Lock()

    @property
    def retriever(self) -> Any:
        """The :class:`~stageflow.retrieval.BM25Retriever`, built on first use."""
        if self._retriever is None:
            with self._lock:
                if self._retriever is None:
                    from stageflow.retrieval import BM25Retriever

                    self._retriever = BM25Retriever(self.corpus, k=self.k)
        return self._retriever

    def __call__(self, query: str) -> dict[str, list[str]]:
        return {"passages": list(self.retriever(query, self.k))}

    def __deepcopy__(self, memo: dict[int, Any]) -> BM25Stage:
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"corpus": self.corpus, "k": self.k, "_retriever": self._retriever}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def build_module(b: _Builder, spec: Mapping[str, Any], path: KeyPath) -> Any:
    kinds = [k for k in MODULE_KINDS if k in spec]
    if len(kinds) != 1:
        raise b.err(
            path,
            "a module node needs exactly one of: "
            + ", ".join(MODULE_KINDS)
            + (f" (found {', '.join(kinds)})." if kinds else "."),
            code="bad_node",
            hint="e.g. {predict: 'question -> answer'}",
        )
    kind = kinds[0]
    for key, needs in _ONLY_FOR.items():
        if key in spec and kind not in needs:
            raise b.err((*path, key), f"'{key}' only applies to {' / '.join(needs)} nodes.", code="bad_node")
    module = b.located(_KINDS[kind](b, spec, path), (*path, kind))
    extra: dict[str, Any] = {}
    for key in ("inputs", "outputs"):
        if key in spec:
            extra[key] = b.renames(spec[key], (*path, key))
    decl = {key: b.names(spec[key], (*path, key)) for key in ("reads", "writes") if key in spec}
    if not extra and not decl:
        return module
    wrapper = Stage(
        module,
        inputs=extra.get("inputs"),
        outputs=extra.get("outputs"),
        reads=decl.get("reads"),
        writes=decl.get("writes"),
    )
    if decl:
        setattr(wrapper, TAG_DECL, decl)
    return wrapper


def _signature(b: _Builder, spec: Mapping[str, Any], path: KeyPath, key: str) -> Any:
    text = b.typed(spec[key], str, (*path, key), "a DSPy signature string like 'question -> answer'")
    instructions = spec.get("instructions")
    if instructions is not None:
        b.typed(instructions, str, (*path, "instructions"), "a string")
    try:
        return make_signature(text, instructions)
    except Exception as exc:
        raise b.err(
            (*path, key),
            f"invalid DSPy signature {text!r}: {exc}",
            code="bad_signature",
            hint="write 'input1, input2 -> output1, output2: list[str]'",
        ) from exc


def kind_predict(b: _Builder, spec: Mapping[str, Any], path: KeyPath) -> Any:
    return dspy.Predict(_signature(b, spec, path, "predict"))


def kind_chain_of_thought(b: _Builder, spec: Mapping[str, Any], path: KeyPath) -> Any:
    return dspy.ChainOfThought(_signature(b, spec, path, "chain_of_thought"))


def kind_component(b: _Builder, spec: Mapping[str, Any], path: KeyPath) -> Any:
    made = b.component(spec, path)
    if not callable(made):
        raise b.err(
            (*path, "component"),
            f"the component '{spec['component']}' gave {made!r:.60}, which is not a stage.",
            code="not_a_stage",
            hint="a component must be a dspy.Module, a function, or a factory returning one "
            "(call factories with args: {...})",
        )
    stage = as_stage(made, format_key_path(path))
    setattr(stage, TAG_ORIGIN, b.origin(spec))
    return stage


def kind_bm25(b: _Builder, spec: Mapping[str, Any], path: KeyPath) -> Any:
    from stageflow.retrieval import read_corpus

    corpus = spec["bm25"]
    full = b.path(corpus, (*path, "bm25"), "the path of a corpus .jsonl file")
    k = b.typed(spec.get("k", 3), int, (*path, "k"), "a positive int")
    if k < 1:
        raise b.err((*path, "k"), f"k must be at least 1, got {k}.", code="bad_value")
    with b.guard((*path, "bm25")):
        read_corpus(full)  # a bad corpus is reported now, at its key; the index is built on first use
    stage = FunctionStage(BM25Stage(full, k), writes=["passages"], name="bm25")
    setattr(stage, TAG_ORIGIN, {"bm25": corpus, **({"k": k} if "k" in spec else {})})
    return stage


def kind_lm_router(b: _Builder, spec: Mapping[str, Any], path: KeyPath) -> Any:
    value = spec["lm_router"]
    where = (*path, "lm_router")
    if not isinstance(value, Mapping):
        raise b.err(where, "lm_router takes {branches: [...], inputs: [...], instructions: ...}.")
    b.check_keys(value, ("branches", "inputs", "instructions"), where, "lm_router")
    branches = b.names(value.get("branches"), (*where, "branches"))
    inputs = value.get("inputs", "question")
    inputs = [inputs] if isinstance(inputs, str) else b.names(inputs, (*where, "inputs"))
    instructions = value.get("instructions")
    router = lm_router(branches, inputs, instructions)
    setattr(router, TAG_ORIGIN, {"lm_router": copy.deepcopy(dict(value))})
    return router


_KINDS: dict[str, Callable[[_Builder, Mapping[str, Any], KeyPath], Any]] = {
    "predict": kind_predict,
    "chain_of_thought": kind_chain_of_thought,
    "component": kind_component,
    "bm25": kind_bm25,
    "lm_router": kind_lm_router,
}
