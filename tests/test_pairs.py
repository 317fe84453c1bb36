import json

import pyarrow.parquet as pq
import pytest

from fcdpo.agent import Demonstration, PromptSpec
from fcdpo.pairs import PAIR_STRATEGIES, PairBuilder, PairsConfig, build_pairs
from fcdpo.problems import Problem
from fcdpo.records import ChainRecord, Message

P1 = Problem(id="p1", task="arith", question="What is 2+3?", answer="5", toolset="arithmetic")
P2 = Problem(id="p2", task="fol", question="Is it?", answer="True", toolset="fol")
P3 = Problem(id="p3", task="arith", question="What is 1+1?", answer="2", toolset="arithmetic")
PROBLEMS = {p.id: p for p in (P1, P2, P3)}


def chain(p, i, answer, stop="stop", failed_first=False, steps=None):
    msgs = []
    if failed_first:
        msgs += [
            Message(role="assistant", content="Add(2,", failed=True),
            Message(role="user", content="Error: x", failed=True),
        ]
    for k in range(steps if steps is not None else i):
        msgs += [
            Message(role="assistant", content=f'Reasoning("step {k} of {i}")'),
            Message(role="user", content="ok"),
        ]
    msgs += [
        Message(role="assistant", content=f"Answer({answer!r})"),
        Message(role="user", content="ok"),
        Message(role="assistant", content="Stop()"),
    ]
    return ChainRecord(
        problem_id=p.id, task=p.task, sample_index=i, seed=i, prompt_hash="h", model_id="m", toolset=p.toolset,
        messages=msgs, answer=answer, answered=True, stop_reason=stop, n_steps=len(msgs) // 2, n_failed=int(failed_first),
    )  # fmt: skip


def population():
    recs = [chain(P1, i, 5 if i < 3 else 6) for i in range(7)]  # 3 correct x 4 wrong
    recs += [chain(P2, i, "True" if i < 2 else "False") for i in range(4)]  # 2 x 2
    recs += [chain(P3, i, 2) for i in range(3)]  # no contrast
    return recs


def rows(cfg, recs=None, student=None):
    return list(PairBuilder(PROBLEMS, student, cfg).add_all(recs or population()).rows())


def test_every_correct_times_every_incorrect():
    out = rows(PairsConfig(max_pairs_per_prompt=None))
    per = {pid: sum(r["problem_id"] == pid for r in out) for pid in PROBLEMS}
    assert per == {"p1": 12, "p2": 4, "p3": 0}
    p1 = {(r["chosen_sample"], r["rejected_sample"]) for r in out if r["problem_id"] == "p1"}
    assert p1 == {(w, lose) for w in range(3) for lose in range(3, 7)}
    assert all(r["chosen_verdict"] == "correct" and r["rejected_verdict"] == "wrong_answer" for r in out)


def test_cap_is_a_seeded_uniform_sample_of_distinct_pairs():
    a = rows(PairsConfig(max_pairs_per_prompt=5, seed=1))
    b = rows(PairsConfig(max_pairs_per_prompt=5, seed=1))
    c = rows(PairsConfig(max_pairs_per_prompt=5, seed=2))
    key = lambda rs: [(r["problem_id"], r["chosen_sample"], r["rejected_sample"]) for r in rs]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)
    assert sum(r["problem_id"] == "p1" for r in a) == 5 and sum(r["problem_id"] == "p2" for r in a) == 4
    assert len(set(key(a))) == len(a)
    # uniform: over many seeds every one of the 12 pairs of p1 gets picked about 5/12 of the time
    counts = {}
    for seed in range(600):
        for k in key(
            rows(
                PairsConfig(max_pairs_per_prompt=5, seed=seed),
                [r for r in population() if r.problem_id == "p1"],
            )
        ):
            counts[k] = counts.get(k, 0) + 1
    assert len(counts) == 12 and all(200 < v < 300 for v in counts.values())


def test_dedup_collapses_identical_completions():
    recs = [chain(P1, i, 5, steps=0) for i in range(4)] + [chain(P1, 10 + i, 7, steps=0) for i in range(3)]
    assert len(rows(PairsConfig(max_pairs_per_prompt=None, dedup=True), recs)) == 1
    assert len(rows(PairsConfig(max_pairs_per_prompt=None, dedup=False), recs)) == 12


def test_best_vs_worst_picks_cleanest_correct_and_worst_incorrect():
    recs = [chain(P1, 0, 5, steps=2), chain(P1, 1, 5, steps=0), chain(P1, 2, 5, steps=0, failed_first=True)]
    recs += [chain(P1, 3, 6), chain(P1, 4, None, stop="try_limit"), chain(P1, 5, None, stop="stop")]
    recs[4] = recs[4].model_copy(update={"answered": False, "answer": None})
    recs[5] = recs[5].model_copy(update={"answered": False, "answer": None})
    [r] = rows(PairsConfig(strategy="best_vs_worst", dedup=False), recs)
    assert (r["chosen_sample"], r["rejected_sample"], r["rejected_verdict"]) == (1, 4, "format_error")
    assert set(PAIR_STRATEGIES.names()) >= {"all", "best_vs_worst"}


def test_failed_tries_are_stripped_from_completions_by_default():
    recs = [chain(P1, 0, 5, failed_first=True), chain(P1, 1, 6)]
    [r] = rows(PairsConfig(), recs)
    assert "Add(2," not in r["chosen"] and r["chosen"].startswith(" Answer(5)")
    [r] = rows(PairsConfig(strip_failed_tries=False), recs)
    assert r["chosen"].startswith(" Add(2,\nError: x\n>>> Answer(5)")


def test_rejected_completions_can_keep_their_failed_tries():
    # a weak student's incorrect chain: a failed try, then a wrong answer; the correct chain also failed once
    recs = [chain(P1, 0, 5, failed_first=True), chain(P1, 1, 6, failed_first=True)]
    [r] = rows(PairsConfig(rejected_keeps_failed_tries=True), recs)
    assert r["chosen"].startswith(" Answer(5)")  # chosen: stripped as before
    assert r["rejected"].startswith(" Add(2,\nError: x\n>>> Reasoning(")  # rejected: as the model wrote it
    [r] = rows(PairsConfig(), recs)
    assert r["rejected"].startswith(" Reasoning(")


def test_aborted_chains_are_never_paired():
    recs = [chain(P1, 0, 5), chain(P1, 1, 6, stop="aborted")]
    assert rows(PairsConfig(), recs) == []


def test_prompt_is_the_students_without_teacher_demonstrations():
    demo = Demonstration(question="DEMO QUESTION", steps=[("Stop()", "")])
    student = PromptSpec(demonstrations={"arithmetic": [demo]})
    out = rows(PairsConfig(), student=student)
    assert all("DEMO QUESTION" not in r["prompt"] for r in out)
    r = next(r for r in out if r["problem_id"] == "p1")
    assert r["prompt"].endswith("Problem: What is 2+3?\n>>>")
    assert (
        r["chosen"].endswith(">>> Stop()\n") and "Answer(5)" in r["chosen"] and "Answer(6)" in r["rejected"]
    )


def test_chat_format_gives_conversational_pairs():
    out = rows(PairsConfig(), student=PromptSpec(format="chat"))
    r = out[0]
    assert r["prompt"][-1]["role"] == "user" and r["prompt"][-1]["content"].endswith(
        "Problem: " + PROBLEMS[r["problem_id"]].question
    )
    assert r["chosen"][-1] == {"role": "assistant", "content": "Stop()"}
    assert {m["role"] for m in r["chosen"]} == {"assistant", "user"}


@pytest.mark.parametrize("fmt", ["transcript", "chat"])
def test_written_as_parquet_dataset_and_counts(tmp_path, fmt):
    res = build_pairs(
        population(),
        PROBLEMS,
        tmp_path / "pairs",
        PromptSpec(format=fmt),
        PairsConfig(max_pairs_per_prompt=3),
    )
    assert res.n_pairs == 6 and res.n_prompts == 2
    table = pq.read_table(res.parquet)
    assert table.num_rows == 6 and {"prompt", "chosen", "rejected"} <= set(table.column_names)
    ds = res.load_dataset()
    assert len(ds) == 6
    import datasets

    saved = datasets.load_from_disk(str(tmp_path / "pairs" / "dataset"))
    assert saved[0] == ds[0]
    counts = [json.loads(x) for x in (tmp_path / "pairs" / "counts.jsonl").read_text().splitlines()]
    assert [
        (c["problem_id"], c["n_correct"], c["n_incorrect"], c["n_possible"], c["n_pairs"]) for c in counts
    ] == [
        ("p1", 3, 4, 12, 3),
        ("p2", 2, 2, 4, 3),
    ]
    keep = build_pairs(
        population(),
        PROBLEMS,
        tmp_path / "p2",
        config=PairsConfig(drop_no_contrast=False),
        save_dataset=False,
    )
    assert [c["problem_id"] for c in keep.counts] == ["p1", "p2", "p3"] and keep.counts[2]["n_pairs"] == 0


def test_failure_leaves_no_half_written_output(tmp_path):
    stray = chain(Problem(id="nope", task="arith", question="?", answer="1", toolset="arithmetic"), 0, 1)
    with pytest.raises(KeyError, match="unknown problem 'nope'"):
        build_pairs([*population(), stray], PROBLEMS, tmp_path / "pairs")
    assert list(tmp_path.iterdir()) == []

    def exploding():
        yield from population()[:3]
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError):
        build_pairs(exploding(), PROBLEMS, tmp_path / "pairs")
    assert list(tmp_path.iterdir()) == []


def test_streaming_never_holds_pairs():
    """The builder keeps one candidate per distinct chain; pairs are produced lazily."""
    recs = [chain(P1, i, 5 if i % 2 else 6, steps=0) for i in range(2000)]
    b = PairBuilder(PROBLEMS, None, PairsConfig(max_pairs_per_prompt=None, dedup=False)).add_all(recs)
    g = b.groups["p1"]
    assert len(g.correct) + len(g.incorrect) == 2000
    it = b.rows()
    first = [next(it) for _ in range(10)]
    assert len(first) == 10  # 1,000,000 pairs possible; only what is consumed exists
