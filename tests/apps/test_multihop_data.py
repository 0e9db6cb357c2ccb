"""Validation of the multi-hop QA demo data (corpus, dev set, train set)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DATA_DIR = Path(__file__).resolve().parents[2] / "src/stageflow/apps/multihop/data"
CORPUS = DATA_DIR / "corpus.jsonl"
DEVSET = DATA_DIR / "devset.jsonl"
TRAINSET = DATA_DIR / "trainset.jsonl"

QA_FILES = {"dev": DEVSET, "train": TRAINSET}
QA_PREFIX = {"dev": "d", "train": "t"}
QA_COUNT = {"dev": 30, "train": 40}


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            assert line.strip(), f"{path.name}:{lineno}: blank line"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                pytest.fail(f"{path.name}:{lineno}: invalid JSON: {exc}")
            assert isinstance(record, dict), f"{path.name}:{lineno}: not a JSON object"
            records.append(record)
    return records


@pytest.fixture(scope="module")
def corpus() -> list[dict[str, Any]]:
    return load_jsonl(CORPUS)


@pytest.fixture(scope="module")
def passages(corpus: list[dict[str, Any]]) -> dict[str, str]:
    return {p["id"]: p["text"] for p in corpus}


@pytest.fixture(scope="module")
def qa_sets() -> dict[str, list[dict[str, Any]]]:
    return {name: load_jsonl(path) for name, path in QA_FILES.items()}


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def test_corpus_records_have_expected_fields(corpus: list[dict[str, Any]]) -> None:
    for p in corpus:
        assert set(p) == {"id", "title", "text"}, p
        assert isinstance(p["title"], str), p
        assert p["title"].strip(), p
        assert isinstance(p["text"], str), p


def test_corpus_ids_unique_and_sequential(corpus: list[dict[str, Any]]) -> None:
    ids = [p["id"] for p in corpus]
    assert len(ids) == len(set(ids)), "duplicate passage ids"
    assert ids == [f"p{i:04d}" for i in range(1, len(ids) + 1)]


def test_corpus_titles_unique(corpus: list[dict[str, Any]]) -> None:
    titles = [p["title"] for p in corpus]
    assert len(titles) == len(set(titles)), "duplicate passage titles"


def test_corpus_text_length(corpus: list[dict[str, Any]]) -> None:
    bad = [(p["id"], len(p["text"].split())) for p in corpus if not 10 <= len(p["text"].split()) <= 80]
    assert not bad, f"passages outside 10-80 words: {bad}"


def test_corpus_count(corpus: list[dict[str, Any]]) -> None:
    assert len(corpus) >= 250


@pytest.mark.parametrize("name", sorted(QA_FILES))
def test_qa_records_have_expected_fields(name: str, qa_sets: dict[str, list[dict[str, Any]]]) -> None:
    required = {"id", "question", "answer", "aliases", "supporting_ids", "hops"}
    if name == "train":
        required |= {"sub_questions", "facts"}
    for q in qa_sets[name]:
        assert required <= set(q), (q.get("id"), required - set(q))
        assert isinstance(q["question"], str), q["id"]
        assert q["question"].strip(), q["id"]
        assert isinstance(q["answer"], str), q["id"]
        assert q["answer"].strip(), q["id"]
        assert isinstance(q["aliases"], list), q["id"]
        assert all(isinstance(a, str) and a.strip() for a in q["aliases"]), q["id"]
        assert q["hops"] in (1, 2), q["id"]
        assert isinstance(q["supporting_ids"], list), q["id"]
        assert len(q["supporting_ids"]) == q["hops"], q["id"]
        if name == "train":
            assert len(q["sub_questions"]) == len(q["facts"]) == q["hops"], q["id"]
            assert all(isinstance(s, str) and s.strip() for s in q["sub_questions"] + q["facts"]), q["id"]


@pytest.mark.parametrize("name", sorted(QA_FILES))
def test_qa_ids_unique_and_sequential(name: str, qa_sets: dict[str, list[dict[str, Any]]]) -> None:
    ids = [q["id"] for q in qa_sets[name]]
    assert len(ids) == len(set(ids)), f"duplicate {name} ids"
    prefix = QA_PREFIX[name]
    assert ids == [f"{prefix}{i:02d}" for i in range(1, len(ids) + 1)]


@pytest.mark.parametrize("name", sorted(QA_FILES))
def test_qa_count(name: str, qa_sets: dict[str, list[dict[str, Any]]]) -> None:
    assert len(qa_sets[name]) == QA_COUNT[name]


@pytest.mark.parametrize("name", sorted(QA_FILES))
def test_supporting_ids_exist(
    name: str, qa_sets: dict[str, list[dict[str, Any]]], passages: dict[str, str]
) -> None:
    missing = [(q["id"], sid) for q in qa_sets[name] for sid in q["supporting_ids"] if sid not in passages]
    assert not missing, f"unknown supporting ids: {missing}"
    duplicated = [q["id"] for q in qa_sets[name] if len(set(q["supporting_ids"])) != len(q["supporting_ids"])]
    assert not duplicated, f"repeated supporting ids: {duplicated}"


@pytest.mark.parametrize("name", sorted(QA_FILES))
def test_answer_in_supporting_passage(
    name: str, qa_sets: dict[str, list[dict[str, Any]]], passages: dict[str, str]
) -> None:
    unsupported = []
    for q in qa_sets[name]:
        candidates = [normalize(a) for a in [q["answer"], *q["aliases"]]]
        texts = [normalize(passages[sid]) for sid in q["supporting_ids"] if sid in passages]
        if not any(c in t for c in candidates for t in texts):
            unsupported.append(q["id"])
    assert not unsupported, f"answer not found in any supporting passage: {unsupported}"


def test_dev_and_train_questions_disjoint(qa_sets: dict[str, list[dict[str, Any]]]) -> None:
    def key(question: str) -> str:
        return re.sub(r"[^a-z0-9 ]", "", normalize(question))

    dev = {key(q["question"]) for q in qa_sets["dev"]}
    train = {key(q["question"]) for q in qa_sets["train"]}
    assert len(dev) == len(qa_sets["dev"]), "duplicate dev questions"
    assert len(train) == len(qa_sets["train"]), "duplicate train questions"
    assert not dev & train, f"questions in both dev and train: {sorted(dev & train)}"
