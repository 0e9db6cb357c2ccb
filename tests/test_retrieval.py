"""Tests for stageflow.retrieval.BM25Retriever (tiny corpora in tmp_path; offline)."""

from __future__ import annotations

import copy
import itertools
import json
import pickle
from pathlib import Path

import pytest

from stageflow.errors import ConfigurationError
from stageflow.retrieval import BM25Retriever

DOCS = [
    {"id": "d1", "title": "Dune", "text": "Dune is a 1965 science fiction novel by Frank Herbert."},
    {
        "id": "d2",
        "title": "Frank Herbert",
        "text": "Frank Herbert was an American writer born in Tacoma, Washington.",
    },
    {"id": "d3", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {
        "id": "d4",
        "title": "Rayleigh scattering",
        "text": "The sky looks blue because air scatters short wavelengths.",
    },
    {"id": 5, "text": "Lisbon is the capital of Portugal; Portuguese is spoken there."},
]


def write_corpus(path: Path, docs=DOCS, extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(d) for d in docs] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


@pytest.fixture(autouse=True)
def index_dir(tmp_path, monkeypatch) -> Path:
    """Indexes go to the cache folder named by $STAGEFLOW_BM25_CACHE_DIR, here a temporary one."""
    monkeypatch.setenv("STAGEFLOW_BM25_CACHE_DIR", str(tmp_path / "index-cache"))
    return tmp_path / "index-cache"


# -- search ---------------------------------------------------------------------------------------------


def test_ranking_and_passage_format(corpus):
    retriever = BM25Retriever(corpus, k=2)
    passages = retriever("Where was Frank Herbert born?")
    assert passages[0] == "Frank Herbert: Frank Herbert was an American writer born in Tacoma, Washington."
    assert len(passages) == 2
    assert passages[1].startswith("Dune: ")


def test_search_returns_scored_records(corpus):
    hits = BM25Retriever(corpus).search("capital of France", k=5)
    assert hits[0]["id"] == "d3"
    assert set(hits[0]) == {"id", "title", "text", "score"}
    assert all(a["score"] >= b["score"] > 0 for a, b in itertools.pairwise(hits))
    assert {h["id"] for h in hits} == {"d3", 5}  # both mention 'capital'


def test_k_default_and_override(corpus):
    retriever = BM25Retriever(corpus, k=1)
    assert len(retriever("capital")) == 1
    assert len(retriever("capital", k=3)) == 2
    assert len(retriever("capital", 10)) == 2


def test_untitled_passage_is_just_text(corpus):
    assert BM25Retriever(corpus)("Portuguese Lisbon") == [DOCS[4]["text"]]


def test_no_match_returns_empty(corpus):
    retriever = BM25Retriever(corpus)
    assert retriever("zyzzyva quux") == []
    assert retriever("the of and") == []  # stopwords only
    assert retriever("") == []


def test_bad_k(corpus):
    with pytest.raises(ConfigurationError):
        BM25Retriever(corpus, k=0)
    with pytest.raises(ConfigurationError):
        BM25Retriever(corpus)("x", k=-1)
    with pytest.raises(TypeError):
        BM25Retriever(corpus)(["not", "a", "string"])  # type: ignore[arg-type]


# -- caching -------------------------------------------------------------------------------------------


def test_index_is_cached_and_reused(corpus, index_dir):
    first = BM25Retriever(corpus)
    assert not first.loaded_from_cache
    assert first.cache_dir is not None
    assert first.cache_dir.is_dir()
    assert first.cache_dir.parent.parent == index_dir
    assert sorted(p.name for p in corpus.parent.iterdir()) == ["corpus.jsonl", "index-cache"]
    assert not [p for p in first.cache_dir.parent.iterdir() if p.name.startswith(".tmp-")]

    second = BM25Retriever(corpus)
    assert second.loaded_from_cache
    assert second.cache_dir == first.cache_dir
    assert second.search("Frank Herbert born") == first.search("Frank Herbert born")


def test_changed_corpus_rebuilds(corpus):
    first = BM25Retriever(corpus)
    write_corpus(
        corpus, [*DOCS, {"id": "d6", "title": "Mars", "text": "Mars is the fourth planet from the Sun."}]
    )
    second = BM25Retriever(corpus)
    assert not second.loaded_from_cache
    assert second.cache_dir != first.cache_dir
    assert second("fourth planet")[0].startswith("Mars: ")
    assert not first.cache_dir.exists(), "the stale index is removed"
    assert BM25Retriever(corpus).loaded_from_cache


def test_damaged_cache_is_rebuilt(corpus):
    first = BM25Retriever(corpus)
    (first.cache_dir / "vocab.index.json").write_text("{not json", encoding="utf-8")
    second = BM25Retriever(corpus)
    assert not second.loaded_from_cache
    assert second("capital of France")[0].startswith("Paris: ")
    assert BM25Retriever(corpus).loaded_from_cache


def test_unwritable_cache_falls_back_to_memory(corpus, index_dir):
    index_dir.write_text("a file where the cache directory would go")
    retriever = BM25Retriever(corpus)
    assert retriever.cache_dir is None
    assert not retriever.loaded_from_cache
    assert retriever("capital of France")[0].startswith("Paris: ")
    assert "in memory" in repr(retriever)


def test_cache_can_be_disabled(corpus, index_dir):
    retriever = BM25Retriever(corpus, cache=False)
    assert retriever.cache_dir is None
    assert not index_dir.exists()


def test_deepcopy_shares_and_pickle_works(corpus):
    retriever = BM25Retriever(corpus)
    assert copy.deepcopy(retriever) is retriever
    assert copy.deepcopy({"r": retriever})["r"] is retriever
    clone = pickle.loads(pickle.dumps(retriever))
    assert clone("capital of France") == retriever("capital of France")


def test_is_a_plain_callable_not_a_dspy_component(corpus):
    import dspy

    retriever = BM25Retriever(corpus)
    assert not isinstance(retriever, dspy.Module | dspy.Retrieve)
    assert len(retriever) == len(DOCS)


# -- corpus errors --------------------------------------------------------------------------------------


def test_missing_corpus(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigurationError) as info:
        BM25Retriever(path)
    assert info.value.code == "corpus_not_found"
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_corpus(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigurationError) as info:
        BM25Retriever(path)
    assert info.value.code == "empty_corpus"
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("bad_line", "fragment"),
    [
        ('{"id": "x", "text": ', "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"id": "x", "title": "t"}', "'text'"),
        ('{"id": "x", "text": "   "}', "'text'"),
        ('{"id": "x", "title": 3, "text": "t"}', "'title'"),
        ('{"id": ["x"], "text": "t"}', "'id'"),
        ('{"id": "d1", "text": "again"}', "duplicate id 'd1' (first used on line 1)"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad_line, fragment):
    path = write_corpus(tmp_path / "bad.jsonl", DOCS[:2], extra_lines=("", bad_line))
    with pytest.raises(ConfigurationError) as info:
        BM25Retriever(path)
    err = info.value
    assert err.code == "bad_corpus_line"
    assert f"{path}, line 4" in str(err)
    assert fragment in str(err)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(ConfigurationError) as info:
        BM25Retriever(path)
    assert "line 2" in str(info.value)


def test_leftover_temp_dirs_are_cleaned_after_an_hour(corpus):
    import os
    import shutil
    import time

    first = BM25Retriever(corpus)
    root = first.cache_dir.parent
    shutil.rmtree(first.cache_dir)  # so the next retriever builds and stores again
    old, fresh = root / ".tmp-old", root / ".tmp-fresh"
    old.mkdir(parents=True)
    fresh.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    BM25Retriever(corpus)
    assert not old.exists()
    assert fresh.exists(), "may belong to a build in progress"


def test_stopwords_can_be_kept(corpus):
    retriever = BM25Retriever(corpus, stopwords=None, cache=False)
    assert retriever("the")  # 'the' is indexed when stopwords are kept
