"""DPO training time: fcdpo's configured training vs TRL's default configuration, same pairs and steps.

- ours: ``fcdpo.training.train_dpo`` (reference log-probs precomputed once, gradient checkpointing off on
  CPU, bf16 autocast, only completion positions projected through the vocabulary, tool results masked);
  the reference pass is included in its time (a cold cache).
- TRL default: ``DPOTrainer`` with ``DPOConfig()`` defaults (gradient checkpointing on, bf16, reference =
  the disabled adapter recomputed every step, every position scored) on the same pairs as TRL's text
  format, the same LoRA, learning rate, batch size and number of steps.

Each side runs in its own subprocess (a clean process: no shared caches or patches). Last line: JSON with
``train_time_ratio_vs_trl_default`` (target <= 0.75).

    python bench/dpo.py [--steps 4] [--batch-size 4] [--pairs 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_pairs(out: Path, n_pairs: int) -> Path:
    """Preference pairs from real oracle chains on the default problem generators (student prompt)."""
    from fcdpo.agent import Agent, AgentLimits
    from fcdpo.backends.oracle import OracleBackend
    from fcdpo.labelling import label_records
    from fcdpo.pairs import PairsConfig, build_pairs
    from fcdpo.problems import ProblemSet, load_source
    from fcdpo.rollout import run_chains

    problems = ProblemSet.concat(
        "bench",
        [load_source("fol", n=24, seed=7, difficulty="easy"), load_source("arith", n=24, seed=7, steps=1)],
    )
    chains = run_chains(
        Agent(limits=AgentLimits(max_steps=12, max_tries=2)),
        OracleBackend(list(problems), error_rate=0.35),
        list(problems),
        6,
        base_seed=1,
    )
    by_id = problems.by_id()
    result = build_pairs(label_records(chains, by_id), by_id, out, config=PairsConfig(max_pairs_per_prompt=2))
    import pyarrow.parquet as pq

    table = pq.read_table(str(result.parquet)).slice(0, n_pairs)
    path = out / f"pairs-{n_pairs}.parquet"
    pq.write_table(table, str(path))
    return path


def run_ours(pairs: str, model: str, out: str, steps: int, bs: int, lr: float) -> float:
    from fcdpo.training import TrainingConfig, train_dpo

    cfg = TrainingConfig(max_steps=steps, batch_size=bs, learning_rate=lr, save_steps=10_000)
    t0 = time.perf_counter()
    train_dpo(pairs, model, out, cfg, cache_dir=Path(out) / "ref")
    return time.perf_counter() - t0


def run_trl_default(pairs: str, model: str, out: str, steps: int, bs: int, lr: float) -> float:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    data = datasets.Dataset.from_parquet(pairs).select_columns(["prompt", "chosen", "rejected"])
    args = DPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=bs, learning_rate=lr,
        report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    DPOTrainer(model=m, args=args, train_dataset=data, processing_class=tok, peft_config=lora).train()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--pairs-file", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.side:  # one side, in its own process
        fn = run_ours if args.side == "ours" else run_trl_default
        secs = fn(args.pairs_file, args.model, args.out, args.steps, args.batch_size, args.lr)
        print(json.dumps({"seconds": secs}))
        return

    from fcdpo.models import resolve_model

    model = str(resolve_model("gemma-3-270m").path)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = make_pairs(Path(tmp) / "pairs", args.pairs)
        secs = {}
        for side in ("trl", "ours"):
            out = subprocess.run(
                [sys.executable, __file__, "--side", side, "--pairs-file", str(pairs), "--model", model,
                 "--out", str(Path(tmp) / side), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                 "--lr", str(args.lr)],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            if out.returncode != 0:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            secs[side] = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
            print(f"{side}: {secs[side]:.1f} s for {args.steps} steps", file=sys.stderr)
    print(
        json.dumps(
            {
                "train_time_ratio_vs_trl_default": round(secs["ours"] / secs["trl"], 3),
                "ours_seconds": round(secs["ours"], 1),
                "trl_default_seconds": round(secs["trl"], 1),
                "steps": args.steps,
                "batch_size": args.batch_size,
                "pairs": args.pairs,
                "model": "gemma-3-270m",
                "machine": f"{platform.machine()} cores={os.cpu_count()}",
                "target": {"train_time_ratio_vs_trl_default": 0.75},
            }
        )
    )


if __name__ == "__main__":
    main()
