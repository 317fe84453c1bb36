"""The method as a Prefect flow (arXiv 2410.18890, Fig. 1), one cached task per box:

    problems --> the teacher samples N chains per problem, each labelled --> pairs D_w x D_l
             --> evaluate the untrained student --> DPO (LoRA) --> evaluate the trained student
             [--> rounds 2..R: the student samples its own chains --> pairs --> DPO continues --> evaluate]
             --> report

This is the only place the stages are sequenced: ``fcdpo run``, the ``pipeline`` deployment and the
scheduled flow all run it; ``config.stages`` chooses which boxes run. Who writes chains is a
:class:`~fcdpo.policy.Policy`; each box is one call on the :class:`~flows.run.Run`, which runs it as a
task cached by the content of its inputs: re-running with nothing changed reads every result from cache
without starting an engine, and changing one input re-runs the stages downstream of it. MLflow gets a
parent run with a child run per stage (datasets with digests, the adapter, metrics, plots).

    fcdpo run --config configs/default.yaml [--set key=value ...]      (or: python -m flows.pipeline)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow
from prefect.context import get_run_context

from fcdpo.config import RunConfig
from fcdpo.evaluation import EvalResult, compare
from fcdpo.pairs import PairsResult
from fcdpo.policy import Policy
from fcdpo.report import ExtraSetSummary, RoundSummary, RunSummary, Stopwatch
from fcdpo.rounds import RoundResult, final_student, next_round, solved
from fcdpo.sampling import ChainsResult
from fcdpo.stages import load_extra_sets
from flows.run import Run
from tasks.common import opaque_args
from tasks.stages import build_teacher_prompt, load_problems


@flow(name="pipeline", log_prints=True, persist_result=True)
def pipeline(config: RunConfig, tracking_uri: str | None = None, parent_run: str | None = None) -> RunSummary:
    """Teacher chains -> preference pairs -> DPO of the student -> accuracy before/after.

    ``config``: the run configuration (configs/*.yaml); ``tracking_uri``: MLflow tracking URI
    (default: the config's ``tracking.uri``, $MLFLOW_TRACKING_URI, or sqlite:///mlflow.db);
    ``parent_run``: an MLflow run this run's own run is a child of (an experiment's)."""
    cfg, todo, clock, got = config, set(config.stages), Stopwatch(), Results()
    # 1. problems, split into training and held-out problems by id hash; the user's extra evaluation sets;
    #    the teacher's few-shot prompt (a bad problem file fails here, before anything is written)
    with clock("problems"):
        split, extra = load_problems(cfg.problems), load_extra_sets(cfg.evaluation)
        prompt = build_teacher_prompt(*opaque_args((cfg.teacher, cfg.agent, split.train)))
    run = Run.start(cfg, split, tracking_uri, parent_run)  # the run's folder and its MLflow run
    teacher, student = Policy.teacher(cfg, prompt.prompt), Policy.student(cfg)
    try:
        if "sample" in todo:  # 2. the teacher samples N chains per problem, each labelled as it finishes
            with clock("sampling"):
                got.chains = paired = run.sample(teacher, prompt.to_sample)
        if {"sample", "pairs"} <= todo and cfg.student.on_policy_samples:  # 2b. on-policy negatives:
            with clock("student_sampling"):  # the untrained student's own chains on what the teacher solved
                own = Policy.on_policy(cfg, samples=cfg.student.on_policy_samples)
                paired = run.pool(run.sample(own, solved(split.train, got.chains), "student"), got.chains)
        if "pairs" in todo:  # 3. preference pairs: every correct x every incorrect chain per prompt (capped)
            with clock("pairs"):
                got.pairs = run.pairs(paired)
        if "evaluate" in todo:  # 4. the untrained student on the held-out problems and the extra sets
            with clock("eval_before"):
                got.before = run.evaluate(student, split.test, "eval/before")
                got.extra_before = {
                    n: run.evaluate(student, ps, f"eval/{n}/before") for n, ps in extra.items()
                }
        run.release()  # training needs the memory
        if "train" in todo and run.trainable(got.pairs):  # 5. DPO of the student with LoRA (or SFT)
            with clock("training"):
                trained = run.train(student, got.pairs)
            got.rounds = [RoundResult(1, teacher.identity(), got.chains, got.pairs, trained, student)]
            if "evaluate" in todo:  # 6. the trained student: same problems, same agent loop
                with clock("eval_after"):
                    got.rounds[0].evaluation = run.evaluate(
                        final_student(cfg, got.rounds), split.test, "eval/after"
                    )
        for k in range(2, cfg.student.rounds + 1 if got.rounds else 0):  # 7. rounds 2..R: on-policy chains
            with clock(f"round_{k}"):
                if (nxt := next_round(run, cfg, split.train, split.test, k, got.rounds)) is None:
                    break
            got.rounds.append(nxt)
        if got.before and got.rounds and got.rounds[-1].evaluation:  # 8. the final student, compared
            got.after, final = got.rounds[-1].evaluation, final_student(cfg, got.rounds)
            run.report(got.before, got.after, got.rounds[0].trained.history)
            for n, ps in extra.items():
                with clock("eval_extra"):
                    got.extra_after[n] = run.evaluate(final, ps, f"eval/{n}/after")
        return run.publish(got.summary(run, clock))  # 9. results table, summary.json, artifacts, MLflow
    except BaseException as e:  # a failure is raised; a stop (SIGINT / SIGTERM) ends the run Cancelled
        return run.stopped(e)
    finally:
        run.release()


@dataclass
class Results:
    """What the stages of one run produced (None: the stage did not run)."""

    chains: ChainsResult | None = None
    pairs: PairsResult | None = None
    before: EvalResult | None = None
    after: EvalResult | None = None
    rounds: list[RoundResult] = field(default_factory=list)
    extra_before: dict[str, EvalResult] = field(default_factory=dict)
    extra_after: dict[str, EvalResult] = field(default_factory=dict)

    def summary(self, run: Run, clock: Stopwatch) -> RunSummary:
        """The run's one summary (``fcdpo.report.RunSummary``), comparisons included."""
        cfg, ev, rounds, flow_run = run.cfg, run.cfg.evaluation, self.rounds, get_run_context().flow_run
        b, a = self.before, self.after
        return RunSummary.build(
            cfg.name, run.out, cfg.stages, (len(run.split.train), len(run.split.test)), self.chains,
            self.pairs, rounds[0].trained if rounds else None, b, a, compare(b, a, ev) if b and a else None,
            clock, engines_started=run.engines.started, mlflow=run.tracker.location(),
            prefect_flow_run=str(flow_run.id) if flow_run else None,
            rounds=[RoundSummary.of(r, b, ev) for r in rounds] if len(rounds) > 1 else [],
            extra_sets={
                n: ExtraSetSummary.of(x, y, compare(x, y, ev)) if (y := self.extra_after.get(n)) else ExtraSetSummary.of(x)
                for n, x in self.extra_before.items()
            },
            objective=cfg.student.training.objective,
            training_pairs=sum(int(r.trained.manifest["n_pairs"]) for r in rounds),  # the ones trained on
            eval_dirs={k: str(v.out_dir) for k, v in (("before", b), ("after", a)) if v and v.out_dir},
        )  # fmt: skip


if __name__ == "__main__":
    import argparse

    from fcdpo.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tracking-uri", default=None)
    a = ap.parse_args()
    print(pipeline(load_config(a.config, a.set), a.tracking_uri).table)
