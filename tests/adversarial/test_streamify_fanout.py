"""``dspy.streamify`` over pipelines whose predictors run inside fan-outs (issue 9).

Reproducer: a predictor inside ``ForEach`` under ``dspy.streamify`` failed on stageflow's pool
threads ("Not running inside an AnyIO worker thread") and the failed items were collected as
``None``. Now chunks arrive — sync and async programs, sync and async streams — and each item's
chunks join to exactly its answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest
from dspy.streaming import StreamListener, StreamResponse

import stageflow
from stageflow.testing import FakeLM


def lm() -> FakeLM:
    return FakeLM({"answer": lambda i: f"the answer to {i['question']} takes several chunks"}, stream_chunk=5)


def foreach_program() -> Any:
    predict = dspy.Predict("question -> answer")
    return stageflow.SequentialPipeline(
        [stageflow.ForEach(predict, over="questions", item="question", collect={"answer": "answers"})]
    )


def consume(program: Any, async_program: bool, async_stream: bool, **inputs: Any) -> list[Any]:
    listeners = [StreamListener(signature_field_name="answer", allow_reuse=True)]
    streamer = dspy.streamify(
        program, stream_listeners=listeners, is_async_program=async_program, async_streaming=async_stream
    )
    if not async_stream:
        return list(streamer(**inputs))

    async def collect() -> list[Any]:
        return [x async for x in streamer(**inputs)]

    return asyncio.run(collect())


@pytest.mark.parametrize("async_stream", [False, True], ids=["sync-stream", "async-stream"])
@pytest.mark.parametrize("async_program", [False, True], ids=["sync-program", "async-program"])
def test_foreach_items_stream_their_chunks_whole_and_in_order(
    async_program: bool, async_stream: bool
) -> None:
    questions = ["a", "b", "c"]
    with dspy.context(lm=lm()):
        items = consume(foreach_program(), async_program, async_stream, questions=questions)
    final = items[-1]
    expected = [f"the answer to {q} takes several chunks" for q in questions]
    assert list(final.answers) == expected
    chunks = [x for x in items if isinstance(x, StreamResponse)]
    assert len(chunks) > 3 * 3  # several chunks per item, not one blob
    assert "".join(c.chunk for c in chunks) == "".join(expected)  # whole and in order, item by item


def test_a_parallel_group_streams_each_predictor_under_its_own_name() -> None:
    program = stageflow.ParallelPipeline(
        [[dspy.Predict("question -> answer"), dspy.Predict("question -> summary")]]
    )
    listeners = [
        StreamListener(signature_field_name="answer"),
        StreamListener(signature_field_name="summary"),
    ]
    fake = FakeLM({"answer": "a long answer text", "summary": "a long summary text"}, stream_chunk=4)
    with dspy.context(lm=fake):
        items = list(dspy.streamify(program, stream_listeners=listeners, async_streaming=False)(question="q"))
    by_field: dict[str, str] = {}
    for x in items:
        if isinstance(x, StreamResponse):
            by_field[x.signature_field_name] = by_field.get(x.signature_field_name, "") + x.chunk
    assert by_field == {"answer": "a long answer text", "summary": "a long summary text"}
    assert (items[-1].answer, items[-1].summary) == ("a long answer text", "a long summary text")


def test_without_streaming_foreach_still_runs_items_concurrently() -> None:
    fake = FakeLM({"answer": "x"}, rendezvous=3, rendezvous_timeout=10)
    with dspy.context(lm=fake):
        result = foreach_program()(questions=["a", "b", "c"])
    assert result.answers == ["x", "x", "x"]
    assert fake.peak_active == 3


def test_fake_lm_refuses_a_bad_chunk_size() -> None:
    with pytest.raises(ValueError, match="stream_chunk"):
        FakeLM(stream_chunk=0)
