"""Sharded, resumable sampling. These tests drive the sampler with the oracle policy (a scripted backend
with a per-step delay standing in for engine latency); tests/test_vllm.py runs the same sampler on a real
vLLM engine."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fcdpo.sampling as sampling_mod
from fcdpo.agent import Agent, AgentLimits, Demonstration, PromptSpec
from fcdpo.backends import SamplingParams
from fcdpo.backends.oracle import OracleBackend
from fcdpo.labelling import AutoLabeller
from fcdpo.problems import load_source
from fcdpo.records import read_jsonl
from fcdpo.sampling import recover, sample_shard, sample_shards, shard_spec, split_shards
from fcdpo.simserver import simulated_engine


@pytest.fixture(scope="module")
def problems():
    return load_source("arith", n=12, seed=4)


def test_split_shards_is_deterministic(problems):
    shards = split_shards(problems, 5)
    assert [len(s) for s in shards] == [5, 5, 2]
    assert [p.id for s in shards for p in s] == [p.id for p in problems]
    with pytest.raises(ValueError):
        split_shards(problems, 0)


def test_shard_identity_covers_every_input(problems, monkeypatch):
    be = OracleBackend(list(problems))
    sp = SamplingParams()
    base = shard_spec(Agent(), be, problems, 4, sp, 0).identity
    assert shard_spec(Agent(), be, problems, 4, sp, 0).identity == base
    demo = Demonstration(question="q", steps=[("Stop()", "")])
    variants = [
        shard_spec(Agent(), be, problems.head(11), 4, sp, 0),
        shard_spec(Agent(), OracleBackend(list(problems), model_id="other"), problems, 4, sp, 0),
        shard_spec(Agent(PromptSpec(demonstrations={"arithmetic": [demo]})), be, problems, 4, sp, 0),
        shard_spec(Agent(), be, problems, 5, sp, 0),
        shard_spec(Agent(), be, problems, 4, SamplingParams(temperature=0.9), 0),
        shard_spec(Agent(limits=AgentLimits(max_steps=3)), be, problems, 4, sp, 0),
        shard_spec(Agent(), be, problems, 4, sp, 1),
        shard_spec(Agent(), be, problems, 4, sp, 0, AutoLabeller(require_stop=False)),
    ]
    monkeypatch.setattr(sampling_mod, "code_version", lambda: "0.0.0+other")
    variants.append(shard_spec(Agent(), be, problems, 4, sp, 0))
    ids = [v.identity for v in variants]
    assert base not in ids and len(set(ids)) == len(ids)


def test_changed_inputs_start_a_new_shard_file(problems, tmp_path):
    be = OracleBackend(list(problems))
    a = sample_shard(Agent(), be, problems, 2, SamplingParams(), tmp_path)
    b = sample_shard(Agent(), be, problems, 2, SamplingParams(temperature=0.1), tmp_path)
    assert a.path != b.path and a.sampled == b.sampled == 24
    c = sample_shard(Agent(), be, problems, 2, SamplingParams(), tmp_path)
    assert c.path == a.path and (c.resumed, c.sampled) == (24, 0)
    manifest = json.loads(a.path.with_suffix(".json").read_text())
    assert manifest["identity"] == a.identity and manifest["problems"] == [p.id for p in problems]


def test_recover_cuts_a_torn_tail_and_resumes_exactly(problems, tmp_path):
    be = OracleBackend(list(problems), error_rate=0.3)
    starts: list[int] = []
    full = sample_shard(
        Agent(), be, problems, 3, SamplingParams(), tmp_path / "full", on_start=lambda: starts.append(1)
    )
    assert len(starts) == 36  # on_start: once per chain started
    reference = {r.key: r for r in read_jsonl(full.path)}
    # a writer killed after 10 records, in the middle of the 11th
    lines = full.path.read_text().splitlines(keepends=True)
    part = tmp_path / "part"
    part.mkdir()
    torn = part / full.path.name
    torn.write_text("".join(lines[:10]) + lines[10][:37])
    assert len(recover(torn)) == 10 and torn.read_text() == "".join(lines[:10])
    torn.write_text("".join(lines[:10]) + lines[10][:37])
    starts.clear()
    res = sample_shard(Agent(), be, problems, 3, SamplingParams(), part, on_start=lambda: starts.append(1))
    assert (res.resumed, res.sampled, len(starts)) == (10, 26, 26)
    got = list(read_jsonl(torn))
    assert len(got) == 36 and {r.key: r for r in got} == reference


def test_shards_sampled_in_one_window_match_shards_sampled_one_by_one(problems, tmp_path):
    be = OracleBackend(list(problems), error_rate=0.3)
    shards = split_shards(problems, 5)
    one_by_one = [sample_shard(Agent(), be, s, 3, SamplingParams(), tmp_path / "apart", 7) for s in shards]
    # a window of 4 across 36 chains: the last chains of a shard run beside the first of the next
    together = sample_shards(Agent(), be, shards, 3, SamplingParams(), tmp_path / "together", 7, window=4)
    assert [r.path.name for r in together] == [r.path.name for r in one_by_one]
    assert [(r.total, r.resumed, r.sampled) for r in together] == [(15, 0, 15), (15, 0, 15), (6, 0, 6)]
    for a, b in zip(one_by_one, together, strict=True):
        assert sorted(read_jsonl(b.path), key=lambda r: r.key) == sorted(
            read_jsonl(a.path), key=lambda r: r.key
        )
        assert (b.correct, b.completion_tokens) == (a.correct, a.completion_tokens)
    again = sample_shards(Agent(), be, shards, 3, SamplingParams(), tmp_path / "together", 7)
    assert [(r.resumed, r.sampled) for r in again] == [(15, 0), (15, 0), (6, 0)]
    with pytest.raises(ValueError, match="must not overlap"):
        sample_shards(Agent(), be, [shards[0], problems.head(2)], 1, SamplingParams(), tmp_path / "x")


def test_duplicate_records_are_detected(tmp_path):
    f = tmp_path / "s.jsonl"
    line = json.dumps({"problem_id": "a", "sample_index": 0}) + "\n"
    f.write_text(line + line)
    with pytest.raises(RuntimeError, match="duplicate record"):
        recover(f)


def _lines(out):
    return sum(f.read_bytes().count(b"\n") for f in out.glob("*.jsonl")) if out.exists() else 0


def _cmd(out):
    return [
        sys.executable, "-m", "fcdpo.cli.sample", "--problems", "arith", "--n-problems", "10", "--samples", "6",
        "--out", str(out), "--backend", "oracle", "--backend-option", "delay_s=0.08",
        "--backend-option", "error_rate=0.3", "--shard-size", "4", "--no-progress", "--demos", "1",
    ]  # fmt: skip


def test_sigkill_at_several_points_then_resume_gives_every_key_once(tmp_path):
    ref = subprocess.run(_cmd(tmp_path / "ref"), capture_output=True, text=True, check=True, timeout=300)
    reference = {}
    for f in sorted((tmp_path / "ref").glob("*.jsonl")):
        for r in read_jsonl(f):
            reference[r.key] = r
    assert len(reference) == 60 and json.loads(ref.stdout.splitlines()[-1])["sampled"] == 60

    out = tmp_path / "killed"
    seen = []
    for threshold in (
        3,
        15,
        28,
        41,
        52,
    ):  # kill once this many records are on disk (mid-shard and between shards)
        p = subprocess.Popen(
            _cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline:
            if _lines(out) >= threshold:
                os.killpg(p.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        p.wait()
        assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        seen.append(sum(len(recover(f)) for f in out.glob("*.jsonl")))
    assert seen == sorted(seen) and seen[0] >= 3 and seen[-1] < 60
    partial = seen[-1]
    done = subprocess.run(_cmd(out), capture_output=True, text=True, check=True, timeout=300)
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["resumed"] == partial and summary["resumed"] + summary["sampled"] == 60
    got = [r for f in sorted(out.glob("*.jsonl")) for r in read_jsonl(f)]
    keys = [r.key for r in got]
    assert len(keys) == len(set(keys)) == 60
    assert {r.key: r for r in got} == reference  # same seeds: the same chains, however often it was killed
    assert sorted(p.name for p in out.glob("*.jsonl")) == sorted(
        p.name for p in (tmp_path / "ref").glob("*.jsonl")
    )
    assert all(Path(f).read_text().endswith("\n") for f in out.glob("*.jsonl"))


@pytest.fixture(scope="module")
def simulated():
    """The simulated engine (fcdpo.simserver) in a process of its own on a free port; 20% of requests fail
    (a 503, a reply slower than the client's timeout, a connection closed without an answer, in turn)."""
    with simulated_engine(
        "arith:n=6,seed=3+fol:n=6,seed=3,difficulty=easy",
        "--max-batch", "16", "--step-s", "0.002", "--per-seq-s", "0.0001", "--fail-rate", "0.2", "--hang-s", "3",
    ) as sim:  # fmt: skip
        yield sim["url"]
    assert all(n > 0 for n in sim["stats"]["faults"].values()), sim["stats"]  # every kind of fault was served


def test_faults_at_20_percent_still_give_every_chain_once_and_the_same_chains(simulated, tmp_path):
    """Through real HTTP with 5xx, timeouts and dropped connections: the run completes, every (problem,
    sample) is written once, and the chains are the ones the same seeds give without any fault."""
    from fcdpo.backends.openai_backend import OpenAIBackend
    from fcdpo.problems import ProblemSet

    problems = ProblemSet.concat(
        "sim", [load_source("arith", n=6, seed=3), load_source("fol", n=6, seed=3, difficulty="easy")]
    )
    be = OpenAIBackend(
        "simulated", simulated, concurrency=16, timeout_s=1.0, backoff_s=0.01, max_backoff_s=0.05
    )
    agent = Agent(limits=AgentLimits(max_steps=12), model_id="simulated")
    res = sample_shard(agent, be, problems, 5, SamplingParams(), tmp_path)
    recs = list(read_jsonl(res.path))
    keys = sorted((r.problem_id, r.sample_index) for r in recs)
    assert keys == sorted((p.id, i) for p in problems for i in range(5)) and res.sampled == 60
    assert be.retries > 0 and all(r.stop_reason != "aborted" for r in recs)
    # the same seeds without faults: the oracle policy in-process
    from fcdpo.rollout import run_chains

    oracle = OracleBackend(list(problems), error_rate=0.3, model_id="simulated")
    clean = run_chains(agent, oracle, list(problems), 5)
    by_key = {(r.problem_id, r.sample_index): r for r in recs}
    assert all(by_key[(c.problem_id, c.sample_index)].messages == c.messages for c in clean)
    assert {r.verdict for r in recs} >= {"correct", "wrong_answer"}
