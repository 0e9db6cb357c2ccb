"""run_batch: ordered exactly-once output, error rows, resume, refusal of changed programs or
inputs, retries of failed records, usage, and the concurrency budget (FakeLM, no timing asserts)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import dspy
import pydantic
import pytest

import stageflow
from conftest import ctrl_c_when
from stageflow.errors import ConfigurationError, ContractError
from stageflow.runtime import BatchInterrupted, JournalError
from stageflow.runtime.journal import Journal
from stageflow.testing import FakeLM


def records(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "question": f"q{i}"} for i in range(start, start + n)]


def qa_pipeline(fail: set[str] | None = None) -> stageflow.SequentialPipeline:
    bad = fail if fail is not None else set()

    def check(answer: str) -> dict[str, bool]:
        if answer.lower() in bad:
            raise ValueError(f"rejected {answer}")
        return {"checked": True}

    return stageflow.SequentialPipeline(
        [dspy.Predict("question -> answer"), stageflow.stage(check, writes=["checked"])]
    )


def upper_lm(**kwargs: Any) -> FakeLM:
    return FakeLM({"answer": lambda inputs: inputs["question"].upper()}, **kwargs)


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def journal_rows(path: Path) -> dict[str, tuple[str, int]]:
    con = sqlite3.connect(path)
    try:
        return {k: (s, a) for k, s, a in con.execute("SELECT key, status, attempts FROM records")}
    finally:
        con.close()


def test_output_has_every_record_once_in_input_order_with_error_rows(tmp_path: Path) -> None:
    lm = upper_lm(latency=0.002)
    out = tmp_path / "out.jsonl"
    summary = stageflow.run_batch(
        qa_pipeline(fail={"q3", "q17"}), records(30), lm=lm, journal=tmp_path / "j", output=out, concurrency=8
    )
    rows = read_output(out)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(30)]
    assert rows[0] == {"id": "r0", "status": "ok", "outputs": {"answer": "Q0", "checked": True}}
    failed = [r for r in rows if r["status"] == "error"]
    assert [r["id"] for r in failed] == ["r3", "r17"]
    error = failed[0]["error"]
    assert error["type"] == "StageError"
    assert error["stage_path"] == "stages[1]"
    assert error["code"] == "stage_failed"
    assert "rejected Q3" in error["message"]
    assert error["cause"] == "ValueError: rejected Q3"
    assert (summary.total, summary.succeeded, summary.failed, summary.ran) == (30, 28, 2, 30)
    assert not summary.ok
    assert summary.usage.lm_calls == 30 == lm.calls
    assert summary.usage.input_tokens > 0
    assert summary.usage.output_tokens > 0
    assert summary.usage.cost is None
    assert [(r.id, r.ok) for r in summary.rows()][:4] == [
        ("r0", True),
        ("r1", True),
        ("r2", True),
        ("r3", False),
    ]
    assert "failed            2" in summary.table()


def test_a_finished_journal_is_not_run_again(tmp_path: Path) -> None:
    lm = upper_lm()
    kw: dict[str, Any] = {"lm": lm, "journal": tmp_path / "j", "output": tmp_path / "out.jsonl"}
    stageflow.run_batch(qa_pipeline(), records(12), **kw)
    first = (tmp_path / "out.jsonl").read_text()
    again = stageflow.run_batch(qa_pipeline(), records(12), **kw)
    assert lm.calls == 12
    assert (again.ran, again.skipped, again.succeeded) == (0, 12, 12)
    assert (tmp_path / "out.jsonl").read_text() == first


def test_resume_runs_pending_and_interrupted_records_and_counts_repeats(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    lm = upper_lm()
    stageflow.run_batch(qa_pipeline(), records(10), lm=lm, journal=journal)
    con = sqlite3.connect(journal)
    with con:  # as a kill would leave it: two records never started, three in flight
        con.execute("UPDATE records SET status = 'pending', attempts = 0 WHERE key IN ('r1', 'r2')")
        con.execute("UPDATE records SET status = 'running' WHERE key IN ('r4', 'r5', 'r9')")
    con.close()
    lm.calls = 0
    summary = stageflow.run_batch(qa_pipeline(), records(10), lm=lm, journal=journal, output=tmp_path / "o")
    assert lm.calls == 5
    assert (summary.ran, summary.skipped, summary.repeated, summary.repeated_total) == (5, 5, 3, 3)
    assert "3 record(s) in flight at an earlier stop" in summary.table()
    assert [r["id"] for r in read_output(tmp_path / "o")] == [f"r{i}" for i in range(10)]
    assert journal_rows(journal)["r4"] == ("done", 2)


def test_failed_records_are_kept_then_retried_alone(tmp_path: Path) -> None:
    # The failures are the service's (the LM raises for two questions while it is down), not the
    # program's: the program is the same on every run, so resuming and retrying are allowed.
    down = {"q2", "q5"}

    def answer(inputs: dict[str, Any]) -> str:
        if inputs["question"] in down:
            raise ConnectionError(f"service unavailable for {inputs['question']}")
        return str(inputs["question"]).upper()

    lm = FakeLM({"answer": answer})
    kw: dict[str, Any] = {"lm": lm, "journal": tmp_path / "j", "output": tmp_path / "out.jsonl"}
    first = stageflow.run_batch(qa_pipeline(), records(8), **kw)
    assert first.failed == 2
    down.clear()
    kept = stageflow.run_batch(qa_pipeline(), records(8), **kw)
    assert (kept.ran, kept.failed) == (0, 2)
    retried = stageflow.run_batch(qa_pipeline(), records(8), retry_failed=True, **kw)
    assert (retried.ran, retried.retried, retried.failed, retried.succeeded) == (2, 2, 0, 8)
    assert retried.ok
    assert all(r["status"] == "ok" for r in read_output(tmp_path / "out.jsonl"))


def test_failed_records_retried_on_purpose_are_not_repeated_work(tmp_path: Path) -> None:
    # Repeated work is work lost to a stop (records in flight run again), never a retry asked for.
    lm = upper_lm()
    kw: dict[str, Any] = {"lm": lm, "journal": tmp_path / "j"}
    assert stageflow.run_batch(qa_pipeline({"q1", "q3"}), records(6), **kw).failed == 2
    for _ in range(2):  # the same program, still failing: retried twice on purpose
        again = stageflow.run_batch(qa_pipeline({"q1", "q3"}), records(6), retry_failed=True, **kw)
        assert (again.ran, again.retried, again.failed) == (2, 2, 2)
        assert (again.repeated, again.repeated_total) == (0, 0)
        assert "0 record(s) in flight at an earlier stop, run again\n" in again.table() + "\n"
    assert journal_rows(tmp_path / "j")["r1"] == ("failed", 3)
    con = sqlite3.connect(tmp_path / "j")
    with con:  # as a kill would leave it: r4 in flight
        con.execute("UPDATE records SET status = 'running' WHERE key = 'r4'")
    con.close()
    mixed = stageflow.run_batch(qa_pipeline({"q1", "q3"}), records(6), retry_failed=True, **kw)
    assert (mixed.ran, mixed.retried, mixed.repeated, mixed.repeated_total) == (3, 2, 1, 1)


def test_a_journal_from_before_repeats_were_counted_still_resumes(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    stageflow.run_batch(qa_pipeline({"q2"}), records(4), lm=upper_lm(), journal=journal)
    con = sqlite3.connect(journal)
    with con:  # the records table as an earlier stageflow wrote it: no repeats column
        con.execute("ALTER TABLE records DROP COLUMN repeats")
        con.execute("UPDATE records SET status = 'running', attempts = 1 WHERE key = 'r0'")
    con.close()
    summary = stageflow.run_batch(
        qa_pipeline({"q2"}), records(4), lm=upper_lm(), journal=journal, retry_failed=True
    )
    assert (summary.ran, summary.retried, summary.repeated, summary.repeated_total) == (2, 1, 1, 1)


def test_a_change_to_data_a_stage_captures_is_a_changed_program(tmp_path: Path) -> None:
    # A set the check stage reads is part of what the program computes: editing it between runs is
    # a different program, so resuming is refused unless allowed.
    bad = {"q2"}
    kw: dict[str, Any] = {"lm": upper_lm(), "journal": tmp_path / "j"}
    assert stageflow.run_batch(qa_pipeline(bad), records(4), **kw).failed == 1
    bad.clear()
    with pytest.raises(JournalError) as info:
        stageflow.run_batch(qa_pipeline(bad), records(4), **kw)
    assert info.value.code == "changed_since_planned"
    again = stageflow.run_batch(qa_pipeline(bad), records(4), retry_failed=True, allow_changed=True, **kw)
    assert (again.retried, again.failed) == (1, 0)


def test_a_changed_program_is_refused_unless_allowed_and_the_override_is_recorded(tmp_path: Path) -> None:
    lm = upper_lm()
    journal = tmp_path / "j"
    stageflow.run_batch(qa_pipeline(), records(5), lm=lm, journal=journal)
    changed = qa_pipeline()
    changed.stages[0].signature = changed.stages[0].signature.with_instructions("Answer in capitals.")
    with pytest.raises(JournalError) as info:
        stageflow.run_batch(changed, records(5), lm=lm, journal=journal)
    assert info.value.code == "changed_since_planned"
    assert "the program changed" in info.value.message
    assert "--allow-changed" in (info.value.hint or "")
    assert "--no-resume" in (info.value.hint or "")
    summary = stageflow.run_batch(changed, records(5), lm=lm, journal=journal, allow_changed=True)
    assert (summary.ran, summary.skipped) == (0, 5)
    con = sqlite3.connect(journal)
    allowed = con.execute("SELECT allowed_changes FROM runs ORDER BY id DESC LIMIT 1").fetchone()[0]
    con.close()
    assert "the program changed" in allowed
    # the override moved the plan to the new program: resuming it again needs no override
    assert stageflow.run_batch(changed, records(5), lm=lm, journal=journal).ran == 0


def nested(check: Any, extra: bool = False) -> stageflow.SequentialPipeline:
    """A predictor, then a branch whose ``plain`` arm is ``check`` (and an extra stage at the end)."""
    branch = stageflow.BranchingPipeline(
        stageflow.stage(lambda answer: {"branch": "plain"}, writes=["branch"], name="route"),
        {"plain": stageflow.stage(check, writes=["checked"]), "other": dspy.Predict("answer -> checked")},
    )
    tail = [stageflow.stage(lambda checked: {"done": True}, writes=["done"], name="done")] if extra else []
    return stageflow.SequentialPipeline([dspy.Predict("question -> answer"), branch, *tail])


def test_a_refused_resume_names_the_stages_that_changed(tmp_path: Path) -> None:
    def check(answer: str) -> dict[str, bool]:
        return {"checked": True}

    def stricter(answer: str) -> dict[str, bool]:
        return {"checked": answer.isupper()}

    kw: dict[str, Any] = {"lm": upper_lm(), "journal": tmp_path / "j"}
    stageflow.run_batch(nested(check), records(3), **kw)
    with pytest.raises(JournalError) as info:
        stageflow.run_batch(nested(stricter), records(3), **kw)
    # the stage inside the branch is named, not the branch that holds it
    assert "the program changed (changed stages: stages[1].branches['plain'];" in info.value.message
    with pytest.raises(JournalError) as info:
        stageflow.run_batch(nested(check, extra=True), records(3), **kw)
    assert "(added stages: stages[2];" in info.value.message
    stageflow.run_batch(nested(stricter, extra=True), records(3), allow_changed=True, **kw)
    with pytest.raises(JournalError) as info:
        stageflow.run_batch(nested(check), records(3), **kw)
    assert "(changed stages: stages[1].branches['plain']; removed stages: stages[2];" in info.value.message


def test_a_journal_without_stage_fingerprints_still_refuses_and_resumes(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    stageflow.run_batch(qa_pipeline(), records(3), lm=upper_lm(), journal=journal)
    con = sqlite3.connect(journal)
    with con:  # as an earlier stageflow wrote it: the whole program's fingerprint only
        con.execute("DELETE FROM meta WHERE key = 'stage_fingerprints'")
    con.close()
    changed = qa_pipeline({"q9"})
    with pytest.raises(JournalError) as info:
        stageflow.run_batch(changed, records(3), lm=upper_lm(), journal=journal)
    assert "the program changed (the journal does not record which stage;" in info.value.message
    again = stageflow.run_batch(changed, records(4), lm=upper_lm(), journal=journal, allow_changed=True)
    assert (again.ran, again.skipped) == (1, 3)
    with Journal(journal) as j:  # the override recorded the stages of the program it moved to
        assert sorted(j.stage_fingerprints() or {}) == ["stages[0]", "stages[1]"]


def test_stage_fingerprints_cover_every_stage_path_of_the_picture() -> None:
    from stageflow.observe.graph import graph_of
    from stageflow.runtime.fingerprint import stage_fingerprints

    per_item = stageflow.SequentialPipeline([dspy.Predict("topic -> fact"), dspy.Predict("fact -> note")])
    program = stageflow.SequentialPipeline(
        [
            stageflow.Stage(
                nested(lambda answer: {"checked": True}), retry=stageflow.RetryPolicy(max_attempts=2)
            ),
            stageflow.ForEach(per_item, over="topics", item="topic", collect={"note": "notes"}),
        ]
    )
    prints = stage_fingerprints(program)
    assert set(graph_of(program).stage_paths()) < set(prints)
    assert {"stages[0]", "stages[0].stages[1]", "stages[1]"} <= set(prints)  # nested pipelines too
    assert prints["stages[0]"] == stageflow.fingerprint(program.stages[0])  # the Stage, its policy included
    assert prints["stages[0].stages[1].branches['other']"] == stageflow.fingerprint(
        program.stages[0].module.stages[1].branches["other"]
    )
    assert prints["stages[1].stage[*].stages[1]"] == stageflow.fingerprint(per_item.stages[1])
    assert prints["stages[1].stage[*].stages[0]"] != prints["stages[1].stage[*].stages[1]"]


def test_a_changed_model_changes_the_fingerprint(tmp_path: Path) -> None:
    stageflow.run_batch(qa_pipeline(), records(3), lm=upper_lm(), journal=tmp_path / "j")
    with pytest.raises(JournalError, match="the program changed"):
        stageflow.run_batch(
            qa_pipeline(), records(3), lm=upper_lm(model="other/model"), journal=tmp_path / "j"
        )


def test_a_changed_input_is_refused_and_allowed_changes_rerun_only_what_changed(tmp_path: Path) -> None:
    lm = upper_lm()
    journal = tmp_path / "j"
    stageflow.run_batch(qa_pipeline(), records(6), lm=lm, journal=journal)
    new = records(6)
    new[2]["question"] = "edited"
    del new[4]
    new.append({"id": "r99", "question": "q99"})
    with pytest.raises(JournalError, match=r"6 records when planned, 6 now: 1 added, 1 removed, 1 changed"):
        stageflow.run_batch(qa_pipeline(), new, lm=lm, journal=journal)
    lm.calls = 0
    summary = stageflow.run_batch(
        qa_pipeline(), new, lm=lm, journal=journal, allow_changed=True, output=tmp_path / "o"
    )
    assert lm.calls == 2
    assert summary.ran == 2
    assert summary.total == 6
    rows = read_output(tmp_path / "o")
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3", "r5", "r99"]
    assert rows[2]["outputs"]["answer"] == "EDITED"


def test_no_resume_starts_over(tmp_path: Path) -> None:
    lm = upper_lm()
    stageflow.run_batch(qa_pipeline(), records(4), lm=lm, journal=tmp_path / "j")
    summary = stageflow.run_batch(qa_pipeline(), records(4), lm=lm, journal=tmp_path / "j", resume=False)
    assert summary.ran == 4
    assert lm.calls == 8


def test_contracts_are_checked_before_any_lm_call(tmp_path: Path) -> None:
    lm = upper_lm()
    data = [*records(3), {"id": "x", "prompt": "wrong field"}]
    with pytest.raises(ContractError) as info:
        stageflow.run_batch(qa_pipeline(), data, lm=lm, journal=tmp_path / "j")
    assert "record 'x' (item 4; fields ['prompt'])" in info.value.message
    assert info.value.field == "question"
    assert info.value.stage_path == "stages[0]"
    assert lm.calls == 0


def test_records_from_csv_and_outputs_that_json_cannot_encode(tmp_path: Path) -> None:
    class Score(pydantic.BaseModel):
        value: float

    data = tmp_path / "data.csv"
    data.write_text("id,text\na,one two\nb,three\n", encoding="utf-8")
    pipeline = stageflow.SequentialPipeline(
        [
            stageflow.stage(
                lambda text: {"words": set(text.split()), "score": Score(value=1.5)},
                writes=["words", "score"],
            )
        ]
    )
    stageflow.run_batch(pipeline, data, journal=tmp_path / "j", output=tmp_path / "o")
    rows = read_output(tmp_path / "o")
    assert rows[1] == {"id": "b", "status": "ok", "outputs": {"words": ["three"], "score": {"value": 1.5}}}


def test_stage_cache_hits_are_counted(tmp_path: Path) -> None:
    lm = FakeLM({"answer": "same"})
    cached = stageflow.SequentialPipeline([stageflow.Stage(dspy.Predict("question -> answer"), cache=True)])
    data = [{"id": i, "question": "same question"} for i in range(5)]
    summary = stageflow.run_batch(cached, data, lm=lm, concurrency=1)
    assert summary.usage.cache_hits == 4
    assert summary.usage.lm_calls == 1 == lm.calls


def test_records_in_flight_reach_the_concurrency(tmp_path: Path) -> None:
    lm = upper_lm(rendezvous=6)
    stageflow.run_batch(qa_pipeline(), records(12), lm=lm, concurrency=6)
    assert lm.peak_active == 6


def test_the_concurrency_budget_applies_across_records(tmp_path: Path) -> None:
    lm = upper_lm(rendezvous=3, rendezvous_timeout=0.5)
    stageflow.run_batch(qa_pipeline(), records(16), lm=lm, concurrency=8, max_concurrency=3)
    assert lm.peak_active == 3
    lm2 = upper_lm(latency=0.002)
    stageflow.configure(max_concurrency=2)
    try:
        stageflow.run_batch(qa_pipeline(), records(16), lm=lm2, concurrency=8)
    finally:
        stageflow.configure(max_concurrency=None)
    assert lm2.peak_active <= 2


def test_a_journal_in_use_is_refused(tmp_path: Path) -> None:
    with Journal(tmp_path / "j"), pytest.raises(JournalError, match="in use by another batch run"):
        stageflow.run_batch(qa_pipeline(), records(2), lm=upper_lm(), journal=tmp_path / "j")


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="concurrency must be a positive int"):
        stageflow.run_batch(qa_pipeline(), records(1), concurrency=0)
    with pytest.raises(ConfigurationError, match="not a batch backend"):
        stageflow.run_batch(qa_pipeline(), records(1), backend="spark")
    with pytest.raises(JournalError, match="does not exist"):
        stageflow.run_batch(qa_pipeline(), records(1), journal=tmp_path / "missing" / "j")


def test_ctrl_c_stops_cleanly_and_the_same_call_resumes(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    out = tmp_path / "out.jsonl"
    lm = upper_lm(latency=0.02)

    watcher = ctrl_c_when(journal, lambda found: list(found.values()).count("done") >= 4)
    with pytest.raises(BatchInterrupted) as info:
        stageflow.run_batch(qa_pipeline(), records(200), lm=lm, journal=journal, output=out, concurrency=4)
    watcher.join()
    stopped = info.value.summary
    assert stopped.interrupted
    assert 0 < stopped.remaining < 200
    assert stopped.ran == 200 - stopped.remaining  # records in flight finished before the stop
    assert not out.exists()
    statuses = {s for s, _ in journal_rows(journal).values()}
    assert statuses <= {"done", "pending"}
    summary = stageflow.run_batch(
        qa_pipeline(), records(200), lm=lm, journal=journal, output=out, concurrency=4
    )
    assert (summary.ran, summary.repeated, summary.skipped) == (stopped.remaining, 0, 200 - stopped.remaining)
    assert [r["id"] for r in read_output(out)] == [f"r{i}" for i in range(200)]
    assert lm.calls == 200


def test_usage_of_a_plain_dspy_module_and_of_failed_records_is_counted(tmp_path: Path) -> None:
    lm = upper_lm()
    plain = dspy.Predict("question -> answer")  # not a stageflow pipeline: DSPy's tracker counts
    summary = stageflow.run_batch(plain, records(4), lm=lm)
    assert summary.usage.lm_calls == 4
    assert summary.usage.input_tokens > 0
    failing = stageflow.run_batch(qa_pipeline(fail={"q0", "q1"}), records(3), lm=upper_lm())
    assert failing.failed == 2
    assert failing.usage.lm_calls == 3  # the calls made before a record failed count too


class _Terminal:
    """A stand-in for a terminal stream."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_done_failed_and_rate_on_a_terminal_only() -> None:
    from stageflow.runtime.progress import ProgressBar
    from stageflow.runtime.runner import Counters

    term = _Terminal()
    bar = ProgressBar(total=10, initial=4, failed_before=1, enabled=True, stream=term)  # type: ignore[arg-type]
    bar.update(Counters(ran=6, failed=2))
    bar.close()
    assert "10/10" in term.text
    assert "3 failed" in term.text
    assert "rec/s" in term.text
    quiet = _Terminal()
    quiet.isatty = lambda: False  # type: ignore[method-assign]
    ProgressBar(total=10, initial=0, failed_before=0, enabled=True, stream=quiet).close()  # type: ignore[arg-type]
    assert quiet.text == ""


def test_a_bad_output_path_is_refused_before_any_work(tmp_path: Path) -> None:
    lm = upper_lm()
    for bad in (tmp_path, tmp_path / "missing" / "out.jsonl"):
        with pytest.raises(ConfigurationError, match=r"it is a directory|does not exist"):
            stageflow.run_batch(qa_pipeline(), records(2), lm=lm, output=bad)
    assert lm.calls == 0


def test_a_saved_program_directory_is_a_program(tmp_path: Path) -> None:
    program = qa_pipeline()
    program.save(str(tmp_path / "saved"), save_program=True)
    lm = upper_lm()
    summary = stageflow.run_batch(tmp_path / "saved", records(3), lm=lm, output=tmp_path / "o")
    assert summary.succeeded == 3
    assert read_output(tmp_path / "o")[2]["outputs"] == {"answer": "Q2", "checked": True}
    with pytest.raises(ConfigurationError, match="cannot load the saved program"):
        stageflow.run_batch(tmp_path, records(1))


def test_a_stage_raising_keyboard_interrupt_stops_a_local_batch_like_ctrl_c(tmp_path: Path) -> None:
    """It escaped run_batch as a bare KeyboardInterrupt, without the summary Ctrl-C gives."""
    from stageflow.runtime import BatchInterrupted

    raised: list[int] = stageflow.untracked([])  # (a plain list the stage changes: a resume is refused)

    def step(x: int) -> dict[str, int]:
        if x == 3 and not raised:
            raised.append(x)
            raise KeyboardInterrupt
        return {"y": x}

    program = stageflow.SequentialPipeline([stageflow.stage(step, writes=["y"])])
    data = [{"id": str(i), "x": i} for i in range(6)]
    with pytest.raises(BatchInterrupted) as info:
        stageflow.run_batch(program, data, journal=tmp_path / "j", concurrency=1, progress=False)
    assert info.value.summary.remaining == 3  # 0, 1, 2 finished; 3 was running; 4 and 5 never started
    summary = stageflow.run_batch(program, data, journal=tmp_path / "j", concurrency=1, progress=False)
    assert (summary.succeeded, summary.ran) == (6, 3)
