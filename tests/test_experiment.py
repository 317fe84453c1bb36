"""Experiments (fcdpo/experiment.py, flows/experiment.py) and training rounds.

Bad experiment files fail before anything runs, naming the arm and key; the SFT baseline and a second
round train for real (TRL on the tiny model); arms share their common stages through the cache.
"""

import json
from pathlib import Path

import pytest
import yaml
from conftest import oracle_pairs, tiny_run_config

from fcdpo.config import ConfigError


def _write(tmp_path: Path, base: dict, experiment: dict) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **experiment}, sort_keys=False))
    return path


def _base(tmp_path, tiny_model, **over) -> dict:
    return tiny_run_config(tmp_path, tiny_model, **over).model_dump(mode="json")


def test_an_experiment_resolves_each_arm_over_the_base_config(tmp_path, tiny_model):
    from fcdpo.experiment import load_experiment

    path = _write(tmp_path, _base(tmp_path, tiny_model), {
        "name": "exp", "out_dir": str(tmp_path / "runs"), "baseline": "all",
        "set": {"teacher.sampling.samples_per_problem": 3},
        "arms": [
            {"name": "all", "set": {"pairs.max_pairs_per_prompt": None}},
            {"name": "bvw", "set": {"pairs.strategy": "best_vs_worst"}},
            {"name": "sft", "set": {"student.training.objective": "sft"}},
        ],
    })  # fmt: skip
    exp = load_experiment(path)
    assert list(exp.arms) == ["all", "bvw", "sft"]
    all_, bvw, sft = exp.arms.values()
    assert all_.pairs.max_pairs_per_prompt is None and bvw.pairs.max_pairs_per_prompt == 2
    assert bvw.pairs.strategy == "best_vs_worst" and sft.student.training.objective == "sft"
    assert {c.teacher.sampling.samples_per_problem for c in exp.arms.values()} == {3}
    assert {c.shared_dir for c in exp.arms.values()} == {str(tmp_path / "runs" / "exp" / "shared")}
    assert [c.name for c in exp.arms.values()] == ["all", "bvw", "sft"]


@pytest.mark.parametrize(
    ("arms", "baseline", "says"),
    [
        (
            [{"name": "a", "set": {}}, {"name": "b", "set": {"pairs.max_pair_per_prompt": 1}}],
            "a",
            "arms[1] (b): set.pairs.max_pair_per_prompt: unknown key",
        ),
        (
            [{"name": "a", "set": {}}, {"name": "b", "set": {"pairs.strategy": "nope"}}],
            "a",
            "arms[1] (b): set.pairs.strategy: unknown pair strategy 'nope'",
        ),
        (
            [{"name": "a", "set": {"pairs.strategy": "all"}}, {"name": "b", "set": {}}],
            "a",
            "arms[1] (b): resolves to the same run config as arm 'a'",
        ),
        (
            [{"name": "a", "set": {}}, {"name": "b", "set": {"pairs.seed": 1}}],
            "c",
            "baseline: 'c' is not an arm",
        ),
        ([{"name": "a", "set": {}}, {"name": "a", "set": {"pairs.seed": 1}}], "a", "two arms are named 'a'"),
    ],
)
def test_bad_arm_definitions_fail_before_anything_runs_naming_arm_and_key(
    tmp_path, tiny_model, arms, baseline, says
):
    from fcdpo.experiment import load_experiment

    out = tmp_path / "runs"
    path = _write(
        tmp_path,
        _base(tmp_path, tiny_model),
        {"name": "e", "out_dir": str(out), "baseline": baseline, "arms": arms},
    )
    with pytest.raises(ConfigError) as e:
        load_experiment(path)
    assert says in str(e.value)
    assert str(e.value).startswith(f"{path}:")  # the experiment file and its line
    assert not out.exists()


def test_sft_baseline_trains_on_correct_chains_only_with_tool_results_masked(tmp_path, tiny_model):
    import pyarrow.parquet as pq

    from fcdpo.training import TrainingConfig, load_tokenizer, tokenize_correct, train_dpo

    pairs, _ = oracle_pairs(tmp_path / "pairs")
    rows = pq.read_table(str(pairs.correct_parquet)).to_pylist()
    assert rows and pairs.n_correct == len(rows)
    assert all('"Stop()"' in r["messages"] for r in rows)  # correct chains end with Stop()
    # every correct chain, also from prompts without an incorrect one (no contrast: no pair)
    assert len({r["problem_id"] for r in rows}) >= len(
        {c["problem_id"] for c in pairs.counts if c["n_correct"]}
    )

    from fcdpo.agent import PromptSpec

    tok = load_tokenizer(tiny_model)
    data = tokenize_correct(tok, rows[:3], PromptSpec())
    for ids, labels in zip(data["input_ids"], data["labels"], strict=True):
        scored = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
        assert 0 < len(scored) < len(ids)
        text = tok.decode(scored)
        assert "Stop()" in text and "Problem:" not in text  # the model's calls, not the prompt
        assert ">>>" not in text  # the call prefix (the environment's, after every result) is masked

    cfg = TrainingConfig(objective="sft", max_steps=2, batch_size=2, save_steps=1)
    res = train_dpo(pairs.parquet, tiny_model, tmp_path / "sft", cfg, model_hash="tiny")
    assert res.steps == 2 and res.manifest["objective"] == "sft"
    assert res.manifest["pairs"].endswith("correct.parquet")
    # max_steps 2 x batch 2 reach 4 examples: only those are tokenised and trained on
    assert res.manifest["n_pairs"] == 4 and res.manifest["n_available"] == len(rows)
    assert (res.adapter_dir / "adapter_model.safetensors").is_file()
    assert [h["step"] for h in res.history] == [1, 2] and all(h["loss"] > 0 for h in res.history)


@pytest.mark.parametrize("reference", ["original", "previous"])
def test_a_second_round_samples_on_policy_and_continues_from_the_first_adapter(
    harness, tmp_path, tiny_model, reference
):
    from safetensors.torch import load_file

    from flows.pipeline import pipeline

    cfg = tiny_run_config(
        tmp_path, tiny_model, **{"student.rounds": 2, "student.round.reference": reference,
                                 "student.backend_options": {"error_rate": 0.4}},
    )  # fmt: skip
    state = pipeline(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    assert state.is_completed(), state
    s = state.result()
    assert [r.round for r in s.rounds] == [1, 2]
    one, two = s.rounds
    assert one.sampled_by.startswith(str(tiny_model.name)) is False and "oracle" in one.sampled_by
    assert "merged-" in two.sampled_by  # round 2's chains come from round 1's student, merged
    assert two.chains > 0 and two.pairs > 0 and two.steps == 2
    assert set(s.after) == set(two.accuracy) | {"all"} or s.after["all"].accuracy == two.accuracy["all"]

    out = Path(cfg.out_dir) / cfg.name
    m1 = _manifest(out / "training")
    m2 = _manifest(out / "round-2" / "training")
    if reference == "original":  # continue round 1's adapter on the original model (the reference)
        assert m2["init_adapter"] == str(out / "training" / "adapter")
        assert m2["base_model_path"] == m1["base_model_path"] == str(tiny_model)
    else:  # a fresh adapter on round 1's merged student (the reference)
        assert m2["init_adapter"] is None
        assert "merged-" in m2["base_model_path"] and m2["base_model_path"] != m1["base_model_path"]
    w1 = load_file(str(out / "training" / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(out / "round-2" / "training" / "adapter" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys() and any(not w1[k].equal(w2[k]) for k in w1)
    assert "| round | sampled by |" in s.table


def _manifest(training: Path) -> dict:
    import json

    return json.loads((training / "adapter" / "fcdpo_manifest.json").read_text())


def _all_task_runs_since(t0):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    async def read():
        async with get_client() as c:
            return await c.read_task_runs(
                task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=t0)), limit=200
            )

    return asyncio.run(read())


def test_an_experiment_shares_stages_reports_and_trains_only_an_added_arm(harness, tmp_path, tiny_model):
    import datetime as dt
    import json

    from mlflow import MlflowClient

    from flows.experiment import experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    arms = [
        {"name": "capped", "set": {}},
        {"name": "best-vs-worst", "set": {"pairs.strategy": "best_vs_worst"}},
    ]
    spec = {"name": "exp", "out_dir": str(tmp_path / "runs"), "baseline": "capped", "arms": arms}
    path = _write(tmp_path, _base(tmp_path, tiny_model), spec)

    t0 = dt.datetime.now(dt.UTC)
    state = experiment(str(path), [], uri, return_state=True)
    assert state.is_completed(), state
    s = state.result()
    runs = _all_task_runs_since(t0)
    # the teacher samples once for both arms; the untrained student is evaluated once
    by_task = {}
    for r in runs:
        by_task.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state_name)
    assert by_task["sample-shard"].count("Completed") == 1 and set(by_task["sample-shard"]) == {
        "Completed",
        "Cached",
    }
    assert by_task["train-student"] == ["Completed", "Completed"]
    # the untrained student's evaluation is shared too: before (once) + each arm's after
    assert sorted(by_task["evaluate-student"]) == ["Cached", "Completed", "Completed", "Completed"]

    out = tmp_path / "runs" / "exp"
    report = json.loads((out / "comparison.json").read_text())
    assert report["baseline"] == "capped" and [a["arm"] for a in report["arms"]] == [
        "capped",
        "best-vs-worst",
    ]
    bvw = report["arms"][1]
    assert set(bvw["vs_baseline"]) == {"fol", "arith", "all"}
    assert (
        0 <= bvw["vs_baseline"]["all"]["mcnemar_p"] <= 1 and bvw["pairs"] > 0 and bvw["training_seconds"] > 0
    )
    assert report["arms"][0]["pairs"] == bvw["pairs"] == 4  # the examples trained on: 2 steps x 2
    assert (out / "accuracy_by_arm.png").stat().st_size > 1000
    assert "| best-vs-worst | all |" in (out / "report.md").read_text()
    assert s.report == (out / "report.md").read_text()

    client = MlflowClient(uri)
    parent = client.get_run(s.mlflow_run)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{s.mlflow_run}'")
    assert sorted(r.info.run_name for r in children) == ["best-vs-worst", "capped"]
    assert "all.vs_baseline" in {r.info.run_name: r for r in children}["best-vs-worst"].data.metrics
    assert "best-vs-worst.all.accuracy" in parent.data.metrics
    assert {f.path for f in client.list_artifacts(s.mlflow_run)} >= {"report.md", "comparison.json"}

    # one arm added: only it trains; everything else comes from the cache
    spec["arms"] = [*arms, {"name": "sft", "set": {"student.training.objective": "sft"}}]
    path = _write(tmp_path, _base(tmp_path, tiny_model), spec)
    t1 = dt.datetime.now(dt.UTC)
    state = experiment(str(path), [], uri, return_state=True)
    assert state.is_completed(), state
    by_task = {}
    for r in _all_task_runs_since(t1):
        by_task.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state_name)
    assert sorted(by_task["train-student"]) == ["Cached", "Cached", "Completed"]
    assert set(by_task["sample-shard"]) == {"Cached"}
    assert [a.arm for a in state.result().arms] == ["capped", "best-vs-worst", "sft"]
    # a cached arm keeps the seconds its training took (not this run's clock over a cache hit) and its
    # report is not drawn again
    again = {a.arm: a for a in state.result().arms}
    assert again["best-vs-worst"].training_seconds == bvw["training_seconds"] > 0
    assert sorted(by_task["write-report"]) == ["Cached", "Cached", "Completed"]


def test_a_round_killed_mid_training_resumes_and_finished_rounds_are_not_redone(
    harness, tmp_path, tiny_model
):
    """``fcdpo run`` in a process of its own is SIGKILLed once round 2 has a training checkpoint; the run
    again (this process) takes round 1 from the cache and resumes round 2 from that checkpoint."""
    import datetime as dt
    import os
    import signal
    import subprocess
    import sys
    import time

    from flows.pipeline import pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_run_config(
        tmp_path, tiny_model, **{"student.rounds": 2, "student.backend_options": {"error_rate": 0.4},
                                 "student.training": {"max_steps": 40, "batch_size": 2, "save_steps": 1}},
    )  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    checkpoints = Path(cfg.out_dir) / cfg.name / "round-2" / "training" / "checkpoints"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # its own temporary API
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(path), "--tracking-uri", uri],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not (checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*/trainer_state.json"))):
            assert proc.poll() is None, "the run ended before round 2 trained"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (checkpoints.parent / "adapter").exists()
    killed_at = {
        c.name: c.stat().st_mtime
        for c in checkpoints.glob("checkpoint-*/trainer_state.json")
        for c in [c.parent]
    }

    t0 = dt.datetime.now(dt.UTC)
    state = pipeline(cfg, uri, return_state=True)
    assert state.is_completed(), state
    s = state.result()
    assert [r.round for r in s.rounds] == [1, 2] and s.rounds[1].steps == 40
    states = {}
    for r in _all_task_runs_since(t0):
        states.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state_name)
    assert sorted(states["train-student"]) == ["Cached", "Completed"]  # round 1 cached, round 2 finished
    # round 2 resumed: the checkpoints written before the kill are the same files (not trained again)
    assert killed_at and all((checkpoints / n).stat().st_mtime == t for n, t in killed_at.items())
    assert set(states["sample-shard"]) == {"Cached"}
    import json

    manifest = json.loads((checkpoints.parent / "adapter" / "fcdpo_manifest.json").read_text())
    assert manifest["global_step"] == 40
    log = (checkpoints.parent / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == list(range(1, 41))  # resumed: each step logged once


def test_extra_evaluation_sets_are_reported_beside_the_held_out_split(harness, tmp_path, tiny_model):
    from fcdpo.problems import load_source
    from flows.pipeline import pipeline

    mine = tmp_path / "my-set.jsonl"
    mine.write_text("".join(p.model_dump_json() + "\n" for p in load_source("arith", n=5, seed=99)))
    cfg = tiny_run_config(tmp_path, tiny_model, **{"evaluation.extra_sets": [str(mine)]})
    state = pipeline(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    assert state.is_completed(), state
    s = state.result()
    x = s.extra_sets["my-set"]
    assert x.before["all"].n == x.after["all"].n == 5 and x.comparison["all"].n == 5
    assert "extra set `my-set`" in s.table
    out = Path(cfg.out_dir) / cfg.name / "eval" / "my-set"
    assert len((out / "before" / "greedy.jsonl").read_text().splitlines()) == 5
    assert len((out / "after" / "greedy.jsonl").read_text().splitlines()) == 5

    # a bad file fails before anything is sampled, naming the file and line
    mine.write_text('{"question": "2+2?"}\n')
    cfg = tiny_run_config(tmp_path / "bad", tiny_model, **{"evaluation.extra_sets": [str(mine)]})
    state = pipeline(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    assert state.is_failed() and f"{mine}:1" in str(state.result(raise_on_failure=False))
    assert not (Path(cfg.out_dir) / cfg.name / "chains.jsonl").exists()


def test_extra_sets_are_reported_without_training_too(harness, tmp_path, tiny_model):
    """stages: [evaluate] evaluates the untrained student on the held-out split and on each extra set; the
    summary and its table report both (before only: there is no trained student)."""
    from fcdpo.problems import load_source
    from flows.pipeline import pipeline

    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(p.model_dump_json() + "\n" for p in load_source("arith", n=4, seed=98)))
    over = {"evaluation.extra_sets": [str(mine)], "stages": ["evaluate"]}
    state = pipeline(
        tiny_run_config(tmp_path, tiny_model, **over), f"sqlite:///{tmp_path / 'm.db'}", return_state=True
    )
    assert state.is_completed(), state
    s = state.result()
    x = s.extra_sets["mine"]
    assert x.before["all"].n == 4 and x.after is None and x.comparison is None
    assert "extra set `mine`:" in s.table
    row = next(
        line for line in s.table.split("extra set `mine`:")[1].splitlines() if line.startswith("| all |")
    )
    assert row.startswith("| all | 4 | ") and "| - | - |" in row  # no after, no difference


def test_a_round_without_pairs_stops_the_rounds_and_the_teachers_correct_chains_can_fill_in(
    harness, tmp_path, tiny_model
):
    from flows.pipeline import pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the student's own chains are all wrong (the oracle errs on every chain): no pairs in round 2
    over = {"student.rounds": 2, "student.backend_options": {"error_rate": 1.0}}
    state = pipeline(tiny_run_config(tmp_path / "a", tiny_model, **over), uri, return_state=True)
    assert state.is_completed(), state
    s = state.result()
    assert s.rounds == [] and s.after is not None and s.training.steps == 2  # round 1 only, reported

    # paired with the teacher's correct chains, the same round trains
    over["student.round.chosen_from_teacher"] = True
    state = pipeline(tiny_run_config(tmp_path / "b", tiny_model, **over), uri, return_state=True)
    assert state.is_completed(), state
    two = state.result().rounds[1]
    assert two.correct_chains == 0 and two.pairs > 0 and two.steps == 2


def test_on_policy_samples_pair_the_teachers_correct_chains_with_the_students_own_incorrect_ones(
    harness, tmp_path, tiny_model
):
    import pyarrow.parquet as pq

    from fcdpo.records import read_jsonl
    from flows.pipeline import pipeline

    # the student (the oracle erring on every chain) samples 3 chains on each problem the teacher solved
    over = {"student.on_policy_samples": 3, "student.backend_options": {"error_rate": 1.0}}
    cfg = tiny_run_config(tmp_path, tiny_model, **over)
    state = pipeline(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    assert state.is_completed(), state
    run = Path(cfg.out_dir) / cfg.name
    teacher = list(read_jsonl(run / "chains.jsonl"))
    own = list(read_jsonl(run / "student" / "chains.jsonl"))
    solved = {r.problem_id for r in teacher if r.verdict == "correct"}
    assert solved and {r.problem_id for r in own} == solved and len(own) == 3 * len(solved)
    assert not any(r.verdict == "correct" for r in own)

    def text(r):  # a chain as the pairs keep it (failed tries stripped)
        return json.dumps(
            [[m.role, m.content] for m in r.messages if not m.failed],
            ensure_ascii=False,
            separators=(",", ":"),
        )

    rows = pq.read_table(run / "pairs" / "pairs.parquet").to_pylist()
    assert rows and state.result().training.steps == 2
    assert {r["chosen_messages"] for r in rows} <= {text(r) for r in teacher if r.verdict == "correct"}
    assert {r["rejected_messages"] for r in rows} <= {text(r) for r in own}  # never the teacher's own errors
