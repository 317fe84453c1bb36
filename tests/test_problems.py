import json
import subprocess
import sys
from collections import Counter

import pytest

from fcdpo.agent import Agent, AgentLimits
from fcdpo.backends.oracle import OracleBackend
from fcdpo.fol import entails, parse_formula
from fcdpo.labelling import AutoLabeller
from fcdpo.problems import Problem, ProblemFileError, ProblemSet, load_source, split_of
from fcdpo.problems.fol_gen import GENERIC, Lit, Rule, Theory, reason
from fcdpo.rollout import run_chains


@pytest.fixture(scope="module")
def fol200():
    return load_source("fol", n=200, seed=1)


def test_fol_answers_are_z3_verified_and_balanced(fol200):
    assert len(fol200) == 200
    for p in fol200:
        got, consistent = entails(
            [parse_formula(x) for x in p.meta["premises"]], parse_formula(p.meta["query"])
        )
        assert consistent and got.value == p.answer, p.id
        assert p.meta["verified"] == "z3" and p.toolset == "fol" and p.task == "fol"
    answers = Counter(p.answer for p in fol200)
    assert set(answers) == {"True", "False", "Unknown"} and min(answers.values()) >= 40
    assert {p.meta["difficulty"] for p in fol200} == {"easy", "medium", "hard"}
    assert {p.meta["depth"] for p in fol200} == {1, 2, 3, 4, 5}
    # features beyond plain facts and rules show up
    text = " ".join(p.question for p in fol200)
    assert "Someone is" in text and " not " in text and " and " in text
    assert any(q.startswith("exists") for q in (p.meta["query"] for p in fol200))


def test_fol_generator_is_seeded_and_nested(fol200):
    again = load_source("fol", n=200, seed=1)
    assert again.digest == fol200.digest
    assert load_source("fol", n=20, seed=1).problems == fol200.problems[:20]
    assert load_source("fol", n=20, seed=2).digest != fol200.head(20).digest
    easy = load_source("fol", n=10, seed=1, difficulty="easy")
    assert all(p.meta["depth"] in (1, 2) for p in easy)
    hard = load_source("fol", n=10, seed=1, difficulty="hard")
    assert all(p.meta["depth"] in (4, 5) for p in hard)
    with pytest.raises(ValueError, match="unknown difficulty"):
        load_source("fol", n=1, difficulty="extreme")


def test_reasoner_handles_contraposition_existentials_and_universals():
    th = Theory(
        facts=[("bob", Lit("b", False))],
        rules=[Rule((Lit("a"),), Lit("b")), Rule((), Lit("c", False))],
        existentials=[(Lit("d"),)],
    )
    known = reason(th, ["bob"])
    assert known[("bob", "a")] == (False, 1)  # not b, a -> b  =>  not a
    assert known[(GENERIC, "c")] == (False, 1)
    assert known[("_some0", "d")] == (True, 0)


@pytest.mark.parametrize(("source", "n"), [("fol", 12), ("arith", 40)])
def test_gold_solutions_execute_to_correct_chains(source, n):
    ps = load_source(source, n=n, seed=5)
    records = run_chains(Agent(limits=AgentLimits(max_steps=64)), OracleBackend(list(ps)), list(ps))
    label = AutoLabeller()
    assert all(label(r, p).correct for r, p in zip(records, ps, strict=True))


def test_arith_problems_are_varied_and_exact():
    ps = load_source("arith", n=300, seed=0)
    assert {p.meta["steps"] for p in ps} == {1, 2, 3, 4}
    assert all(p.answer.lstrip("-").isdigit() for p in ps)
    assert len({p.question.split(".")[0].split()[-1] for p in ps}) >= 8  # many different things
    assert len({p.question for p in ps}) == 300
    assert any("$" in p.question for p in ps)
    assert load_source("arith", n=300, seed=0).digest == ps.digest
    assert all(p.meta["steps"] == 2 for p in load_source("arith", n=20, seed=0, steps=2))


def _gsm8k_file(tmp_path, rows):
    f = tmp_path / "gsm8k.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


GSM_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "Pay $1,200 for 4 months. Per month?", "answer": "<<1200/4=300>>300 dollars\n#### $1,200.0"},
    {"question": "Half of 5?", "answer": "5/2 = <<5/2=2.5>>2.5\n#### 2.50"},
    {"question": "Complex one", "answer": "<<(2+3)*4=20>>20\n#### 20"},
]


def test_gsm8k_local_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = _gsm8k_file(tmp_path, GSM_ROWS)
    ps = load_source("gsm8k", path=str(f))
    assert [p.answer for p in ps] == ["7", "1200", "2.5", "20"]
    assert [p.id for p in ps] == [f"gsm8k-train-0000{i}" for i in range(4)]
    assert ps[0].meta["solution"] == [
        'Reasoning(reasoning="I compute the quantities step by step.")',
        "Add(a=3, b=4)",
        "Answer(value=7)",
        "Stop()",
    ]
    assert "solution" not in ps[3].meta  # (2+3)*4 is not one binary operation
    assert all(p.toolset == "arithmetic" and p.task == "gsm8k" for p in ps)
    pq.write_table(pa.Table.from_pylist(GSM_ROWS), tmp_path / "g.parquet")
    assert load_source("gsm8k", path=str(tmp_path / "g.parquet")).digest == ps.digest
    assert len(load_source("gsm8k", path=str(f), n=2)) == 2


def test_gsm8k_bad_rows_name_the_line_and_field(tmp_path):
    f = _gsm8k_file(tmp_path, [*GSM_ROWS[:2], {"question": "x", "answer": "no marker"}])
    with pytest.raises(
        ProblemFileError, match=r"gsm8k.jsonl:3: field 'answer': does not end in '#### <number>'"
    ):
        load_source("gsm8k", path=str(f))
    f = _gsm8k_file(tmp_path, [{"answer": "#### 3"}])
    with pytest.raises(ProblemFileError, match=r":1: field 'question'"):
        load_source("gsm8k", path=str(f))


def test_gsm8k_from_the_hub_fails_clearly_when_offline():
    with pytest.raises(RuntimeError, match=r"pass path=\.\.\. to a local JSONL"):
        load_source("gsm8k")


def _jsonl(tmp_path, lines):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_user_jsonl_problems(tmp_path):
    f = _jsonl(
        tmp_path,
        [
            json.dumps({"id": "a", "question": "2+2?", "answer": 4, "toolset": "arithmetic"}),
            "",
            json.dumps(
                {
                    "id": "b",
                    "question": "Is it?",
                    "answer": True,
                    "toolset": "fol",
                    "task": "logic",
                    "meta": {"k": 1},
                }
            ),
        ],
    )
    ps = load_source("jsonl", path=str(f))
    assert [(p.id, p.answer, p.task, p.toolset) for p in ps] == [
        ("a", "4", "arithmetic", "arithmetic"),
        ("b", "True", "logic", "fol"),
    ]
    assert ps[1].meta == {"k": 1} and ps[0].source == "jsonl:mine.jsonl"


@pytest.mark.parametrize(
    ("bad", "line", "field"),
    [
        ('{"id": "c", "question": "q", "toolset": "arithmetic"}', 3, "answer"),
        ('{"id": "c", "question": "q", "answer": 1, "toolset": "chemistry"}', 3, "toolset"),
        ('{"id": "c", "question": "", "answer": 1, "toolset": "fol"}', 3, "question"),
        ('{"id": "a", "question": "q", "answer": 1, "toolset": "arithmetic"}', 3, "id"),
        ('{"id": "c", "question": "q", "answer": 1, "toolset": "fol", "anser": 2}', 3, "anser"),
        ('{"id": "c", "question": "q", "answer": [1], "toolset": "fol"}', 3, "answer"),
        ('{"id": "c", "question": "q"', 3, None),
        ("[1, 2]", 3, None),
    ],
)
def test_bad_jsonl_line_names_file_line_field_and_nothing_is_returned(tmp_path, bad, line, field):
    good = [
        json.dumps({"id": "a", "question": "q", "answer": 1, "toolset": "arithmetic"}),
        json.dumps({"id": "b", "question": "q", "answer": 1, "toolset": "arithmetic"}),
    ]
    f = _jsonl(tmp_path, [*good, bad, good[1].replace('"b"', '"z"')])
    with pytest.raises(ProblemFileError) as e:
        load_source("jsonl", path=str(f))
    assert e.value.path == str(f) and e.value.line == line and e.value.field == field
    assert str(e.value).startswith(f"{f}:{line}: ")


def test_splits_are_deterministic_disjoint_and_by_id(fol200):
    s1 = fol200.with_splits({"train": 0.8, "test": 0.2})
    s2 = fol200.with_splits({"train": 0.8, "test": 0.2})
    assert [p.split for p in s1] == [p.split for p in s2]
    train, test = {p.id for p in s1.split("train")}, {p.id for p in s1.split("test")}
    assert not train & test and len(train | test) == 200 and 20 <= len(test) <= 60
    # a problem's split depends on its id only, not on the other problems
    sub = fol200.head(50).with_splits({"train": 0.8, "test": 0.2})
    assert all(p.split == q.split for p, q in zip(sub, s1, strict=False))
    assert split_of("x", {"a": 1.0}) == "a"
    assert [p.split for p in fol200.with_splits({"train": 0.8, "test": 0.2}, salt="s")] != [
        p.split for p in s1
    ]


def test_digest_tracks_content():
    p = Problem(id="a", task="t", question="q", answer="1", toolset="arithmetic")
    s = ProblemSet("x", (p,))
    assert ProblemSet("y", (p,)).digest == s.digest  # the name is not content
    assert ProblemSet("x", (p.model_copy(update={"answer": "2"}),)).digest != s.digest
    with pytest.raises(ValueError, match="duplicate problem id"):
        ProblemSet("x", (p, p))


def test_cli_prints_200_verified_fol_problems():
    """`fcdpo problems` (the fcdpo command hands it to fcdpo/cli/problems.py)."""
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "problems", "--source", "fol", "--n", "200", "--seed", "1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(rows) == 200 and all(r["meta"]["verified"] == "z3" for r in rows)
    summary = json.loads(out.stderr.strip().splitlines()[-1])
    assert summary["problems"] == 200 and summary["z3_verified"] == 200
    assert summary["digest"] == load_source("fol", n=200, seed=1).digest


def test_cli_loads_a_local_gsm8k_file_and_reports_errors(tmp_path):
    f = _gsm8k_file(tmp_path, GSM_ROWS)
    out = subprocess.run(
        [sys.executable, "-m", "fcdpo.cli.problems", "--source", "gsm8k", "--path", str(f), "--format", "text"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "[gsm8k-train-00001] (gsm8k)" in out.stdout and "Answer: 1200" in out.stdout
    bad = _gsm8k_file(tmp_path, [{"question": "q", "answer": "x"}])
    out = subprocess.run(
        [sys.executable, "-m", "fcdpo.cli.problems", "--source", "gsm8k", "--path", str(bad)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and ":1: field 'answer'" in out.stderr and out.stdout == ""


HOSTILE = {
    "binary garbage": (b"\x89PNG\r\n\x1a\x00\xff\xfe garbage", None, "not UTF-8 text (byte 0x89 at column 1)"),
    "5000-digit answer": (
        b'{"id": "c", "question": "q", "answer": ' + b"9" * 5000 + b', "toolset": "arithmetic"}',
        None, "a number with 5000 digits",
    ),
    "nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
    "lone surrogate": (
        b'{"id": "c", "question": "q \\ud800", "answer": 1, "toolset": "arithmetic"}', None, "lone surrogate"
    ),
    "fol answer 42": (b'{"id": "c", "question": "q", "answer": "42", "toolset": "fol"}', "answer", "True, False or Unknown"),
    "fol answer maybe": (b'{"id": "c", "question": "q", "answer": "maybe", "toolset": "fol"}', "answer", "True, False or Unknown"),
    "NaN answer": (b'{"id": "c", "question": "q", "answer": NaN, "toolset": "arithmetic"}', None, "NaN is not a number"),
    "Infinity answer": (b'{"id": "c", "question": "q", "answer": -Infinity, "toolset": "arithmetic"}', None, "-Infinity is not"),
    "inf string answer": (b'{"id": "c", "question": "q", "answer": "inf", "toolset": "arithmetic"}', "answer", "finite number"),
    "NUL in id": (b'{"id": "c\\u0000", "question": "q", "answer": 1, "toolset": "arithmetic"}', "id", "control characters (found U+0000)"),
    "control char in id": (b'{"id": "c\\u001b[31m", "question": "q", "answer": 1, "toolset": "arithmetic"}', "id", "U+001B"),
    "id equal after trimming": (b'{"id": "a ", "question": "q", "answer": 1, "toolset": "arithmetic"}', "id", "whitespace"),
    "duplicate keys": (b'{"id": "c", "id": "d", "question": "q", "answer": 1, "toolset": "arithmetic"}', None, "'id' appears twice"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_problem_files_fail_with_file_line_field_and_print_nothing(tmp_path, kind):
    bad, field, message = HOSTILE[kind]
    good = json.dumps({"id": "a", "question": "q", "answer": 1, "toolset": "arithmetic"}).encode()
    f = tmp_path / "hostile.jsonl"
    f.write_bytes(good + b"\n\n" + bad + b"\n" + good.replace(b'"a"', b'"z"') + b"\n")
    with pytest.raises(ProblemFileError) as e:
        load_source("jsonl", path=str(f))
    assert e.value.line == 3 and e.value.field == field and message in str(e.value)
    assert str(e.value).startswith(f"{f}:3: ")
    from fcdpo.cli.problems import main

    out = subprocess.run(
        [sys.executable, "-m", "fcdpo.cli.problems", "--source", "jsonl", "--path", str(f)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert main is not None and out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"error: {f}:3: ") and "Traceback" not in out.stderr
