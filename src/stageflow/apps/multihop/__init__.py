"""Multi-hop question answering over a small shipped corpus: the tutorial's worked example.

``decompose`` splits the question into sub-questions; ``ForEach`` sub-question, BM25 retrieves
passages and ``extract`` states the relevant fact; ``synthesize`` answers from the facts::

    import dspy
    from stageflow.apps.multihop import build_program, load_devset

    program = build_program()
    with dspy.context(lm=my_lm, adapter=program.adapter()):
        result = program(question=load_devset()[0].question)
    print(result.sub_questions, result.facts, result.answer)
"""

from __future__ import annotations

from stageflow.apps.multihop.adapter import CompactJSONAdapter, make_adapter
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
from stageflow.apps.multihop.program import (
    MAX_SUB_QUESTIONS,
    MultiHopQA,
    RetrievePassages,
    build_program,
    check_sub_questions,
    stage_name,
)

__all__ = [
    "DATA_DIR",
    "MAX_SUB_QUESTIONS",
    "CompactJSONAdapter",
    "MultiHopQA",
    "RetrievePassages",
    "answer_matches",
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
