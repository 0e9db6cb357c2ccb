"""Issue 9: file references in a pipeline file stay inside the file's folder; indexes go to a cache.

A pipeline file may read a corpus only from its own folder (or from folders the user allows with
``--allow-path`` / ``allow_paths=``): absolute paths, ``..`` and symlinks that lead elsewhere are
refused. BM25 indexes are written under the cache folder, never next to the corpus (which may be a
read-only or shared place such as site-packages).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stageflow.spec import SpecError, build_pipeline, load_pipeline

DOCS = [{"id": "d1", "title": "Dune", "text": "Dune is a novel by Frank Herbert."}]


def _corpus(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


def _pipeline(folder: Path, corpus: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "p.yaml"
    path.write_text(
        f"inputs: [query]\nroot:\n  bm25: {json.dumps(corpus)}\n  k: 1\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def index_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    target = tmp_path / "index-cache"
    monkeypatch.setenv("STAGEFLOW_BM25_CACHE_DIR", str(target))
    return target


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink-file", "symlink-dir", "home"])
def test_file_references_outside_the_pipeline_folder_are_refused(
    tmp_path: Path, index_dir: Path, how: str
) -> None:
    outside = _corpus(tmp_path / "secret" / "corpus.jsonl")
    folder = tmp_path / "project"
    folder.mkdir()
    ref = {
        "absolute": str(outside),
        "dotdot": "../secret/corpus.jsonl",
        "symlink-file": "link.jsonl",
        "symlink-dir": "data/corpus.jsonl",
        "home": "~/corpus.jsonl",
    }[how]
    if how == "symlink-file":
        (folder / "link.jsonl").symlink_to(outside)
    if how == "symlink-dir":
        (folder / "data").symlink_to(outside.parent, target_is_directory=True)
    path = _pipeline(folder, ref)
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    err = info.value
    assert err.code == "path_outside_folder", str(err)
    assert err.key == "root.bm25"
    assert "--allow-path" in str(err)
    assert str(folder) in str(err)
    # the user can allow the other folder explicitly
    if how != "home":
        pipeline = load_pipeline(path, allow_paths=[outside.parent])
        assert pipeline(query="Dune novel").passages == ["Dune: Dune is a novel by Frank Herbert."]


def test_paths_inside_the_folder_still_work(tmp_path: Path, index_dir: Path) -> None:
    folder = tmp_path / "project"
    _corpus(folder / "data" / "corpus.jsonl")
    (folder / "link.jsonl").symlink_to(folder / "data" / "corpus.jsonl")
    for ref in ("data/corpus.jsonl", "./data/../data/corpus.jsonl", "link.jsonl", str(folder / "link.jsonl")):
        pipeline = load_pipeline(_pipeline(folder, ref))
        assert pipeline(query="Herbert").passages == ["Dune: Dune is a novel by Frank Herbert."]
    spec = {"root": {"bm25": "../elsewhere.jsonl"}}
    with pytest.raises(SpecError) as info:
        build_pipeline(spec, base_dir=folder)
    assert info.value.code == "path_outside_folder"


def test_bm25_indexes_are_written_to_the_cache_folder(tmp_path: Path, index_dir: Path) -> None:
    folder = tmp_path / "project"
    _corpus(folder / "corpus.jsonl")
    before = sorted(p.name for p in folder.iterdir())
    pipeline = load_pipeline(_pipeline(folder, "corpus.jsonl"))
    assert pipeline(query="Dune").passages
    assert sorted(p.name for p in folder.iterdir()) == sorted([*before, "p.yaml"])  # nothing new beside it
    entries = list(index_dir.rglob("stageflow-meta.json"))
    assert len(entries) == 1


def test_the_default_index_folder_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stageflow.retrieval import BM25Retriever, index_cache_dir

    monkeypatch.delenv("STAGEFLOW_BM25_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert index_cache_dir() == tmp_path / "xdg" / "stageflow" / "bm25"
    corpus = _corpus(tmp_path / "ro" / "corpus.jsonl")
    retriever = BM25Retriever(corpus)
    assert retriever.cache_dir is not None
    assert retriever.cache_dir.is_relative_to(tmp_path / "xdg" / "stageflow" / "bm25")
    assert sorted(p.name for p in corpus.parent.iterdir()) == ["corpus.jsonl"]
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert index_cache_dir() == tmp_path / "home" / ".cache" / "stageflow" / "bm25"


def test_validating_a_bm25_pipeline_does_not_import_bm25s(tmp_path: Path, index_dir: Path) -> None:
    """bm25s is imported when retrieval runs, not when a file is loaded or validated."""
    folder = tmp_path / "project"
    _corpus(folder / "corpus.jsonl")
    path = _pipeline(folder, "corpus.jsonl")
    code = (
        "import sys\n"
        "sys.modules['bm25s'] = None  # any import of bm25s now fails\n"
        "from stageflow.cli import main\n"
        f"rc = main(['validate', {str(path)!r}])\n"
        "print('RC', rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert proc.stdout.strip().splitlines()[-1] == "RC 0", proc.stderr + proc.stdout


def test_a_bad_corpus_is_still_reported_when_the_file_loads(tmp_path: Path, index_dir: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text('{"id": 1}\n', encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_pipeline(_pipeline(folder, "corpus.jsonl"))
    assert (info.value.code, info.value.key) == ("bad_corpus_line", "root.bm25")
