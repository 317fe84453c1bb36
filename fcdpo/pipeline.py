"""The method, top to bottom, as plain functions (the Prefect flows wrap these same calls).

problems -> teacher prompt (few-shot demos) -> sample N chains per problem -> label -> pairs
(-> DPO -> evaluate before/after: the training and evaluation issues add these stages)
"""

from __future__ import annotations

import inspect
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcdpo.agent import Agent, PromptSpec
from fcdpo.backends import BACKENDS, Backend, SamplingParams
from fcdpo.config import RunConfig
from fcdpo.demos import with_demonstrations
from fcdpo.labelling import label_records
from fcdpo.pairs import PairsResult, build_pairs
from fcdpo.problems import Problem, ProblemSet, load_source
from fcdpo.records import ChainRecord, write_jsonl
from fcdpo.sampling import read_shards, sample_problems


def load_problems(cfg: RunConfig) -> tuple[ProblemSet, ProblemSet]:
    """All configured sources, concatenated, split into train/test by id hash."""
    sets = [load_source(s.source, **s.params) for s in cfg.problems.sources]
    tf = cfg.problems.test_fraction
    everything = ProblemSet.concat("problems", sets).with_splits(
        {"train": 1 - tf, "test": tf}, cfg.problems.split_salt
    )
    train, test = everything.split("train"), everything.split("test")
    if cfg.problems.max_train:
        train = train.head(cfg.problems.max_train)
    if cfg.problems.max_test:
        test = test.head(cfg.problems.max_test)
    return train, test


def teacher_prompt(cfg: RunConfig, train: ProblemSet) -> tuple[PromptSpec, ProblemSet]:
    """The teacher's prompt with demonstrations from training problems, and the problems left to sample."""
    limits = cfg.agent.model_copy(update={"max_steps": 64})
    return with_demonstrations(cfg.teacher.prompt, train, cfg.teacher.n_demonstrations, limits)


def make_backend(
    name: str, model: str, options: dict[str, Any], problems: ProblemSet | None = None
) -> Backend:
    factory = BACKENDS.get(name)
    kwargs = dict(options)
    if "problems" in inspect.signature(factory).parameters or name == "oracle":
        kwargs["problems"] = list(problems or ())
    if "model" in inspect.signature(factory).parameters:
        kwargs["model"] = model
    return factory(**kwargs)


def sample(
    cfg: RunConfig, backend: Backend, prompt: PromptSpec, problems: ProblemSet, out_dir: Path
) -> list[ChainRecord]:
    """N chains per problem through the sharded, resumable sampler (one engine for every shard)."""
    s = cfg.teacher.sampling
    agent = Agent(prompt, cfg.agent, model_id=backend.model_id, chat=backend.chat)
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens_per_step)
    results = sample_problems(
        agent,
        backend,
        problems,
        s.samples_per_problem,
        params,
        out_dir,
        s.seed,
        s.shard_size,
        progress=s.progress,
    )
    return read_shards(results)


@dataclass
class RunResult:
    out_dir: Path
    train: ProblemSet
    test: ProblemSet
    chains: list[ChainRecord]
    pairs: PairsResult
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        verdicts = Counter((r.task, r.verdict) for r in self.chains)
        tasks = sorted({t for t, _ in verdicts})
        return {
            "out_dir": str(self.out_dir),
            "train_problems": len(self.train),
            "test_problems": len(self.test),
            "chains": len(self.chains),
            "per_task": {
                t: {
                    "chains": sum(v for (tt, _), v in verdicts.items() if tt == t),
                    "correct": verdicts.get((t, "correct"), 0),
                    "verdicts": {v: c for (tt, v), c in verdicts.items() if tt == t},
                    "pairs": sum(c["n_pairs"] for c in self.pairs.counts if c["task"] == t),
                }
                for t in tasks
            },
            "pairs": self.pairs.n_pairs,
            "prompts_with_pairs": self.pairs.n_prompts,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


def run(cfg: RunConfig) -> RunResult:
    out = Path(cfg.out_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    t: dict[str, float] = {}

    t0 = time.perf_counter()
    train, test = load_problems(cfg)
    prompt, sample_set = teacher_prompt(cfg, train)
    t["problems"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with make_backend(
        cfg.teacher.backend, cfg.teacher.model, cfg.teacher.backend_options, sample_set
    ) as backend:
        chains = sample(cfg, backend, prompt, sample_set, out / "shards")
    t["sampling"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    by_id = {p.id: p for p in train}
    chains = label_records(chains, by_id, cfg.pairs.require_stop)
    write_jsonl(chains, out / "chains.jsonl")
    t["labelling"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pairs = build_pairs(chains, by_id, out / "pairs", cfg.student.prompt, cfg.pairs)
    t["pairs"] = time.perf_counter() - t0

    result = RunResult(out, train, test, chains, pairs, t)
    (out / "summary.json").write_text(json.dumps(result.summary(), indent=2))
    return result


def problems_by_id(*sets: ProblemSet) -> dict[str, Problem]:
    return {p.id: p for s in sets for p in s}
