"""Person candidates for "Who ...?" questions: people, not periods, movements or places."""

from __future__ import annotations

from typing import Any

import pytest

from stageflow.apps.multihop import load_devset, load_trainset
from stageflow.apps.multihop.architectures import build_architecture
from stageflow.apps.multihop.candidates import answer_type, candidate_spans, propose_candidates
from stageflow.apps.multihop.data import match_kind
from stageflow.apps.multihop.people import is_person_passage, person_candidates
from stageflow.retrieval import format_passage, read_corpus

LEONARDO = (
    "Leonardo da Vinci: Leonardo da Vinci was an Italian Renaissance painter, engineer and inventor born "
    "near the town of Vinci in 1452."
)
MONA_LISA = (
    "Mona Lisa: The Mona Lisa is a portrait painted by Leonardo da Vinci. It hangs in the Louvre in Paris."
)
LOUVRE = "Louvre: The Louvre in Paris is the most visited art museum in the world."


@pytest.fixture(scope="module")
def control() -> Any:
    return build_architecture("linked-first")


def test_who_questions_ask_for_a_person() -> None:
    assert answer_type("Who painted the Mona Lisa?") == "person"
    assert answer_type("Whose novel is set in Macondo?") == "person"
    assert answer_type("Which philosopher tutored Alexander the Great?") == "person"
    assert answer_type("In which city was the inventor who patented the telephone born?") == "name"
    assert answer_type("In what year was the painter who painted Guernica born?") == "year"


def test_the_readme_example_proposes_the_painter_not_a_period(control: Any) -> None:
    result = control(question="Who painted the Mona Lisa?")
    assert result.candidates[0] == "Leonardo da Vinci"
    assert result.answer == "Leonardo da Vinci"
    for wrong in ("Italian Renaissance", "Vinci", "Dutch Golden Age", "Leiden", "Louvre"):
        assert wrong not in result.candidates


def test_periods_movements_places_and_towns_are_not_people() -> None:
    people = candidate_spans("Who painted the Mona Lisa?", [LEONARDO, MONA_LISA, LOUVRE])
    assert people == ["Leonardo da Vinci"]


def test_a_linked_person_is_a_candidate_for_a_person_question_only() -> None:
    passages = [MONA_LISA, LEONARDO]
    who = propose_candidates("Who painted the Mona Lisa?", passages, linked=["Leonardo da Vinci"])
    assert who == {"candidates": ["Leonardo da Vinci"]}
    where = propose_candidates(
        "In which town was the painter of the Mona Lisa born?", passages, ["Leonardo da Vinci"]
    )
    assert "Leonardo da Vinci" not in where["candidates"]


def test_cues_roles_relations_coordination_and_surnames() -> None:
    passages = [
        "Titan: Titan was discovered in 1655 by the Dutch astronomer Christiaan Huygens.",
        "Plato: Plato was an ancient Greek philosopher from Athens and a student of Socrates.",
        "Polonium: Polonium was discovered in 1898 by Marie Curie and Pierre Curie in Paris.",
        "The Hobbit: The Hobbit is a fantasy novel by J. R. R. Tolkien. The Hobbit follows Bilbo Baggins.",
        "J. R. R. Tolkien: J. R. R. Tolkien was an English writer born in Bloemfontein.",
        "Guernica: Guernica was painted during the Spanish Civil War and was shown by Germany.",
    ]
    people = person_candidates(passages, limit=20)
    assert people[:6] == [
        "Christiaan Huygens",
        "Plato",
        "Socrates",
        "Marie Curie",
        "Pierre Curie",
        "J. R. R. Tolkien",
    ]
    assert "Tolkien" not in people  # the surname is the person of the Tolkien passage
    assert "Bilbo Baggins" not in people  # a name's shape only: not beside people with evidence
    assert person_candidates(["Shire: The tale follows Bilbo Baggins home."]) == ["Bilbo Baggins"]
    for not_a_person in ("Spanish Civil War", "Athens", "Paris", "Bloemfontein", "Hobbit", "Greek"):
        assert not_a_person not in people


def test_a_described_person_is_a_bridge_and_comes_after_the_one_it_leads_to() -> None:
    passages = [
        "The Republic: The Republic is a dialogue written by the Greek philosopher Plato.",
        "Plato: Plato was an ancient Greek philosopher from Athens and a student of Socrates.",
    ]
    two_hop = propose_candidates(
        "Who was the teacher of the philosopher who wrote The Republic?", passages, ["Plato"]
    )
    assert two_hop["candidates"] == ["Socrates", "Plato"]
    one_hop = propose_candidates("Who wrote The Republic?", passages, ["Plato"])
    assert one_hop["candidates"][0] == "Plato"


def test_the_passage_the_question_names_is_read_first() -> None:
    passages = [
        "George Frideric Handel: George Frideric Handel was a Baroque composer born in Halle.",
        "The Hobbit: The Hobbit is a fantasy novel by J. R. R. Tolkien.",
        "J. R. R. Tolkien: J. R. R. Tolkien was an English writer born in Bloemfontein.",
    ]
    out = propose_candidates("Who wrote The Hobbit?", passages, ["J. R. R. Tolkien"])
    assert out["candidates"] == ["J. R. R. Tolkien", "George Frideric Handel"]


def test_no_person_found_falls_back_to_names() -> None:
    assert candidate_spans("Who?", ["Nobody lives in Atlantis."]) == ["Nobody", "Atlantis"]


def test_person_passages_of_the_shipped_corpus() -> None:
    from stageflow.apps.multihop import corpus_path

    docs = {d["title"]: format_passage(d) for d in read_corpus(corpus_path())}
    for person in ("Leonardo da Vinci", "Plato", "Usain Bolt", "J. R. R. Tolkien", "Cleopatra", "Rembrandt"):
        assert is_person_passage(docs[person]), person
    for thing in (
        "Mona Lisa",
        "The Persistence of Memory",
        "Louvre",
        "Vinci" if "Vinci" in docs else "Paris",
    ):
        assert not is_person_passage(docs[thing]), thing


def _who_examples() -> list[Any]:
    return [ex for ex in [*load_devset(), *load_trainset()] if answer_type(ex.question) == "person"]


@pytest.mark.parametrize("example", _who_examples(), ids=lambda ex: ex.question[:40])
def test_shipped_who_questions_get_person_candidates(control: Any, example: Any) -> None:
    result = control(question=example.question)
    assert any(match_kind(c, example) == "exact" for c in result.candidates)
    assert match_kind(result.answer, example) == "exact"  # the first candidate, no model
