"""Preference pairs from labelled chains (the paper's augmentation: D_w x D_l per prompt).

For each prompt (problem), every correct chain (D_w) can pair with every incorrect one (D_l):
|D_a| = |D_w| x |D_l|. Strategies (registry ``PAIR_STRATEGIES``) choose which pairs to keep:

- ``all``: every pair, or a seeded uniform sample of ``max_pairs_per_prompt`` of them (sampled by index,
  so the full product is never materialised);
- ``best_vs_worst``: one pair per prompt, the cleanest correct chain vs the worst incorrect one.

Filters beside them: ``dedup`` (identical completions count once), ``strip_failed_tries`` (the student is
trained on the valid turns only), ``drop_no_contrast`` (prompts without both verdicts, and pairs whose two
completions render identically, are left out).

The output is TRL's preference format: ``prompt``, ``chosen``, ``rejected``. ``prompt`` is the *student's*
prompt (no teacher demonstrations); plain text for the transcript format, messages for chat. Beside them,
``chosen_messages`` / ``rejected_messages`` (JSON) keep the turn structure, so training can tell the model's
turns from the tool results that the environment wrote (``fcdpo.training`` masks the latter). Chains stream
in: only one compact copy of the turns per distinct chain is held, never the pairs.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from fcdpo.agent import PromptBuilder, PromptSpec
from fcdpo.labelling import AutoLabeller, Verdict
from fcdpo.problems.base import Problem
from fcdpo.records import ChainRecord, Message
from fcdpo.registry import Registry
from fcdpo.schema import ConfigModel
from fcdpo.toolsets import TOOLSETS

INCORRECT = {Verdict.WRONG_ANSWER, Verdict.NO_ANSWER, Verdict.FORMAT_ERROR, Verdict.STEP_LIMIT}
# how bad an incorrect chain is, for best_vs_worst (higher is worse)
SEVERITY = {Verdict.WRONG_ANSWER: 1, Verdict.NO_ANSWER: 2, Verdict.STEP_LIMIT: 3, Verdict.FORMAT_ERROR: 4}


class PairsConfig(ConfigModel):
    strategy: Literal["all", "best_vs_worst", "random_pair"] | str = Field(
        "all",
        description="registered pair strategy: all (D_w x D_l, optionally capped), best_vs_worst, or "
        "random_pair (one seeded random correct x incorrect pair per prompt)",
    )
    max_pairs_per_prompt: int | None = Field(
        4,
        ge=1,
        description="cap per prompt: a seeded uniform sample of the D_w x D_l pairs; null = all pairs",
    )
    dedup: bool = Field(True, description="identical completions within a prompt count once")
    drop_no_contrast: bool = Field(
        True, description="leave out prompts without both a correct and an incorrect chain"
    )
    strip_failed_tries: bool = Field(
        True, description="remove failed tries (invalid reply + error) from completions"
    )
    rejected_keeps_failed_tries: bool = Field(
        False,
        description="keep the failed tries in rejected completions (strip_failed_tries then applies to chosen "
        "ones only): a weak student's incorrect chains are often nothing but failed tries, which stripped "
        "leave an empty rejected completion (no signal); kept, DPO pushes down the replies that failed",
    )
    seed: int = Field(0, description="seed of the pair sampling")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "require_stop" in data:
            raise ValueError("require_stop moved to the labelling section: labelling.require_stop")
        return data


# A candidate chain is a plain tuple (turns as JSON, sample_index, verdict, n_steps, n_failed) of str/int.
# A million of them stay alive while chains stream in; exact tuples of atoms are untracked by Python's
# cyclic GC, so holding them costs no collector time (dataclass or NamedTuple instances would be re-scanned).
Candidate = tuple[str, int, str, int, int]
TEXT, INDEX, VERDICT, STEPS, FAILED = range(5)


@dataclass
class PromptGroup:
    problem: Problem
    correct: list[Candidate] = field(default_factory=list)
    incorrect: list[Candidate] = field(default_factory=list)
    seen_correct: set[str] = field(default_factory=set)
    seen_incorrect: set[str] = field(default_factory=set)
    n_chains: int = 0
    n_aborted: int = 0


def decode_turns(turns_json: str) -> list[Message]:
    """The ``chosen_messages`` / ``rejected_messages`` column back to messages."""
    return [Message(role=role, content=content) for role, content in json.loads(turns_json)]


Strategy = Callable[[PromptGroup, PairsConfig, random.Random], Iterator[tuple[Candidate, Candidate]]]
PAIR_STRATEGIES: Registry[Strategy] = Registry("pair strategy")


@PAIR_STRATEGIES.register("all")
def all_pairs(g: PromptGroup, cfg: PairsConfig, rng: random.Random) -> Iterator[tuple[Candidate, Candidate]]:
    n_w, n_l = len(g.correct), len(g.incorrect)
    total = n_w * n_l
    cap = cfg.max_pairs_per_prompt
    indices: Iterable[int] = (
        range(total) if cap is None or cap >= total else sorted(rng.sample(range(total), cap))
    )
    for k in indices:
        yield g.correct[k // n_l], g.incorrect[k % n_l]


@PAIR_STRATEGIES.register("best_vs_worst")
def best_vs_worst(
    g: PromptGroup, cfg: PairsConfig, rng: random.Random
) -> Iterator[tuple[Candidate, Candidate]]:
    if g.correct and g.incorrect:
        best = min(g.correct, key=lambda c: (c[FAILED], c[STEPS], c[INDEX]))
        worst = max(g.incorrect, key=lambda c: (SEVERITY[Verdict(c[VERDICT])], c[FAILED], -c[INDEX]))
        yield best, worst


@PAIR_STRATEGIES.register("random_pair")
def random_pair(
    g: PromptGroup, cfg: PairsConfig, rng: random.Random
) -> Iterator[tuple[Candidate, Candidate]]:
    if g.correct and g.incorrect:
        yield rng.choice(g.correct), rng.choice(g.incorrect)


class PairBuilder:
    """Feed labelled (or unlabelled) chain records with :meth:`add`; iterate :meth:`rows` for pairs."""

    def __init__(
        self,
        problems: dict[str, Problem],
        student: PromptSpec | None = None,
        config: PairsConfig | None = None,
        labeller: AutoLabeller | None = None,
    ):
        """``labeller`` labels records that come without a verdict (default: auto, Stop() required)."""
        self.problems = problems
        self.spec = (student or PromptSpec()).model_copy(update={"demonstrations": {}})
        self.cfg = config or PairsConfig()
        self.strategy = PAIR_STRATEGIES.get(self.cfg.strategy)
        self.labeller = labeller or AutoLabeller()
        self.groups: dict[str, PromptGroup] = {}
        self.builders: dict[str, PromptBuilder] = {}
        self.chat = self.spec.format == "chat"

    def builder(self, toolset: str) -> PromptBuilder:
        if toolset not in self.builders:
            self.builders[toolset] = PromptBuilder(TOOLSETS.get(toolset), self.spec)
        return self.builders[toolset]

    def add(self, r: ChainRecord) -> None:
        problem = self.problems.get(r.problem_id)
        if problem is None:
            raise KeyError(f"chain record for unknown problem {r.problem_id!r}")
        g = self.groups.get(r.problem_id)
        if g is None:
            g = self.groups[r.problem_id] = PromptGroup(problem)
        g.n_chains += 1
        verdict = Verdict(r.verdict) if r.verdict is not None else self.labeller(r, problem).verdict
        if verdict is Verdict.ABORTED:
            g.n_aborted += 1
            return
        good = verdict is Verdict.CORRECT
        strip = self.cfg.strip_failed_tries and (good or not self.cfg.rejected_keeps_failed_tries)
        msgs = [m for m in r.messages if not m.failed] if strip else r.messages
        text = json.dumps([[m.role, m.content] for m in msgs], ensure_ascii=False, separators=(",", ":"))
        if self.cfg.dedup:
            seen = g.seen_correct if good else g.seen_incorrect
            if text in seen:
                return
            seen.add(text)
        cand = (text, r.sample_index, verdict.value, r.n_steps, r.n_failed)
        (g.correct if good else g.incorrect).append(cand)

    def add_all(self, records: Iterable[ChainRecord]) -> PairBuilder:
        for r in records:
            self.add(r)
        return self

    def rows(self) -> Iterator[dict[str, Any]]:
        """Pairs in TRL's format plus provenance columns; each prompt's group is freed once paired."""
        for pid in sorted(self.groups):
            g = self.groups[pid]
            g.seen_correct.clear()
            g.seen_incorrect.clear()
            rng = random.Random(f"{self.cfg.seed}:{pid}")
            builder = self.builder(g.problem.toolset)
            prompt = builder.initial(g.problem)
            for w, lose in self.strategy(g, self.cfg, rng):
                chosen, rejected = self._render(builder, w[TEXT]), self._render(builder, lose[TEXT])
                if self.cfg.drop_no_contrast and chosen == rejected:
                    continue
                yield {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_messages": w[TEXT],
                    "rejected_messages": lose[TEXT],
                    "toolset": g.problem.toolset,
                    "problem_id": pid,
                    "task": g.problem.task,
                    "chosen_sample": w[INDEX],
                    "rejected_sample": lose[INDEX],
                    "chosen_verdict": w[VERDICT],
                    "rejected_verdict": lose[VERDICT],
                }

    def correct_rows(self) -> Iterator[dict[str, Any]]:
        """Every (deduplicated) correct chain in the student's prompt, for the SFT baseline (rejection-sampling
        fine-tuning): from every prompt with a correct chain, contrast or not."""
        for pid in sorted(self.groups):
            g = self.groups[pid]
            builder = self.builder(g.problem.toolset)
            prompt = builder.initial(g.problem)
            for c in g.correct:
                yield {
                    "prompt": prompt,
                    "completion": self._render(builder, c[TEXT]),
                    "messages": c[TEXT],
                    "toolset": g.problem.toolset,
                    "problem_id": pid,
                    "task": g.problem.task,
                    "sample": c[INDEX],
                }

    @staticmethod
    def _render(builder: PromptBuilder, turns_json: str):
        return builder.completion(decode_turns(turns_json))

    def counts(self, n_pairs: dict[str, int]) -> list[dict[str, Any]]:
        out = []
        for pid in sorted(self.groups):
            g = self.groups[pid]
            contrast = bool(g.correct and g.incorrect)
            if self.cfg.drop_no_contrast and not contrast:
                continue
            out.append(
                {
                    "problem_id": pid,
                    "task": g.problem.task,
                    "n_chains": g.n_chains,
                    "n_aborted": g.n_aborted,
                    "n_correct": len(g.correct),
                    "n_incorrect": len(g.incorrect),
                    "n_possible": len(g.correct) * len(g.incorrect),
                    "n_pairs": n_pairs.get(pid, 0),
                }
            )
        return out


@dataclass
class PairsResult:
    out_dir: Path
    n_pairs: int
    n_prompts: int
    counts: list[dict[str, Any]]
    n_correct: int = 0

    @property
    def parquet(self) -> Path:
        return self.out_dir / "pairs.parquet"

    @property
    def correct_parquet(self) -> Path:
        """Every correct chain in the student's prompt (``PairBuilder.correct_rows``): the SFT baseline's data."""
        return self.out_dir / "correct.parquet"

    def files(self) -> list[Path]:
        """The files this result stands for (a cached result whose files are gone is recomputed)."""
        return [self.parquet, self.correct_parquet]

    def per_task(self) -> dict[str, int]:
        """Pairs per task."""
        out: dict[str, int] = {}
        for c in self.counts:
            out[c["task"]] = out.get(c["task"], 0) + c["n_pairs"]
        return out

    def load_dataset(self):
        import datasets

        return datasets.Dataset.from_parquet(str(self.parquet))


@contextlib.contextmanager
def _atomic_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir``, renamed to it when the block ends without error (and removed
    when it fails): no half-written output."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_pairs(
    builder: PairBuilder, out_dir: str | Path, save_dataset: bool = True, batch_size: int = 2048
) -> PairsResult:
    """Stream the builder's pairs to ``out_dir/pairs.parquet`` (+ ``correct.parquet``, ``counts.jsonl``,
    ``dataset/``).

    Written into a temporary folder beside ``out_dir`` and renamed at the end: no half-written output.
    """
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir) as tmp:
        writer: pq.ParquetWriter | None = None
        batch: list[dict[str, Any]] = []
        per_prompt: dict[str, int] = {}
        n = 0

        def flush() -> None:
            nonlocal writer
            table = (
                pa.Table.from_pylist(batch)
                if writer is None
                else pa.Table.from_pylist(batch, schema=writer.schema)
            )
            if writer is None:
                writer = pq.ParquetWriter(str(tmp / "pairs.parquet"), table.schema)
            writer.write_table(table)
            batch.clear()

        for row in builder.rows():
            batch.append(row)
            per_prompt[row["problem_id"]] = per_prompt.get(row["problem_id"], 0) + 1
            n += 1
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        if writer is None:  # no pairs: an empty table with the pair columns
            empty = pa.table(
                {c: pa.array([], pa.string()) for c in ("prompt", "chosen", "rejected", "problem_id")}
            )
            pq.write_table(empty, str(tmp / "pairs.parquet"))
        else:
            writer.close()
        correct = list(builder.correct_rows())
        table = (
            pa.Table.from_pylist(correct)
            if correct
            else pa.table({c: pa.array([], pa.string()) for c in ("prompt", "completion", "problem_id")})
        )
        pq.write_table(table, str(tmp / "correct.parquet"))
        counts = builder.counts(per_prompt)
        with open(tmp / "counts.jsonl", "w") as f:
            for c in counts:
                f.write(json.dumps(c) + "\n")
        if save_dataset and n:
            import datasets

            datasets.Dataset.from_parquet(str(tmp / "pairs.parquet")).save_to_disk(str(tmp / "dataset"))
    return PairsResult(out_dir, n, len(per_prompt), counts, len(correct))


def build_pairs(
    records: Iterable[ChainRecord],
    problems: dict[str, Problem],
    out_dir: str | Path,
    student: PromptSpec | None = None,
    config: PairsConfig | None = None,
    labeller: AutoLabeller | None = None,
    save_dataset: bool = True,
) -> PairsResult:
    """Label (where needed) and pair streamed chain records, and write the pairs."""
    builder = PairBuilder(problems, student, config, labeller)
    return write_pairs(builder.add_all(records), out_dir, save_dataset)


def concat_pairs(results: Iterable[PairsResult], out_dir: str | Path) -> PairsResult:
    """Several pair sets as one (later rounds training on every round's pairs so far): ``pairs.parquet``,
    ``correct.parquet`` and ``counts.jsonl`` concatenated in order; written whole or not at all."""
    results = list(results)
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir) as tmp:
        for name in ("pairs.parquet", "correct.parquet"):
            tables = [pq.read_table(str(r.out_dir / name)) for r in results if (r.out_dir / name).is_file()]
            tables = [t for t in tables if t.num_rows] or tables[:1]
            pq.write_table(pa.concat_tables(tables, promote_options="default"), str(tmp / name))
        counts = [c for r in results for c in r.counts]
        (tmp / "counts.jsonl").write_text("".join(json.dumps(c) + "\n" for c in counts))
    return PairsResult(
        out_dir,
        sum(r.n_pairs for r in results),
        sum(r.n_prompts for r in results),
        counts,
        sum(r.n_correct for r in results),
    )
