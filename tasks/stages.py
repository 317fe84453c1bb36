"""One Prefect task per stage of the method, each a thin wrapper over one ``fcdpo.stages`` function,
named ``verb-object`` and returning that function's typed result.

Every task is cached by content (``tasks.common.content_key``) with its result persisted, so a later flow
run reuses it; retried only on transient failures (``tasks.common.transient``). Tasks that need a model
engine take the run's :class:`~tasks.common.Engines` (opened only on a cache miss) and carry the ``engine``
tag, so a concurrency limit (``prefect concurrency-limit create engine 1``) caps them per worker. Outputs
are files under the run folder; output folders are passed as strings (a name, not content, in the key).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from fcdpo import experiment, report, stages
from fcdpo.evaluation import Comparison, EvalResult
from fcdpo.experiment import ArmResult
from fcdpo.pairs import concat_pairs as concat_pairs_lib
from fcdpo.policy import Policy
from fcdpo.problems import ProblemSet
from fcdpo.sampling import ShardResult
from fcdpo.sampling import pool_chains as pool_chains_lib
from fcdpo.stages import EvalJob, SamplingJob
from fcdpo.training import MetricsSink, TrainingConfig, TrainResult
from tasks.common import Engines, content_key, stamped, transient

CACHED = dict(cache_key_fn=content_key, persist_result=True)
RETRIED = dict(
    retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=transient
)

load_problems = task(stages.load_problems, name="load-problems", **CACHED)
build_teacher_prompt = task(stages.teacher_prompt, name="build-teacher-prompt", **CACHED)
gather_chains = task(stamped(stages.gather_chains), name="gather-chains", **CACHED)
build_pairs = task(stamped(stages.build_pairs), name="build-pairs", **CACHED)
concat_pairs = task(stamped(concat_pairs_lib), name="concat-pairs", **CACHED)
pool_chains = task(stamped(pool_chains_lib), name="pool-chains", **CACHED)


@task(name="sample-shard", tags=["engine"], **CACHED, **RETRIED)
def sample_shard(shard: ProblemSet, job: SamplingJob, out_dir: str, engines: Engines) -> ShardResult:
    """N labelled chains per problem of one shard by the job's policy (keyed by its weights); a retry
    resumes the shard file."""
    backend = engines.get(job.policy.engine(), shard, job.workload(shard))
    return stages.sample_shard(shard, job, out_dir, backend)


# log_prints=False: with Prefect's print capture on, dill (via datasets' fingerprinting inside TRL) cannot
# capture the ``dis`` output it parses, and the bytecode of TRL's helpers lands in the run's logs. The
# training metrics reach the logs through ``_log_step`` instead.
@task(name="train-student", tags=["engine"], log_prints=False, **CACHED, **RETRIED)
@stamped
def train_student(
    pairs_parquet: Path,
    policy: Policy,
    training: TrainingConfig,
    out_dir: str,
    tracking: MetricsSink | None = None,
    init_adapter: Path | None = None,
) -> TrainResult:
    """LoRA DPO (or SFT) of the policy's model (keyed by its weights); resumes from its last checkpoint when
    retried. ``tracking`` receives the training metrics as they are logged; each logged step is also a line
    in the task's log. ``init_adapter``: an earlier round's adapter to continue (its files are in the key)."""
    callbacks = [_log_step, *([tracking] if tracking else [])]
    return stages.train_student(pairs_parquet, policy, training, out_dir, callbacks, init_adapter)


def _log_step(step: int, metrics: dict[str, float]) -> None:
    get_run_logger().info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))


@task(name="evaluate-student", tags=["engine"], **CACHED, **RETRIED)
@stamped
def evaluate_student(test: ProblemSet, job: EvalJob, out_dir: str, engines: Engines) -> EvalResult:
    """Greedy pass@1 (+ pass@k) of the job's policy (a student, base or base + adapter) in the agent loop."""
    backend = engines.get(job.policy.engine(), test, job.workload(test))
    return stages.evaluate_student(test, job, backend, out_dir)


REPORT_FILES = ("report.md", "comparison.json", "accuracy.png", "training_curves.png", "pass_at_k.png")
COMPARISON_FILES = ("report.md", "comparison.json", "accuracy_by_arm.png", "accuracy_by_round.png")


@dataclass(frozen=True)
class ReportFiles:
    """A report written to a folder: its files and its markdown (the results table)."""

    paths: tuple[str, ...]
    table: str

    def files(self) -> list[str]:
        return list(self.paths)


@task(name="write-report", **CACHED)
@stamped
def write_report(
    before: EvalResult,
    after: EvalResult,
    comparison: Comparison,
    history: list[dict[str, float]],
    out_dir: str,
) -> ReportFiles:
    """report.md, comparison.json and the plots of a before/after comparison; keyed by the evaluations'
    files and the comparison, so a re-run with the same results draws nothing."""
    table = report.write_report(Path(out_dir), before, after, comparison, history)
    return ReportFiles(_present(out_dir, REPORT_FILES), table)


@task(name="write-comparison", **CACHED)
@stamped
def write_comparison(rows: list[ArmResult], baseline: str, title: str, out_dir: str) -> ReportFiles:
    """An experiment's report.md, comparison.json and plots by arm (and round); keyed by the arms' rows."""
    text = experiment.write_comparison(Path(out_dir), rows, baseline, title)
    return ReportFiles(_present(out_dir, COMPARISON_FILES), text)


def _present(out_dir: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(str(Path(out_dir, f)) for f in names if Path(out_dir, f).is_file())
