import pytest

from fcdpo.records import (
    CallRecord,
    ChainRecord,
    Message,
    read_jsonl,
    read_parquet,
    read_records,
    write_jsonl,
    write_parquet,
)


def _records():
    base = dict(task="arith", seed=1, prompt_hash="h", model_id="m", toolset="arithmetic", stop_reason="stop")
    answers = [5, 5.5, "5", True, None, -3, "Unknown", 'ünïcödé \n"quoted"']
    out = []
    for i, a in enumerate(answers):
        out.append(
            ChainRecord(
                problem_id=f"p{i % 3}",
                sample_index=i,
                messages=[
                    Message(role="assistant", content="Add(2, 3", failed=True),
                    Message(role="user", content="Error: invalid", failed=True),
                    Message(role="assistant", content=f"Answer({a!r})"),
                ],
                calls=[CallRecord(name="Answer", arguments={"value": a}, output="ok")],
                answer=a,
                answered=a is not None,
                n_steps=1,
                n_failed=1,
                prompt_tokens=100 + i,
                completion_tokens=7,
                verdict="correct" if i % 2 else None,
                meta={"nested": {"k": [1, 2.5, None]}},
                **base,
            )
        )
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_round_trip_is_lossless(tmp_path, fmt):
    recs = _records()
    path = tmp_path / f"chains.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(recs, path)
    back = list(read_records(path))
    assert back == recs
    assert [type(r.answer) for r in back] == [type(r.answer) for r in recs]
    assert [type(r.calls[0].arguments["value"]) for r in back] == [type(r.answer) for r in recs]


def test_parquet_of_no_records_is_readable(tmp_path):
    write_parquet([], tmp_path / "e.parquet")
    assert list(read_parquet(tmp_path / "e.parquet")) == []


def test_torn_last_line_is_dropped(tmp_path):
    recs = _records()
    path = tmp_path / "c.jsonl"
    write_jsonl(recs[:3], path)
    with open(path, "a") as f:
        f.write(recs[3].model_dump_json()[:50])  # a writer killed mid-line
    assert [r.sample_index for r in read_jsonl(path)] == [0, 1, 2]
    assert recs[0].key == ("p0", 0)
