"""Sample N chains per problem, sharded and resumable.

A shard is a list of problems sampled ``samples`` times each. Its output is an append-only JSONL of
chain records, keyed by (problem id, sample index), written as chains finish and flushed to disk after
every step batch. A shard's *identity* hashes everything that determines its records (problem digest,
model id and weights hash, prompt hashes, sampling parameters, agent limits, code version); the output
file is named by it, so changing any input starts a new file instead of mixing records.

Re-running a shard skips finished keys. After a kill at any moment, the torn last line (if any) is cut
off and its chain re-sampled, so every (problem, sample) ends up in the file exactly once; with the same
seeds the re-sampled chain is the same chain.

The main loop (``sample_shards``) is the asynchronous rollout (``fcdpo.rollout.roll_out``: every chain its
own loop, a bounded window in flight) with a writer per shard around it: each chain is labelled and
appended to its shard's file as it finishes, flushed at once and fsynced at most every ``FSYNC_S`` seconds.
The shards of one call share the window, so the engine does not drain at the end of each shard.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from fcdpo.agent import Agent, AgentLimits
from fcdpo.backends.base import Backend, SamplingParams
from fcdpo.hashing import code_version, digest
from fcdpo.labelling import AutoLabeller, LabellingConfig, verdict_counts
from fcdpo.problems.base import ProblemSet
from fcdpo.records import ChainRecord, read_jsonl, write_jsonl
from fcdpo.rollout import roll_out, run_sync


class ShardSpec(BaseModel):
    """Everything that determines a shard's records."""

    problem_digest: str
    model_id: str
    prompt_hashes: dict[str, str] = Field(description="toolset -> prompt hash")
    samples: int
    sampling: SamplingParams = Field(description="every reply's parameters (seed None: each chain's own)")
    limits: AgentLimits
    base_seed: int
    labelling: LabellingConfig = Field(description="what decides the verdicts written with the chains")
    code_version: str

    @property
    def identity(self) -> str:
        return digest(self.model_dump(), 20)


def split_shards(problems: ProblemSet, shard_size: int) -> list[ProblemSet]:
    """Consecutive, deterministic shards of at most ``shard_size`` problems."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    return [
        ProblemSet(f"{problems.name}[{i // shard_size}]", problems.problems[i : i + shard_size])
        for i in range(0, len(problems), shard_size)
    ]


def recover(path: Path) -> set[tuple[str, int]]:
    """Keys already in a shard file. A torn last line (killed writer) is cut off the file."""
    done: set[tuple[str, int]] = set()
    if not path.exists():
        return done
    good = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                d = json.loads(line)
                key = (d["problem_id"], d["sample_index"])
            except (ValueError, KeyError):
                break  # a corrupt line: everything after it is re-sampled
            if key in done:
                raise RuntimeError(f"{path}: duplicate record {key}; the shard file was written twice")
            done.add(key)
            good += len(line)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


@dataclass
class ShardResult:
    path: Path
    identity: str
    total: int
    resumed: int  # records found from an earlier run
    sampled: int  # records written by this run
    seconds: float  # from the rollout's start to this shard's last chain written
    completion_tokens: int
    correct: int

    def files(self) -> list[Path]:
        """The files this result stands for (a cached result whose files are gone is recomputed)."""
        return [self.path]

    def records(self) -> list[ChainRecord]:
        return list(read_jsonl(self.path))


class Progress:
    """tqdm bar, moving chain by chain: chains/s, tokens/s (counted reply by reply, so it moves while the
    first chains are still running), chains in flight, running accuracy."""

    REFRESH_S = 0.5  # the figures are redrawn between finished chains at most this often

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.bar = None
        self.t0 = self.drawn = time.perf_counter()
        self.tokens = self.correct = self.finished = self.started = 0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="chain", dynamic_ncols=True)

    def start(self) -> None:
        self.started += 1

    def reply(self, tokens: int) -> None:
        """A reply of ``tokens`` generated tokens came back."""
        self.tokens += tokens
        if self.bar is not None and time.perf_counter() - self.drawn >= self.REFRESH_S:
            self._figures()
            self.bar.refresh()

    def update(self, finished: int, correct: int) -> None:
        self.finished += finished
        self.correct += correct
        if self.bar is not None:
            self._figures()
            self.bar.update(finished)

    def _figures(self) -> None:
        self.drawn = now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        acc = self.correct / self.finished if self.finished else 0.0
        self.bar.set_postfix_str(  # type: ignore[union-attr]
            f"{self.finished / dt:.2f} chains/s, {self.tokens / dt:.0f} tok/s, "
            f"{self.started - self.finished} in flight, acc {acc:.1%}",
            refresh=False,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ShardWriter:
    """Labels each finished chain and appends it to the shard file: flushed at once (a kill loses at most
    the line being written, which ``recover`` cuts off), fsynced at most every ``FSYNC_S`` seconds."""

    FSYNC_S = 1.0

    def __init__(self, path: Path, label: AutoLabeller, problems: ProblemSet, bar: Progress):
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.label, self.by_id, self.bar = label, problems.by_id(), bar
        self.written = self.tokens = self.correct = 0
        self.synced = time.monotonic()
        self.last = time.perf_counter()  # when the last chain was written

    def write(self, r: ChainRecord) -> None:
        verdict = self.label(r, self.by_id[r.problem_id]).verdict
        self.f.write(r.model_copy(update={"verdict": verdict.value}).model_dump_json() + "\n")
        self.f.flush()
        if time.monotonic() - self.synced >= self.FSYNC_S:
            os.fsync(self.f.fileno())
            self.synced = time.monotonic()
        ok = verdict == "correct"
        self.written += 1
        self.tokens += r.completion_tokens
        self.correct += ok
        self.last = time.perf_counter()
        self.bar.update(1, ok)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def shard_spec(
    agent: Agent,
    backend: Backend,
    problems: ProblemSet,
    samples: int,
    sampling: SamplingParams,
    base_seed: int,
    labeller: AutoLabeller | None = None,
) -> ShardSpec:
    toolsets = sorted({p.toolset for p in problems})
    return ShardSpec(
        problem_digest=problems.digest,
        model_id=backend.model_id,
        prompt_hashes={t: agent.builder(t).hash for t in toolsets},
        samples=samples,
        sampling=replace(sampling, seed=None),
        limits=agent.limits,
        base_seed=base_seed,
        labelling=LabellingConfig.model_validate((labeller or AutoLabeller()).identity),
        code_version=code_version(),
    )


def sample_shard(
    agent: Agent,
    backend: Backend,
    problems: ProblemSet,
    samples: int,
    sampling: SamplingParams,
    out_dir: str | Path,
    base_seed: int = 0,
    progress: bool = False,
    labeller: AutoLabeller | None = None,
    window: int | None = None,
    longest_first: bool = True,
    on_start: Callable[[], None] | None = None,
) -> ShardResult:
    """``samples`` chains for each problem, labelled by ``labeller`` (default: auto, Stop() required) as
    they finish, appended to the shard file under ``out_dir`` named by the shard's identity. ``window``:
    requests in flight at once (default: what the backend batches plus a quarter queued,
    ``fcdpo.backends.default_window``); ``longest_first``: start the chains longest expected first
    (``fcdpo.rollout.LongestFirst``), else in the given order; ``on_start``: called as each chain starts."""
    [result] = sample_shards(
        agent,
        backend,
        [problems],
        samples,
        sampling,
        out_dir,
        base_seed,
        progress,
        labeller,
        window,
        longest_first=longest_first,
        on_start=on_start,
    )
    return result


def open_shard(out: Path, spec: ShardSpec, problems: ProblemSet) -> tuple[Path, set[tuple[str, int]]]:
    """The shard's file under ``out`` (its manifest written first, whole) and the keys already in it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"shard-{spec.identity}.jsonl"
    manifest = out / f"shard-{spec.identity}.json"
    if not manifest.exists():
        tmp = manifest.with_suffix(".json.tmp")
        tmp.write_text(
            json.dumps(
                {**spec.model_dump(), "identity": spec.identity, "problems": [p.id for p in problems]},
                indent=1,
            )
        )
        os.replace(tmp, manifest)
    return path, recover(path)


def sample_shards(
    agent: Agent,
    backend: Backend,
    shards: Sequence[ProblemSet],
    samples: int,
    sampling: SamplingParams,
    out_dir: str | Path,
    base_seed: int = 0,
    progress: bool = False,
    labeller: AutoLabeller | None = None,
    window: int | None = None,
    longest_first: bool = True,
    on_start: Callable[[], None] | None = None,
) -> list[ShardResult]:
    """:func:`sample_shard` for several shards in *one* rollout window: each chain's record goes to its
    shard's file, and the engine never drains at the end of a shard while the next waits (the last chains
    of a shard run beside the first of the next). One progress bar over all of them."""
    label = labeller or AutoLabeller()
    owner: dict[str, int] = {}
    for k, shard in enumerate(shards):
        for p in shard:
            if owner.setdefault(p.id, k) != k:
                raise ValueError(
                    f"problem {p.id!r} is in shards {owner[p.id]} and {k}; shards must not overlap"
                )
    specs = [shard_spec(agent, backend, shard, samples, sampling, base_seed, label) for shard in shards]
    opened = [open_shard(Path(out_dir), spec, shard) for spec, shard in zip(specs, shards, strict=True)]
    total = sum(len(shard) for shard in shards) * samples
    desc = f"shard {specs[0].identity[:8]}" if len(specs) == 1 else f"{len(specs)} shards"
    bar = Progress(total, sum(len(done) for _, done in opened), progress, desc)
    writers = [ShardWriter(path, label, shard, bar) for (path, _), shard in zip(opened, shards, strict=True)]
    todo = [
        (p, [i for i in range(samples) if (p.id, i) not in done] if done else range(samples))
        for shard, (_, done) in zip(shards, opened, strict=True)
        for p in shard
    ]
    t0 = time.perf_counter()

    def write(r: ChainRecord) -> None:
        writers[owner[r.problem_id]].write(r)

    def start() -> None:
        bar.start()
        if on_start is not None:
            on_start()

    try:
        run_sync(
            roll_out(
                agent, backend, todo, sampling, write, window, start, bar.reply, base_seed, longest_first
            )
        )
    finally:
        for w in writers:
            w.close()
        bar.close()
    return [
        ShardResult(
            path,
            spec.identity,
            len(shard) * samples,
            len(done),
            w.written,
            (w.last - t0) if w.written else 0.0,
            w.tokens,
            w.correct,
        )
        for spec, shard, (path, done), w in zip(specs, shards, opened, writers, strict=True)
    ]


def read_shards(results: Sequence[ShardResult]) -> list[ChainRecord]:
    """The shards' records in shard order, and within a shard in the problem order of its manifest and by
    sample index (shard files hold them in the order chains finished)."""
    out = []
    for res in results:
        manifest = res.path.with_suffix(".json")
        order = (
            {p: k for k, p in enumerate(json.loads(manifest.read_text())["problems"])}
            if manifest.exists()
            else {}
        )
        out += sorted(
            res.records(), key=lambda r: (order.get(r.problem_id, len(order)), r.problem_id, r.sample_index)
        )
    return out


@dataclass
class ChainsResult:
    """Every labelled chain of a run in one JSONL file, and its counts per task (``verdict_counts``)."""

    path: Path
    per_task: dict[str, dict[str, Any]]

    @property
    def chains(self) -> int:
        return sum(t["chains"] for t in self.per_task.values())

    @property
    def correct(self) -> int:
        return sum(t["correct"] for t in self.per_task.values())

    def files(self) -> list[Path]:
        """The files this result stands for (a cached result whose files are gone is recomputed)."""
        return [self.path]

    def records(self) -> list[ChainRecord]:
        return list(read_jsonl(self.path))


def pool_chains(own: ChainsResult, teacher: ChainsResult, out: str | Path) -> ChainsResult:
    """A round's own chains plus the teacher's *correct* chains, in one file: paired, the teacher's correct
    chains are chosen over the student's incorrect ones when the student has few correct chains of its own."""
    out = Path(out)
    chains = list(read_jsonl(own.path)) + [r for r in read_jsonl(teacher.path) if r.verdict == "correct"]
    tmp = out.with_name(f".{out.name}.tmp")
    write_jsonl(chains, tmp)
    os.replace(tmp, out)
    return ChainsResult(out, verdict_counts(chains))


def gather_chains(shards: Sequence[ShardResult], out: str | Path) -> ChainsResult:
    """The shards' labelled chains, in shard order, in one file ``out`` (written whole, then renamed)."""
    out = Path(out)
    chains = read_shards(shards)
    tmp = out.with_name(f".{out.name}.tmp")
    write_jsonl(chains, tmp)
    os.replace(tmp, out)
    return ChainsResult(out, verdict_counts(chains))
