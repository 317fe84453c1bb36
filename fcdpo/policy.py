"""The policy: whatever writes chains.

The method has one kind of actor: a model, served by a backend, answering in a prompt (the teacher's with
worked demonstrations, the student's zero-shot), with sampling settings and optionally a LoRA adapter on top.
The teacher sampling N chains per problem, the untrained student sampling its own (on-policy) chains, round
k's student sampling on the training problems, and every evaluation are the same act by different policies:
``sample(policy, problems)`` / ``evaluate(policy, problems)``. A :class:`Policy` knows its identity in cache
keys (name + weights hash, plus its adapter's files), the engine that serves it and the load it puts on it.

    teacher = Policy.teacher(cfg, prompt)          # few-shot prompt from fcdpo.stages.teacher_prompt
    student = Policy.student(cfg)                  # the untrained student, as evaluated
    trained = Policy.student(cfg, adapter=path)    # base + the trained adapter
    own = Policy.on_policy(cfg, model)             # a student sampling its own chains (rounds >= 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from fcdpo.agent import Agent, AgentLimits, PromptSpec
from fcdpo.backends import EngineSpec, Workload
from fcdpo.config import RunConfig, SamplingConfig
from fcdpo.hashing import identity
from fcdpo.problems import Problem

__all__ = ["Policy"]


class Policy(BaseModel):
    """A model that writes chains: its weights (``model``, plus ``adapter``), how it is served (``backend``
    with ``backend_options``), what it is shown (``prompt``) and how it samples (``sampling``; None where
    the caller decides, as evaluation does: greedy plus its own pass@k samples)."""

    model: str = Field(description="model name, HF id or local folder")
    backend: str = Field("vllm", description="registered backend that serves it")
    backend_options: dict[str, Any] = Field(default_factory=dict, description="backend keyword arguments")
    prompt: PromptSpec = Field(default_factory=PromptSpec, description="the prompt it answers in")
    sampling: SamplingConfig | None = Field(None, description="sampling settings (None: set by the caller)")
    adapter: str | None = Field(None, description="a LoRA adapter folder applied on top of the model")
    adapter_mode: str = Field("merged", description="merged (a merged copy) or lora (vLLM's LoRA support)")
    lora_rank: int | None = Field(None, description="vLLM's max LoRA rank (lora mode only)")
    setting: str = Field(
        "backend_options", exclude=True, description="the config key of its options (named in errors)"
    )

    # ------------------------------------------------------------------ the policies of a run

    @classmethod
    def teacher(cls, cfg: RunConfig, prompt: PromptSpec) -> Policy:
        """The teacher in its few-shot ``prompt``, sampling with ``teacher.sampling``."""
        t = cfg.teacher
        return cls(
            model=t.model, backend=t.backend, backend_options=t.backend_options, prompt=prompt,
            sampling=t.sampling, setting="teacher.backend_options",
        )  # fmt: skip

    @classmethod
    def student(
        cls, cfg: RunConfig, model: str | Path | None = None, adapter: str | Path | None = None
    ) -> Policy:
        """The student as evaluated: ``model`` (default ``student.model``) in its own prompt, base or base +
        ``adapter`` served as ``evaluation.adapter_mode`` says. Nothing of its training is part of it, so
        runs that differ only in training share the untrained student's evaluation."""
        s, lora = cfg.student, cfg.evaluation.adapter_mode == "lora" and adapter is not None
        return cls(
            model=str(model or s.model), backend=s.backend, backend_options=s.backend_options, prompt=s.prompt,
            adapter=str(adapter) if adapter is not None else None, adapter_mode=cfg.evaluation.adapter_mode,
            lora_rank=max(16, s.training.lora.r) if lora else None, setting="student.backend_options",
        )  # fmt: skip

    @classmethod
    def on_policy(cls, cfg: RunConfig, model: str | Path | None = None, samples: int | None = None) -> Policy:
        """A student sampling its own chains: the untrained one (``student.on_policy_samples``) or round k's
        (a merged model folder): its zero-shot prompt, the student's backend, ``samples`` (default
        ``student.round.samples_per_problem``, else the teacher's N) chains per problem at
        ``student.round.temperature``, the teacher's other sampling settings."""
        r, s = cfg.student.round, cfg.teacher.sampling
        n = samples or r.samples_per_problem or s.samples_per_problem
        sampling = s.model_copy(update={"samples_per_problem": n, "temperature": r.temperature})
        return cls.student(cfg, model).model_copy(update={"sampling": sampling})

    # ------------------------------------------------------------------ what it is and what serves it

    def identity(self) -> str:
        """Its model in cache keys and records: ``name@weights-hash`` for weights fcdpo loads, the
        backend-qualified name for the others (``openai:...``, ``oracle:...``)."""
        from fcdpo.models import model_identity

        return model_identity(self.model, self.backend)

    def cache_identity(self) -> dict[str, Any]:
        """What ``fcdpo.hashing.identity`` keys it by: the model's identity (weights, not its path), its
        other settings, and its adapter's files."""
        fields = self.model_dump(mode="json", exclude={"model", "adapter"})
        adapter = identity(Path(self.adapter)) if self.adapter else None
        return {"model": self.identity(), "settings": fields, "adapter": adapter}

    def engine(self) -> EngineSpec:
        """The engine that serves it: the model, or base + adapter as a merged copy (cached by hash) or
        through vLLM's LoRA support (``adapter_mode: lora``)."""
        base = EngineSpec(self.backend, self.model, self.backend_options, self.setting)
        if self.adapter is None:
            return base
        if self.adapter_mode == "merged":
            from fcdpo.models import merge_adapter, resolve_model

            merged = merge_adapter(resolve_model(self.model), self.adapter)
            return EngineSpec(self.backend, str(merged.path), self.backend_options, self.setting)
        options = {**self.backend_options, "enable_lora": True, "max_lora_rank": self.lora_rank or 16}
        return EngineSpec(self.backend, self.model, options, self.setting, str(Path(self.adapter).resolve()))

    def workload(
        self, problems: Sequence[Problem], limits: AgentLimits, samples: int | None = None,
        reply_tokens: int | None = None,
    ) -> Workload:  # fmt: skip
        """What its engine holds for ``problems``: ``samples`` chains of each (default: its sampling's N) in
        flight at once, each as long as ``limits`` let it grow with ``reply_tokens`` per reply."""
        s = self.sampling
        if s is None and (samples is None or reply_tokens is None):
            raise ValueError("a policy without sampling settings needs samples and reply_tokens")
        n = samples if samples is not None else s.samples_per_problem  # type: ignore[union-attr]
        tokens = reply_tokens if reply_tokens is not None else s.max_tokens_per_step  # type: ignore[union-attr]
        return Agent(self.prompt, limits).workload(list(problems), n, tokens)

    def with_model(self, model: str | Path) -> Policy:
        """The same policy on other weights (a round's merged student)."""
        return self.model_copy(update={"model": str(model)})
