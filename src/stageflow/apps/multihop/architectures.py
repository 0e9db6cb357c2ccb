"""The multi-hop QA architectures, by name: what ``stageflow demo --architecture`` and
``benchmarks/architectures.py`` run.

=====================  =========================================================================
``linked-choose``      linked retrieval → typed candidates → the model picks one (1 LM call);
                       the default: the best exact match measured on the shipped dev set
``linked-likelihood``  linked retrieval → typed candidates → the most likely candidate (1 call each)
``linked-read``        linked retrieval → the model writes the answer from the passages (1 call)
``linked-first``       linked retrieval → typed candidates → the first one: the no-model control
``decompose``          the model decomposes, BM25 per sub-question, the model extracts a fact per
                       sub-question and synthesizes (3-4 calls); labeled train demos on each
=====================  =========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_ARCHITECTURE",
    "Architecture",
    "build_architecture",
    "get_architecture",
]


@dataclass(frozen=True)
class Architecture:
    """A named way to answer multi-hop questions.

    Attributes:
        name: The name (``--architecture``).
        summary: One line for humans.
        uses_lm: Whether it calls a model at all.
        default_k: Passages per search (hop-1 passages for the linked ones).
        default_demos: Labeled train-set demos per predictor when none are asked for, for the
            embedded model (compact prompts); hosted models get none by default.
    """

    name: str
    summary: str
    uses_lm: bool
    default_k: int
    default_demos: int
    _build: Callable[[Any, int, bool], Any]

    def build(self, retriever: Any = None, *, k: int | None = None, compact: bool = True) -> Any:
        """The program (a stageflow pipeline); ``retriever=None`` means the shipped corpus."""
        return self._build(retriever, self.default_k if k is None else k, compact)


def _decompose(retriever: Any, k: int, compact: bool) -> Any:
    from stageflow.apps.multihop.program import build_program

    return build_program(retriever, k=k, compact=compact)


def _linked(answerer: str) -> Callable[[Any, int, bool], Any]:
    def build(retriever: Any, k: int, compact: bool) -> Any:
        from stageflow.apps.multihop.linked import build_linked_program

        return build_linked_program(retriever, k=k, answerer=answerer)  # type: ignore[arg-type]

    return build


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "linked-choose",
            "linked retrieval, typed candidates, the model picks one (1 call)",
            True,
            2,
            0,
            _linked("choose"),
        ),
        Architecture(
            "linked-likelihood",
            "linked retrieval, typed candidates, the most likely one wins (1 call per candidate)",
            True,
            2,
            0,
            _linked("likelihood"),
        ),
        Architecture(
            "linked-read",
            "linked retrieval, the model writes the answer from the passages (1 call)",
            True,
            2,
            0,
            _linked("read"),
        ),
        Architecture(
            "linked-first",
            "linked retrieval, typed candidates, the first one (no model: the control)",
            False,
            2,
            0,
            _linked("first"),
        ),
        Architecture(
            "decompose",
            "the model decomposes, retrieves and extracts per sub-question, synthesizes (3-4 calls)",
            True,
            3,
            4,
            _decompose,
        ),
    )
}

#: The best measured architecture on the shipped dev set (``benchmarks/architectures.py``).
DEFAULT_ARCHITECTURE = "linked-choose"


def get_architecture(name: str) -> Architecture:
    """The architecture called ``name``.

    Raises:
        ConfigurationError: no architecture has that name.
    """
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown architecture {name!r}.",
            field="architecture",
            code="bad_setting",
            hint=f"use one of: {', '.join(ARCHITECTURES)}",
        ) from None


def build_architecture(
    name: str,
    *,
    corpus: str | Path | None = None,
    k: int | None = None,
    compact: bool = True,
    demos: int | None = None,
) -> Any:
    """Build architecture ``name`` over ``corpus`` (default: the shipped one), with its demos.

    Args:
        name: An :data:`ARCHITECTURES` key.
        corpus: A JSON Lines corpus of ``{"id", "title", "text"}``.
        k: Passages per search (default: the architecture's).
        compact: The terse prompt style for tiny models (the decompose architecture only; the
            linked ones always use it).
        demos: Labeled train-set demos per predictor; ``None``: the architecture's default for
            compact prompts, 0 otherwise.

    Raises:
        ConfigurationError: an unknown name, a bad corpus or a bad ``k``/``demos``.
    """
    from stageflow.apps.multihop.data import corpus_path
    from stageflow.apps.multihop.evaluate import with_train_demos

    arch = get_architecture(name)
    kk = arch.default_k if k is None else k
    if kk < 1:
        raise ConfigurationError(f"k must be at least 1, got {kk}.", field="k", code="bad_setting")
    count = (arch.default_demos if compact else 0) if demos is None else demos
    if count < 0:
        raise ConfigurationError(f"demos must be 0 or more, got {count}.", field="demos", code="bad_setting")
    from stageflow.apps.multihop.linked import LinkedQA

    path = Path(corpus) if corpus is not None else corpus_path()
    program = arch.build(_retriever(name, path, kk), k=kk, compact=compact)
    if isinstance(program, LinkedQA):
        return program.add_train_demos(count)
    return with_train_demos(program, count)


def _retriever(name: str, path: Path, k: int) -> Any:
    from stageflow.retrieval import BM25Retriever, LinkedRetriever

    bm25 = BM25Retriever(path, k=k)
    return bm25 if name == "decompose" else LinkedRetriever(bm25, k=k)
