"""The method as a Prefect flow (arXiv 2410.18890, Fig. 1), one cached task per box:

    problems --> teacher samples N chains per problem, each labelled --> pairs D_w x D_l
             --> evaluate the untrained student --> DPO (LoRA) --> evaluate the trained student
             [--> rounds 2..R: the student samples its own chains --> pairs --> DPO continues --> evaluate]
             --> report

This is the only place the stages are sequenced: ``fcdpo run``, the ``pipeline`` deployment and the
scheduled flow all run it; ``config.stages`` chooses which boxes run. Every task is keyed by the content of
its inputs, so re-running with nothing changed reads every result from cache without starting an engine,
and changing one input re-runs the stages downstream of it. MLflow gets a parent run with a child run per
stage (datasets with digests, the adapter, metrics, plots). Without Prefect, ``fcdpo.stages`` has the same
stage functions (the tasks wrap them).

    fcdpo run --config configs/default.yaml [--set key=value ...]      (or: python -m flows.pipeline)
"""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.states import Cancelled

from fcdpo.config import RunConfig
from fcdpo.evaluation import EvalResult, compare
from fcdpo.interrupt import signal_name
from fcdpo.models import model_identity
from fcdpo.pairs import PairsResult
from fcdpo.problems import ProblemSet
from fcdpo.report import ExtraSetSummary, RoundSummary, RunSummary, Stopwatch
from fcdpo.sampling import ChainsResult, split_shards
from fcdpo.stages import (
    EvalJob,
    RoundResult,
    Split,
    kept_after_interrupt,
    load_extra_sets,
    round_problems,
    round_student,
    run_dir,
    solved,
    stage_dir,
    student_job,
)
from flows.executors import sample_local, sample_shards
from tasks.common import Engines, fresh, opaque_args
from tasks.stages import (
    build_pairs,
    build_teacher_prompt,
    concat_pairs,
    evaluate_student,
    gather_chains,
    load_problems,
    pool_chains,
    train_student,
    write_report,
)
from tasks.tracking import Tracker, start_tracker


@flow(name="pipeline", log_prints=True, persist_result=True)
def pipeline(config: RunConfig, tracking_uri: str | None = None, parent_run: str | None = None) -> RunSummary:
    """Teacher chains -> preference pairs -> DPO of the student -> accuracy before/after.

    ``config``: the run configuration (configs/*.yaml); ``tracking_uri``: MLflow tracking URI
    (default: the config's ``tracking.uri``, $MLFLOW_TRACKING_URI, or sqlite:///mlflow.db);
    ``parent_run``: an MLflow run this run's own run is a child of (an experiment's)."""
    cfg, stages, clock, engines, out = config, set(config.stages), Stopwatch(), Engines(), run_dir(config)
    chains = pairs = trained = before = after = comparison = None
    extra_before: dict[str, EvalResult] = {}
    extra_results: dict[str, tuple[EvalResult, EvalResult, dict]] = {}

    # 1. problems: generated or loaded, split into training and held-out problems by id hash
    #    (a bad problem file fails here: nothing has been written yet and the error is not retried)
    with clock("problems"):
        split = load_problems(cfg.problems)
        extra = load_extra_sets(cfg.evaluation)  # the user's own evaluation sets
        teacher = build_teacher_prompt(*opaque_args((cfg.teacher, cfg.agent, split.train)))
    out.mkdir(parents=True, exist_ok=True)
    tracker = start_tracker(cfg, tracking_uri, split, out / "problems", parent_run)
    try:
        # 2. the teacher samples N chains per problem, shard by shard, each labelled as it finishes
        if "sample" in stages:
            with clock("sampling"):
                shards = sample_shards(cfg, teacher, engines)
                chains = fresh(gather_chains, shards, str(stage_dir(cfg, "chains.jsonl", shards)))
            tracker.chains(chains)

        # 2b. (student.on_policy_samples) the untrained student samples its own chains on the problems the
        #     teacher solved: its incorrect ones become the rejected side of the pairs (on-policy negatives)
        paired = chains
        if "sample" in stages and "pairs" in stages and cfg.student.on_policy_samples:
            with clock("student_sampling"):
                problems = solved(split.train, chains)
                policy = cfg.student.model
                own = _student_chains(
                    cfg, "student", problems, policy, cfg.student.on_policy_samples, engines
                )
                paired = fresh(pool_chains, own, chains, str(stage_dir(cfg, "pooled.jsonl", own, chains)))
            get_run_logger().info(
                f"the untrained student's own chains: {own.correct} of {own.chains} correct, on "
                f"{len(problems)} problems the teacher solved"
            )

        # 3. preference pairs: every correct x every incorrect chain per prompt (capped)
        if "pairs" in stages:
            with clock("pairs"):
                args = (paired, split.train, cfg.student.prompt, cfg.pairs, cfg.labelling)
                pairs = fresh(build_pairs, *args, str(stage_dir(cfg, "pairs", *args)))
            tracker.pairs(pairs)

        # 4. the untrained student on the held-out problems (through the teacher's engine if it is the same)
        if "evaluate" in stages:
            with clock("eval_before"):
                before = _evaluate(cfg, split.test, None, "eval/before", engines)
                extra_before = {
                    n: _evaluate(cfg, ps, None, f"eval/{n}/before", engines) for n, ps in extra.items()
                }
        engines.close()  # training needs the memory

        # 5. DPO of the student with LoRA (or the SFT baseline on the correct chains: training.objective)
        if "train" in stages and _have_pairs(pairs, cfg):
            with clock("training"):
                args = (pairs.parquet, cfg.student.for_training(), student_id(cfg))
                trained = fresh(train_student, *args, str(stage_dir(cfg, "training", *args)), tracker)
            tracker.adapter(trained, pairs)

        # 6. the trained student: same problems, same agent loop
        if "evaluate" in stages and trained:
            with clock("eval_after"):
                after = _evaluate(cfg, split.test, trained.adapter_dir, "eval/after", engines)

        # 7. rounds 2..R (student.rounds): the last round's student samples chains on the training problems
        #    in its own prompt (on-policy), they are labelled and paired, and training continues from it
        rounds = (
            [RoundResult(1, teacher_id(cfg), chains, pairs, trained, cfg.student.model, after)]
            if trained
            else []
        )
        for k in range(2, cfg.student.rounds + 1 if trained else 0):
            with clock(f"round_{k}"):
                nxt = _next_round(cfg, split, k, rounds, engines, tracker)
            if nxt is None:
                break
            rounds.append(nxt)
        if rounds:
            after = rounds[-1].evaluation

        # 8. the paired before/after comparison of the final student, on the held-out split and on the
        #    user's extra sets (evaluation.extra_sets)
        if before and after:
            comparison = compare(before, after, cfg.evaluation)
            fresh(write_report, str(out / "eval"), before, after, comparison, list(trained.history))
            final, adapter = _final_student(cfg, rounds)
            for n, ps in extra.items():
                with clock("eval_extra"):
                    done = _evaluate(final, ps, adapter, f"eval/{n}/after", engines)
                    extra_results[n] = extra_before[n], done, compare(extra_before[n], done, cfg.evaluation)

        # 9. one summary: the results table, summary.json, the Prefect artifacts, MLflow
        flow_run = get_run_context().flow_run
        summary = RunSummary.build(
            cfg.name, out, cfg.stages, (len(split.train), len(split.test)), chains, pairs, trained,
            before, after, comparison, clock, engines_started=engines.started, mlflow=tracker.location(),
            prefect_flow_run=str(flow_run.id) if flow_run else None,
            rounds=[RoundSummary.of(r, before, cfg.evaluation) for r in rounds] if len(rounds) > 1 else [],
            extra_sets={n: ExtraSetSummary.of(*extra_results.get(n, (b,))) for n, b in extra_before.items()},
            objective=cfg.student.training.objective,
            training_pairs=sum(int(r.trained.manifest["n_pairs"]) for r in rounds),  # the ones trained on
            eval_dirs={k: str(v.out_dir) for k, v in (("before", before), ("after", after)) if v and v.out_dir},
        )  # fmt: skip
        _publish(summary, out, tracker)
        return summary
    except BaseException as e:
        if (stop := signal_name(e)) is None:
            tracker.finish("FAILED")
            raise
        # SIGINT / SIGTERM (fcdpo.interrupt): the run ends Cancelled, its finished parts kept to resume from
        tracker.finish("KILLED")
        return Cancelled(message=kept_after_interrupt(cfg, stop))
    finally:
        engines.close()


def _next_round(
    cfg: RunConfig, split: Split, k: int, done: list[RoundResult], engines: Engines, tracker: Tracker
) -> RoundResult | None:
    """Round ``k``: the previous round's student (merged) samples, its chains are paired (with every earlier
    round's pairs when ``student.round.keep_pairs``), training continues from it, the new student is
    evaluated. Every step is a cached task: a finished round is never redone."""
    r, policy = f"round-{k}", done[-1].student()
    chains = _student_chains(cfg, r, round_problems(split.train, k, cfg.student), policy, None, engines)
    paired = chains
    if cfg.student.round.chosen_from_teacher:  # + the teacher's correct chains (round 1's chains)
        paired = fresh(
            pool_chains,
            chains,
            done[0].chains,
            str(stage_dir(cfg, f"{r}/pooled.jsonl", chains, done[0].chains)),
        )
    args = (paired, split.train, cfg.student.prompt, cfg.pairs, cfg.labelling)
    pairs = fresh(build_pairs, *args, str(stage_dir(cfg, f"{r}/pairs", *args)))
    if cfg.student.round.keep_pairs:
        so_far = [x.pairs for x in done] + [pairs]
        pairs = fresh(concat_pairs, so_far, str(stage_dir(cfg, f"{r}/pairs-so-far", so_far)))
    engines.close()  # training needs the memory
    if not _have_pairs(pairs, cfg):  # e.g. a student that sampled no correct chain: no round k
        get_run_logger().warning(
            f"round {k}: nothing to train on ({chains.correct} of {chains.chains} of the student's chains "
            "correct); the rounds stop here (student.round.chosen_from_teacher pairs the teacher's correct "
            "chains with the student's incorrect ones)"
        )
        return None
    student, init = round_student(cfg, done[-1])
    args = (pairs.parquet, student, model_identity(student.model, student.backend))
    out = str(stage_dir(cfg, f"{r}/training", *args, init))
    trained = fresh(train_student, *args, out, tracker.sink(r), init)
    policy_id = model_identity(str(policy), cfg.student.backend)
    result = RoundResult(k, policy_id, chains, pairs, trained, student.model)
    if "evaluate" in cfg.stages:
        ev = _with_student(cfg, result.student())
        result.evaluation = _evaluate(ev, split.test, None, f"{r}/eval", engines)
    tracker.round(result, init)
    return result


def _student_chains(
    cfg: RunConfig, name: str, problems: ProblemSet, policy: str | Path, samples: int | None, engines: Engines
) -> ChainsResult:
    """The student ``policy`` (a model folder or name) samples chains on ``problems`` in its own prompt
    (``samples`` per problem, default ``student.round``'s), labelled, in ``<name>/chains.jsonl``."""
    job = student_job(cfg, policy, samples)
    policy_id = model_identity(str(policy), job.teacher.backend)
    shards_dir = str(stage_dir(cfg, f"{name}/shards", job, policy_id))
    shards = sample_local(
        split_shards(problems, job.teacher.sampling.shard_size), job, policy_id, shards_dir, engines
    )
    return fresh(gather_chains, shards, str(stage_dir(cfg, f"{name}/chains.jsonl", shards)))


def teacher_id(cfg: RunConfig) -> str:
    """The teacher model's identity in cache keys (name + weights hash)."""
    return model_identity(cfg.teacher.model, cfg.teacher.backend)


def student_id(cfg: RunConfig) -> str:
    """The student model's identity in cache keys (name + weights hash)."""
    return model_identity(cfg.student.model, cfg.student.backend)


def _evaluate(
    cfg: RunConfig, problems: ProblemSet, adapter: Path | None, name: str, engines: Engines
) -> EvalResult:
    """The student (base, or base + ``adapter``) on ``problems``, through the shared engines; written to
    the stage folder ``name`` (e.g. ``eval/before``)."""
    args = (problems, EvalJob.of(cfg), student_id(cfg), adapter)
    return fresh(evaluate_student, *args, str(stage_dir(cfg, name, *args)), engines)


def _with_student(cfg: RunConfig, model: Path) -> RunConfig:
    """``cfg`` with a trained student (a merged model folder) in place of the untrained one."""
    return cfg.model_copy(update={"student": cfg.student.model_copy(update={"model": str(model)})})


def _final_student(cfg: RunConfig, rounds: list[RoundResult]) -> tuple[RunConfig, Path | None]:
    """The config and adapter that serve the final student: round 1's adapter, or the last round merged."""
    if len(rounds) == 1:
        return cfg, rounds[0].trained.adapter_dir
    return _with_student(cfg, rounds[-1].student()), None


def _used(pairs: PairsResult, cfg: RunConfig) -> int:
    """The examples a round trained on: its pairs, or its correct chains for the SFT baseline."""
    return pairs.n_correct if cfg.student.training.objective == "sft" else pairs.n_pairs


def _have_pairs(pairs: PairsResult, cfg: RunConfig) -> bool:
    if _used(pairs, cfg):
        return True
    if cfg.student.training.objective == "sft":
        get_run_logger().warning("no correct chains to fine-tune on")
    else:
        get_run_logger().warning("no preference pairs (no prompt had both a correct and an incorrect chain)")
    return False


def _publish(summary: RunSummary, out: Path, tracker: Tracker) -> None:
    """summary.json, the summary in MLflow, and the results as Prefect artifacts (table, plot)."""
    tracker.report(summary, summary.write(out / "summary.json"))
    if summary.comparison:
        create_table_artifact(
            [
                {"task": t, **{k: c[k] for k in ("n", "before", "after", "difference", "mcnemar_p")}}
                for t, c in summary.comparison.items()
            ],
            key="results",
            description="accuracy before / after DPO, per task",
        )
    plot = out / "eval" / "accuracy.png"
    image = (
        f"\n\n![accuracy before / after](data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()})"
        if summary.comparison and plot.is_file()
        else ""
    )
    m = summary.mlflow
    create_markdown_artifact(
        f"{summary.table}\n\nMLflow run `{m.run_id}` ({m.tracking_uri})" + image if m else summary.table,
        key="results-table",
        description="accuracy before / after DPO",
    )


if __name__ == "__main__":
    import argparse

    from fcdpo.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tracking-uri", default=None)
    a = ap.parse_args()
    print(pipeline(load_config(a.config, a.set), a.tracking_uri).table)
