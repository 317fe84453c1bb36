"""Sampling fan-out: the two executors of the pipeline's sampling stage (``flows.run.Run.sample`` picks).

- ``local`` (default): every shard runs as a task in the flow process, all sharing one engine.
- ``deployment``: every shard is a flow run of the ``sample-shard`` deployment (``flows/stages.py``) on the
  ``gpu`` work pool, so N GPU workers sample in parallel. The runs share the run folder (a shared volume)
  and Prefect's result storage. A shard run that *crashed* (its worker process was killed, OOM, the node
  went away) is triggered again, up to ``orchestration.shard_attempts`` times, and resumes its shard
  file; a shard run that *failed* (bad input, a bug) is not retried and fails the pipeline.

Either way a shard whose cached result names a file that is gone (the run folder was deleted) is sampled
again instead of trusted.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor

from prefect import get_run_logger
from prefect.context import get_run_context

from fcdpo.config import RunConfig
from fcdpo.problems import ProblemSet
from fcdpo.sampling import ShardResult
from fcdpo.stages import SamplingJob
from tasks.common import Engines, missing_files, run_task
from tasks.stages import sample_shard


def sample_shards(
    cfg: RunConfig, job: SamplingJob, out: str, engines: Engines, on_workers: bool = False
) -> list[ShardResult]:
    """Every shard of ``job`` sampled: as flow runs on the gpu pool's workers (``on_workers``; shard files
    the workers wrote where this process cannot see them are sampled here instead), else here."""
    shards = job.shards()
    if on_workers:
        results = sample_by_deployment(cfg, len(shards))
        if not any(missing_files(r) for r in results):
            return results
    return sample_local(shards, job, out, engines)


def sample_local(shards: list[ProblemSet], job: SamplingJob, out: str, engines: Engines) -> list[ShardResult]:
    """Shard after shard in this process, through one shared engine (opened only if a shard misses cache),
    into shard files under ``out``; any policy's shards (the teacher's, a student's own). A shard whose
    cached file is gone (the run folder deleted, or the same config run from another directory) runs again
    with its cache refreshed."""
    results: list[ShardResult] = []
    for shard in shards:
        result = run_task(sample_shard, shard, job, out, engines)
        if missing_files(result):
            get_run_logger().warning("sample-shard: the cached shard file is missing on disk; sampling again")
            result = run_task(sample_shard.with_options(refresh_cache=True), shard, job, out, engines)
        results.append(result)
    return results


def sample_by_deployment(cfg: RunConfig, n_shards: int) -> list[ShardResult]:
    """One ``sample-shard`` flow run per shard, all in flight at once; waits for every one."""
    # imported here, before the shard threads: CPython 3.11 can fail threads importing one package at once
    from prefect.deployments import run_deployment

    params = cfg.model_dump(mode="json")
    parent = get_run_context().flow_run
    log = get_run_logger()

    def one(shard: int) -> ShardResult:
        attempts = cfg.orchestration.shard_attempts
        for attempt in range(1, attempts + 1):
            run = run_deployment(
                cfg.orchestration.shard_deployment,
                parameters={"config": params, "shard": shard},
                flow_run_name=f"{cfg.name}-shard-{shard}",
                idempotency_key=f"{parent.id if parent else 'none'}-shard-{shard}-attempt-{attempt}",
                poll_interval=2,
                timeout=None,
            )
            state = run.state
            if state is not None and state.is_completed():
                return state.result()
            if state is None or not state.is_crashed():
                raise RuntimeError(
                    f"sample-shard run {run.id} for shard {shard} ended {state.name if state else 'without a state'}: "
                    f"{state.message if state else ''}"
                )
            log.warning(
                f"shard {shard}: flow run {run.id} crashed ({state.message}); "
                f"attempt {attempt}/{attempts}, the next one resumes the shard file"
            )
        raise RuntimeError(f"shard {shard}: {attempts} sample-shard runs crashed")

    with ThreadPoolExecutor(max_workers=max(1, n_shards)) as pool:
        # each thread gets a copy of this flow run's context, so the shard runs show as its subflows
        futures = [pool.submit(contextvars.copy_context().run, one, i) for i in range(n_shards)]
        return [f.result() for f in futures]
