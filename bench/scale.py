"""The sampler at the paper's shape, without a GPU: 100 problems x 1000 chains against a simulated engine.

Real parts: the simulated OpenAI-compatible server (``fcdpo.simserver``: real HTTP on 127.0.0.1, the time
of a batching engine with ``--max-batch`` sequences) in one process, ``fcdpo sample`` (the openai backend,
asynchronous, all shards in one window: by default the server's batch plus a quarter waiting in its queue)
in another, as a user runs them. The sampler is SIGKILLed at a random point and run again to resume; then
every (problem, sample) must be in the shard files exactly once. Measured from outside, twice a second in
the resumed run: the server's running batch against its maximum (``in_flight_ratio``: how full the engine
is kept), the requests in the server against the sampler's window, and the sampler's RSS (``/proc``) as
chains accumulate; chains/s against the server's modelled capacity; then the labels + pairs of all chains
(``fcdpo.pairs.build_pairs``).

    python bench/scale.py [--problems 100] [--samples 1000] [--max-batch 256] [--window N]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fcdpo.backends.base import default_window

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def chains_on_disk(out: Path) -> int:
    n = 0
    for f in out.glob("shard-*.jsonl"):
        with open(f, "rb") as fh:
            n += sum(chunk.count(b"\n") for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""))
    return n


def stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/stats", timeout=10) as r:
        return json.load(r)


def sample(args, out: Path, url: str, kill_at: int | None, marks: list[int]) -> dict:
    """Run ``fcdpo sample`` (SIGKILLed once ``kill_at`` chains are on disk, if given); watch its RSS and the
    chains on disk."""
    cmd = [
        str(BIN / "fcdpo"), "sample", "--problems", "arith", "--n-problems", str(args.problems),
        "--problem-seed", "1", "--samples", str(args.samples), "--out", str(out), "--backend", "openai",
        "--model", "simulated", "--backend-option", f"base_url={url}",
        "--backend-option", f"concurrency={args.max_batch}", "--backend-option", "timeout_s=20",
        "--shard-size", str(args.shard_size), "--max-tokens", "48", "--no-progress",
    ]  # fmt: skip
    if args.window:
        cmd += ["--window", str(args.window)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    peak, rss_at, running, waiting, handling = 0.0, {}, [], [], []
    last = 0.0
    while proc.poll() is None:
        time.sleep(0.5)
        rss = rss_mb(proc.pid)  # 0 once the process has exited
        peak, last = max(peak, rss), rss or last
        done = chains_on_disk(out)
        for m in marks:
            if m not in rss_at and done >= m and rss:
                rss_at[m] = round(rss, 1)
        s = stats(url)
        running.append(s["running_now"])
        waiting.append(s["waiting_now"])
        handling.append(s["handling_now"])
        if kill_at is not None and done >= kill_at:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return {
                "killed_at_chains": chains_on_disk(out),
                "seconds": time.monotonic() - t0,
                "rss_mb_at": rss_at,
                "peak_rss_mb": round(peak, 1),
            }
    stdout, stderr = proc.communicate()
    for m in marks:  # a mark reached only by the last chains: the RSS of the last look
        rss_at.setdefault(m, round(last, 1))
    if proc.returncode:
        raise RuntimeError(f"fcdpo sample failed:\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])

    def steady(xs: list[int]) -> float:  # the ramp-up and the tail are not steady state
        xs = xs[2:-2] or xs
        return round(sum(xs) / len(xs), 1)

    return {
        **summary,
        "peak_rss_mb": round(peak, 1),
        "rss_mb_at": rss_at,
        "mean_running": steady(running),
        "mean_waiting": steady(waiting),
        "mean_handling": steady(handling),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=10)
    ap.add_argument(
        "--window",
        type=int,
        help="the sampler's requests in flight (default: the batch plus a quarter, queued)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    total = args.problems * args.samples
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen(
        [sys.executable, "-m", "fcdpo.simserver", "--problems", f"arith:n={args.problems + 4},seed=1",
         "--port", str(port), "--max-batch", str(args.max_batch)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        print(server.stdout.readline().strip())
        with tempfile.TemporaryDirectory(prefix="fcdpo-scale-") as d:
            out = Path(d) / "shards"
            rng = random.Random(args.seed)
            t0 = time.monotonic()
            marks = [m for m in (10_000, total // 2, total) if m <= total]
            killed = sample(args, out, url, kill_at=int(total * rng.uniform(0.2, 0.6)), marks=marks)
            print(f"SIGKILL after {killed['seconds']:.0f} s, {killed['killed_at_chains']} chains on disk")
            run = sample(
                args, out, url, kill_at=None, marks=[m for m in marks if m > killed["killed_at_chains"]]
            )
            wall = time.monotonic() - t0
            s = stats(url)
            # exactly once: every (problem, sample) one line, none twice, none missing
            from fcdpo.records import read_jsonl

            keys: dict[tuple[str, int], int] = {}
            records = []
            for f in sorted(out.glob("shard-*.jsonl")):
                for r in read_jsonl(f):
                    keys[(r.problem_id, r.sample_index)] = keys.get((r.problem_id, r.sample_index), 0) + 1
                    records.append(r)
            exactly_once = len(keys) == total and set(keys.values()) == {1}
            # labels + pairs of all chains
            from fcdpo.pairs import PairsConfig, build_pairs
            from fcdpo.problems import load_source

            problems = {p.id: p for p in load_source("arith", n=args.problems + 4, seed=1)}
            t1 = time.perf_counter()
            pairs = build_pairs(
                records, problems, Path(d) / "pairs", None, PairsConfig(max_pairs_per_prompt=64)
            )
            pairs_s = time.perf_counter() - t1
        window = args.window or default_window(args.max_batch)
        tokens_per_chain = run["tokens_per_s"] / max(run["chains_per_s"], 1e-9)
        capacity_cps = s["capacity_tokens_per_s"] / tokens_per_chain
        day = 2000 * 1000
        print(
            f"resumed run: {run['sampled']} chains in {run['sampling_seconds']} s ({run['chains_per_s']} chains/s, "
            f"model capacity {capacity_cps:.0f}); engine batch {run['mean_running']} of {args.max_batch} running, {run['mean_waiting']} queued; requests in the server {run['mean_handling']} of a window of {window}; RSS "
            f"{run['rss_mb_at']} MB; pairs {pairs.n_pairs} in {pairs_s:.1f} s"
        )
        print(
            json.dumps(
                {
                    "chains": total,
                    "exactly_once": exactly_once,
                    "killed_at_chains": killed["killed_at_chains"],
                    "resumed": run["resumed"],
                    "in_flight_ratio": round(run["mean_running"] / args.max_batch, 3),
                    "window": window,
                    "requests_in_server_ratio": round(run["mean_handling"] / window, 3),
                    "chains_per_s": run["chains_per_s"],
                    "capacity_chains_per_s": round(capacity_cps, 1),
                    "capacity_ratio": round(run["chains_per_s"] / capacity_cps, 3),
                    "rss_mb_at_chains": {**killed["rss_mb_at"], **run["rss_mb_at"]},
                    "peak_rss_mb": max(killed["peak_rss_mb"], run["peak_rss_mb"]),
                    "pairs": pairs.n_pairs,
                    "pairs_seconds": round(pairs_s, 1),
                    "wall_seconds": round(wall, 1),
                    "server": {k: s[k] for k in ("requests", "mean_running", "capacity_tokens_per_s")},
                    "paper_day_workers_at_this_rate": round(day / (run["chains_per_s"] * 86400), 2),
                    "machine": f"{platform.machine()} cores={os.cpu_count()}",
                    "targets": {"in_flight_ratio": 0.95, "capacity_ratio": 0.9, "peak_rss_mb": 1024},
                }
            )
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)


if __name__ == "__main__":
    main()
