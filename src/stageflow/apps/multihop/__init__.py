"""Multi-hop question answering over a small shipped corpus: the tutorial's worked example.

Several architectures answer the same questions (:mod:`~stageflow.apps.multihop.architectures`);
``stageflow demo`` runs the best measured one, ``linked-choose``: linked retrieval and typed
candidates without a model, then the model picks a candidate::

    import dspy
    from stageflow.apps.multihop import build_architecture, load_devset

    program = build_architecture("linked-choose")
    with dspy.context(lm=my_lm, adapter=program.adapter()):
        result = program(question=load_devset()[0].question)
    print(result.passages, result.candidates, result.answer)

``build_program()`` is the ``decompose`` architecture: ``decompose`` splits the question into
sub-questions; ``ForEach`` sub-question, BM25 retrieves passages and ``extract`` states the relevant
fact; ``synthesize`` answers from the facts.
"""

from __future__ import annotations

from stageflow.apps.multihop.adapter import CompactJSONAdapter, make_adapter
from stageflow.apps.multihop.architectures import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    Architecture,
    build_architecture,
)
from stageflow.apps.multihop.data import (
    DATA_DIR,
    answer_matches,
    corpus_path,
    load_devset,
    load_trainset,
    match_kind,
    normalize_text,
    qa_metric,
)
from stageflow.apps.multihop.linked import LinkedQA, build_linked_program
from stageflow.apps.multihop.program import (
    MAX_SUB_QUESTIONS,
    MultiHopQA,
    RetrievePassages,
    build_program,
    check_sub_questions,
    stage_name,
)

__all__ = [
    "ARCHITECTURES",
    "DATA_DIR",
    "DEFAULT_ARCHITECTURE",
    "MAX_SUB_QUESTIONS",
    "Architecture",
    "CompactJSONAdapter",
    "LinkedQA",
    "MultiHopQA",
    "RetrievePassages",
    "answer_matches",
    "build_architecture",
    "build_linked_program",
    "build_program",
    "check_sub_questions",
    "corpus_path",
    "load_devset",
    "load_trainset",
    "make_adapter",
    "match_kind",
    "normalize_text",
    "qa_metric",
    "stage_name",
]
