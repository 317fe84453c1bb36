"""DPO training of the student: TRL ``DPOTrainer`` + PEFT LoRA (QLoRA on GPUs), multi-turn masking.

Top to bottom, :func:`train_dpo` does::

    pairs.parquet --tokenize_pairs--> prompt_ids, chosen_ids/mask, rejected_ids/mask
                  --reference log-probs (cached by content hash)--> DPOTrainer(LoRA) --> adapter + manifest

**Masking tool results.** A chain's completion interleaves the model's calls with the results that the
environment wrote. Only the model's turns are scored: the pair rows keep the turns
(``chosen_messages``), the completion is rendered turn by turn with the *same* :class:`PromptBuilder` used
for sampling and evaluation, and every token whose first character lies in a tool result (or, in chat
format, in the template's generation prompt) gets mask 0. TRL builds its labels as
``input_ids.masked_fill(completion_mask == 0, -100)``, so the DPO log-probabilities, the SFT term and the
reference log-probabilities all sum over the model's own tokens only. Prompt + completion is tokenised
as one string, exactly the text the agent sends to vLLM at the last step, so training sees the
evaluation-time bytes.

**CPU-safe settings**, chosen deliberately (TRL 1.16, measured in ``bench/dpo.py``):

- ``gradient_checkpointing`` off on CPU (TRL defaults it on; it recomputes every forward);
- bf16 autocast only where the CPU has native bf16 (AVX512-BF16/AMX): on this 2-core machine without it,
  a DPO step on gemma-3-270m took 44 s under bf16 autocast and 17 s in float32 (TRL defaults bf16 on).
  bf16 on a CPU is not bitwise reproducible: the same run repeated gave weights up to 3.2e-4 apart in 2
  of 5 tries (float32: the same bits in 6 of 6); set ``bf16: false`` where you need the same bits;
- the reference is PEFT's disabled adapter, and its log-probabilities are computed once and cached;
- TRL's fused LM head scores only labelled positions on Triton devices; elsewhere it projects *every*
  position through the vocabulary (262k for Gemma 3), prompt included. ``compact_logprobs`` makes it
  score only the labelled positions on CPU too (the same code path TRL takes on GPUs).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from fcdpo.agent import PromptBuilder, PromptSpec, chat_turn, resolve_format
from fcdpo.hashing import digest, file_sha256
from fcdpo.memory import TrainPlan, on_gpu, plan_training
from fcdpo.models import cpu_has_bf16
from fcdpo.pairs import decode_turns
from fcdpo.records import Message
from fcdpo.schema import ConfigModel
from fcdpo.toolsets import TOOLSETS

log = logging.getLogger("fcdpo")

MASKING_VERSION = "fcdpo-mask-v1"
METRIC_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "learning_rate",
    "grad_norm",
)


class LoraSettings(ConfigModel):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or all-linear"
    )


class TrainingConfig(ConfigModel):
    """DPO hyper-parameters. The defaults are the CPU pilot's (LoRA r16, sigmoid + SFT term, beta 0.1)."""

    objective: Literal["preference", "sft"] = Field(
        "preference",
        description="preference: DPO-family training on the pairs (loss_type picks DPO, IPO, RPO = sigmoid + "
        "sft); sft: the baseline of supervised fine-tuning on the correct chains only (rejection-sampling "
        "fine-tuning, TRL's SFTTrainer), tool results masked the same way",
    )
    loss_type: list[str] = Field(
        ["sigmoid", "sft"],
        description="TRL loss types, summed with loss_weights: sigmoid (DPO), ipo, sft (the NLL term on "
        "chosen, as in RPO), and TRL's others",
    )
    loss_weights: list[float] | None = Field([1.0, 1.0], description="one weight per loss type")
    beta: float = Field(0.1, gt=0, description="DPO temperature (IPO: the regularisation parameter)")
    learning_rate: float = Field(2e-4, gt=0, description="peak AdamW learning rate")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of steps with linear warm-up")
    num_train_epochs: float = Field(1.0, gt=0, description="passes over the pairs")
    max_steps: int = Field(-1, description="stop after this many optimiser steps (-1: by epochs)")
    batch_size: int = Field(4, ge=1, description="pairs per device per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimiser step")
    max_length: int = Field(1024, ge=16, description="tokens of prompt + completion (longer is cut)")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    seed: int = Field(0, description="seed of LoRA init, data order and dropout")
    save_steps: int = Field(10, ge=1, description="checkpoint every K optimiser steps (kill -> resume)")
    logging_steps: int = Field(1, ge=1, description="emit metrics every K steps")
    mask_tool_outputs: bool = Field(True, description="score only the model's turns, not tool results")
    precompute_ref: bool = Field(
        True, description="compute reference log-probs once before training and cache them"
    )
    compact_logprobs: bool = Field(
        True, description="score only completion positions on CPU (TRL does so only on GPUs)"
    )
    bf16: bool | None = Field(
        None,
        description="bf16 autocast; null = on GPUs with bf16 and CPUs with native bf16 (AVX512-BF16/AMX)",
    )
    gradient_checkpointing: bool | None = Field(None, description="null = on GPU only")
    quantization: Literal["auto", "none", "4bit"] = Field(
        "auto", description="4bit = QLoRA (bitsandbytes); auto = 4bit on GPU, none on CPU"
    )


# ------------------------------------------------------------------------------ tokenisation


def transcript_segments(builder: PromptBuilder, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """The completion as (text, written_by_model) pieces; their concatenation is ``completion()``."""
    segs = [(builder.completion([m]), m.role == "assistant") for m in messages]
    assert "".join(t for t, _ in segs) == builder.completion(messages)
    return segs


def chat_segments(tokenizer, prompt: list[dict], messages: Sequence[Message]) -> tuple[str, str, list]:
    """Render prompt + messages with the chat template, turn by turn: (prompt text, full text, model spans).

    A model turn's span runs from after the generation prompt to the end of its rendering (content and
    end-of-turn tokens); user turns and generation prompts are the environment's. Templates whose
    renderings are not prefixes of each other cannot be split this way and raise.
    """

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    msgs = list(prompt)
    prompt_text = render(msgs, True)
    spans = []
    prev = render(msgs, False)
    for m in messages:
        if m.role == "assistant":
            start = len(render(msgs, True))
        msgs.append(chat_turn(m))
        cur = render(msgs, False)
        if not cur.startswith(prev):
            raise ValueError(
                "the chat template does not render conversations incrementally (a turn changes earlier "
                "text), so model turns cannot be told from tool results; use prompt.format: transcript"
            )
        if m.role == "assistant":
            spans.append((start, len(cur)))
        prev = cur
    if not prev.startswith(prompt_text):
        raise ValueError("the chat template's generation prompt is not a prefix of the conversation")
    return prompt_text, prev, spans


def _encode(tokenizer, text: str, n_prompt_chars: int, spans: list[tuple[int, int]], special: bool):
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=special)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    n_prompt = sum(1 for s, e in offsets if s < n_prompt_chars or (s == e == 0))
    mask = []
    for s, _ in offsets[n_prompt:]:
        mask.append(int(any(a <= s < b for a, b in spans)))
    return ids[:n_prompt], ids[n_prompt:], mask


def tokenize_pair(
    tokenizer, builder: PromptBuilder, row: dict[str, Any], mask_tool_outputs: bool = True
) -> dict[str, list[int]]:
    """One pair row -> ``prompt_ids``, ``chosen_ids``/``chosen_mask``, ``rejected_ids``/``rejected_mask``."""
    out: dict[str, list[int]] = {}
    for side in ("chosen", "rejected"):
        messages = decode_turns(row[f"{side}_messages"])
        if builder.spec.format == "transcript":
            prompt = row["prompt"]
            spans, pos = [], len(prompt)
            for text, by_model in transcript_segments(builder, messages):
                if by_model or not mask_tool_outputs:
                    spans.append((pos, pos + len(text)))
                pos += len(text)
            full = prompt + builder.completion(messages)
            p_ids, c_ids, mask = _encode(tokenizer, full, len(prompt), spans, special=True)
        else:
            prompt_msgs = json.loads(row["prompt"]) if isinstance(row["prompt"], str) else row["prompt"]
            prompt, full, spans = chat_segments(tokenizer, prompt_msgs, messages)
            if not mask_tool_outputs:
                spans = [(len(prompt), len(full))]
            p_ids, c_ids, mask = _encode(tokenizer, full, len(prompt), spans, special=False)
        if "prompt_ids" in out and out["prompt_ids"] != p_ids:
            raise ValueError(
                f"pair {row.get('problem_id')}: chosen and rejected tokenise the prompt differently"
            )
        out["prompt_ids"] = p_ids
        out[f"{side}_ids"] = c_ids
        out[f"{side}_mask"] = mask
    return out


def tokenize_correct(tokenizer, rows: Sequence[dict[str, Any]], student: PromptSpec, mask: bool = True):
    """Correct chains (``PairsResult.correct_parquet`` rows) -> ``input_ids`` + ``labels`` (-100 on the prompt
    and, with ``mask``, on tool results): the SFT baseline's data, masked exactly as the pairs are."""
    import datasets

    builder = _builders(student)
    out = []
    for row in rows:
        pair = {
            "prompt": row["prompt"],
            "chosen_messages": row["messages"],
            "rejected_messages": row["messages"],
        }
        t = tokenize_pair(tokenizer, builder(row["toolset"]), pair, mask)
        ids = t["prompt_ids"] + t["chosen_ids"]
        labels = [-100] * len(t["prompt_ids"]) + [
            i if m else -100 for i, m in zip(t["chosen_ids"], t["chosen_mask"], strict=True)
        ]
        out.append({"input_ids": ids, "labels": labels})
    return datasets.Dataset.from_list(out)


def tokenize_pairs(tokenizer, rows: Sequence[dict[str, Any]], student: PromptSpec, mask: bool = True):
    """Every pair row tokenised with its toolset's student prompt builder (a ``datasets.Dataset``)."""
    import datasets

    builder = _builders(student)
    return datasets.Dataset.from_list(
        [tokenize_pair(tokenizer, builder(r["toolset"]), r, mask) for r in rows]
    )


def _builders(student: PromptSpec) -> Callable[[str], PromptBuilder]:
    """The student prompt builder of a toolset, made once per toolset."""
    made: dict[str, PromptBuilder] = {}

    def get(toolset: str) -> PromptBuilder:
        if toolset not in made:
            made[toolset] = PromptBuilder(TOOLSETS.get(toolset), student)
        return made[toolset]

    return get


def preference_collator(pad_token_id: int, max_length: int | None):
    """TRL's preference collator, with ``completion_mask`` taken from the per-token masks (tool results 0)."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class MaskedPreferenceCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            out = super().torch_call(examples)
            width = out["input_ids"].shape[1]
            rows = []
            for side in ("chosen", "rejected"):
                for ex in examples:
                    m = [0] * len(ex["prompt_ids"]) + list(ex[f"{side}_mask"])
                    m = m[: self.max_length] if self.max_length else m
                    rows.append(m + [0] * (width - len(m)))
            out["completion_mask"] = torch.tensor(rows, dtype=torch.long)
            return out

    return MaskedPreferenceCollator(pad_token_id=pad_token_id, max_length=max_length)


# ------------------------------------------------------------------------------------ trainer


@dataclass
class TrainResult:
    adapter_dir: Path
    manifest: dict[str, Any]
    history: list[dict[str, float]]
    seconds: float
    resumed_from: str | None

    @property
    def steps(self) -> int:
        return int(self.manifest["global_step"])

    def files(self) -> list[Path]:
        """The files this result stands for (a cached result whose files are gone is recomputed)."""
        return [self.adapter_dir]


MetricsSink = Callable[[int, dict[str, float]], None]


def _trainer_class():
    from trl import DPOTrainer

    class FcdpoDPOTrainer(DPOTrainer):
        """DPOTrainer on pre-tokenised, masked pairs, with reference log-probs cached by content hash."""

        def __init__(self, *args, ref_cache: Path | None = None, **kwargs):
            self._fcdpo_ref_cache = ref_cache
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # tokenised and masked by fcdpo.training.tokenize_pairs

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "chosen_mask", "rejected_mask"]

        def _precompute_ref_logps(self, dataset, name, batch_size):
            import numpy as np

            cache = self._fcdpo_ref_cache
            if cache is not None and cache.exists():
                arr = np.load(cache)
                if len(arr["chosen"]) == len(dataset):
                    dataset = dataset.add_column("ref_chosen_logps", arr["chosen"].tolist())
                    return dataset.add_column("ref_rejected_logps", arr["rejected"].tolist())
            dataset = super()._precompute_ref_logps(dataset, name, batch_size)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp.npz")
                np.savez(
                    tmp,
                    chosen=np.asarray(dataset["ref_chosen_logps"]),
                    rejected=np.asarray(dataset["ref_rejected_logps"]),
                )
                tmp.rename(cache)
            return dataset

    return FcdpoDPOTrainer


def _compact_logprobs_on_cpu() -> None:
    """Make TRL's fused LM head score only labelled positions off Triton devices (see module doc)."""
    import trl.trainer.utils as tu

    if getattr(tu, "_use_triton", None) is not None and not getattr(tu, "_fcdpo_compact", False):
        original = tu._use_triton
        tu._use_triton = lambda device: True if device.type == "cpu" else original(device)
        tu._fcdpo_compact = True


def _common_args(cfg: TrainingConfig, out_dir: Path, gpu: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` the DPO and SFT trainers share (the settings the module doc explains)."""
    bf16 = cfg.bf16 if cfg.bf16 is not None else (_bf16_gpu() if gpu else cpu_has_bf16())
    return dict(
        output_dir=str(out_dir / "checkpoints"),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        gradient_checkpointing=cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else gpu,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        logging_steps=cfg.logging_steps,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not gpu,
    )


def dpo_args(cfg: TrainingConfig, out_dir: Path, gpu: bool):
    """Our TRL ``DPOConfig`` for ``cfg``."""
    from trl import DPOConfig

    return DPOConfig(
        **_common_args(cfg, out_dir, gpu),
        loss_type=list(cfg.loss_type),
        loss_weights=list(cfg.loss_weights) if cfg.loss_weights else None,
        beta=cfg.beta,
        precompute_ref_log_probs=cfg.precompute_ref,
    )


def sft_args(cfg: TrainingConfig, out_dir: Path, gpu: bool):
    """Our TRL ``SFTConfig`` for ``cfg`` (the SFT baseline: pre-tokenised, labels already masked)."""
    from trl import SFTConfig

    return SFTConfig(**_common_args(cfg, out_dir, gpu), packing=False)


def _bf16_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_student(path: str | Path, quantization: str, gpu: bool):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if gpu:
        kwargs["dtype"] = torch.bfloat16 if _bf16_gpu() else torch.float16
        if quantization in ("auto", "4bit"):
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"],
            )
            kwargs["device_map"] = {"": 0}
    elif quantization == "4bit":
        raise ValueError("training.quantization: 4bit (QLoRA) needs a CUDA GPU; use auto or none on CPU")
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def memory_plan(model: str | Path, data, cfg: TrainingConfig, gpu: bool) -> TrainPlan:
    """The checked memory plan of one DPO step on these tokenised pairs (raises NotEnoughMemory)."""
    ids = zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True)
    longest = max(min(len(p) + max(len(c), len(r)), cfg.max_length) for p, c, r in ids)
    return plan_training(model, cfg.batch_size, longest, gpu=gpu).check()


def reachable(rows: list[dict[str, Any]], cfg: TrainingConfig) -> list[dict[str, Any]]:
    """The examples a run with ``max_steps`` reaches in its single pass: ``max_steps x batch x
    accumulation`` of them, a seeded sample (kept in file order; the trainer shuffles them), so the
    reference log-probs are computed only for examples that are trained on. All of them without
    ``max_steps`` or when they fit."""
    if cfg.max_steps <= 0:
        return rows
    n = cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps
    if n >= len(rows):
        return rows
    import random

    keep = sorted(random.Random(cfg.seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def ref_cache_key(pairs_digest: str, model_hash: str, student: PromptSpec, tok, cfg: TrainingConfig) -> str:
    """Reference log-probs depend on the pairs, the model, the template and how tokens are masked/cut."""
    return digest(
        {
            "pairs": pairs_digest,
            "model": model_hash,
            "template": [student.model_dump(), getattr(tok, "chat_template", None)],
            "masking": [MASKING_VERSION, cfg.mask_tool_outputs, cfg.max_length],
        },
        length=32,
    )


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The last complete ``checkpoint-N`` folder in ``checkpoints`` (None: none). The Trainer writes a
    checkpoint's ``trainer_state.json`` after its weights, optimizer and RNG state, so a folder without a
    readable one was cut by a kill while being written (transformers' ``get_last_checkpoint`` took it, and
    the resume failed: "Can't find a valid checkpoint")."""

    def complete(d: Path) -> bool:
        try:
            json.loads((d / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return False
        return True

    found = [
        (int(d.name.split("-", 1)[1]), d)
        for d in checkpoints.glob("checkpoint-*")
        if d.name.split("-", 1)[1].isdigit() and d.is_dir()
    ]
    return next((d for _, d in sorted(found, reverse=True) if complete(d)), None)


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the logged metrics up to the checkpoint we resume from (none on a fresh start)."""
    if path.exists():
        keep = [x for x in path.read_text().splitlines() if x and json.loads(x)["step"] <= step]
        path.write_text("".join(x + "\n" for x in keep))


def train_dpo(
    pairs_parquet: str | Path,
    model: str | Path,
    out_dir: str | Path,
    cfg: TrainingConfig | None = None,
    student: PromptSpec | None = None,
    model_id: str = "",
    model_hash: str = "",
    callbacks: Sequence[MetricsSink] = (),
    cache_dir: str | Path | None = None,
    init_adapter: str | Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``pairs_parquet``; resumes from the last checkpoint in ``out_dir``.

    ``cfg.objective`` picks DPO-family training on the pairs (``preference``) or the SFT baseline on the
    correct chains written beside them (``sft``: ``correct.parquet`` in the pairs folder).
    ``model`` is a local HF folder (see ``fcdpo.models.resolve_model``); ``student`` must be the prompt
    spec the pairs were built with (its format decides transcript vs chat rendering). ``init_adapter``: a
    LoRA adapter of ``model`` to continue training (an earlier round's); the reference stays ``model``
    itself (PEFT's disabled adapter). To make an earlier policy the reference instead, pass its merged
    copy as ``model`` and no ``init_adapter``.
    """
    cfg = cfg or TrainingConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu, t0 = on_gpu(), time.perf_counter()
    if cfg.compact_logprobs:
        _compact_logprobs_on_cpu()
    tok = load_tokenizer(model)
    spec = resolve_format(student or PromptSpec(), chat=bool(getattr(tok, "chat_template", None)))
    data = _training_data(Path(pairs_parquet), model, tok, spec, cfg, gpu, model_hash)  # fail fast on memory
    history: list[dict[str, float]] = []
    trainer = _trainer(model, tok, data, cfg, out_dir, gpu, init_adapter, model_hash, cache_dir,
                       _metrics_emitter(out_dir, history, callbacks))  # fmt: skip
    if callbacks:  # the caller reports each logged step: no raw {'loss': ...} dicts printed beside it
        from transformers import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    last = last_checkpoint(out_dir / "checkpoints")
    _trim_metrics(out_dir / "metrics.jsonl", int(last.name.split("-", 1)[1]) if last else 0)
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    manifest = {
        "base_model": model_id or str(model),
        "base_model_path": str(model),
        "base_model_hash": model_hash,
        "objective": cfg.objective,
        "init_adapter": str(init_adapter) if init_adapter is not None else None,
        "pairs": str(data.file),
        "pairs_digest": data.digest,
        "n_pairs": data.rows,
        "n_available": data.available,
        "student_prompt": spec.model_dump(),
        "training": cfg.model_dump(),
        "global_step": trainer.state.global_step,
        "masking": MASKING_VERSION,
        "ref_logps_key": None if cfg.objective == "sft" else data.ref_key,
    }
    adapter = _save_adapter(trainer, out_dir, manifest)
    full_history = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x]
    return TrainResult(adapter, manifest, full_history, time.perf_counter() - t0, last)


@dataclass
class _Data:
    """What one training run trains on: the tokenised rows and where they came from."""

    file: Path
    digest: str
    rows: int
    available: int
    tokens: Any
    ref_key: str


def _training_data(
    pairs_parquet: Path, model: str | Path, tok: Any, spec: PromptSpec, cfg: TrainingConfig, gpu: bool,
    model_hash: str = "",
) -> _Data:  # fmt: skip
    """The pairs (or, for ``sft``, the correct chains beside them) as far as ``max_steps`` reaches,
    tokenised, with the memory of a training step checked before any weights load."""
    import pyarrow.parquet as pq

    sft = cfg.objective == "sft"
    data_file = pairs_parquet.with_name("correct.parquet") if sft else pairs_parquet
    if sft and not data_file.is_file():
        raise ValueError(
            f"{data_file}: no correct chains file (build the pairs again with this fcdpo version)"
        )
    rows = pq.read_table(str(data_file)).to_pylist()
    if not rows:
        what = "correct chains" if sft else "preference pairs"
        raise ValueError(f"{data_file}: no {what} to train on")
    available = len(rows)
    rows = reachable(rows, cfg)
    if sft:
        data = tokenize_correct(tok, rows, spec, cfg.mask_tool_outputs)
        longest = max(min(len(x), cfg.max_length) for x in data["input_ids"])
        memory = plan_training(model, cfg.batch_size, longest, gpu=gpu, sequences=1).check()
    else:
        data = tokenize_pairs(tok, rows, spec, cfg.mask_tool_outputs)
        memory = memory_plan(model, data, cfg, gpu)
    log.info("training memory: %s", memory.describe())
    data_digest = file_sha256(data_file)
    key = ref_cache_key(data_digest, model_hash or str(model), spec, tok, cfg)
    if len(rows) < available:  # the subset max_steps reaches
        key = digest([key, len(rows), cfg.seed], 32)
    return _Data(data_file, data_digest, len(rows), available, data, key)


def _metrics_emitter(out_dir: Path, history: list[dict[str, float]], sinks: Sequence[MetricsSink]) -> Any:
    """A trainer callback: each logged step's metrics into ``history``, ``metrics.jsonl`` and ``sinks``."""
    from transformers import TrainerCallback

    class Emit(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            m = {k: float(v) for k, v in logs.items() if k in METRIC_KEYS}
            if not m:
                return
            m["step"] = state.global_step
            history.append(m)
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            for sink in sinks:
                sink(state.global_step, {k: v for k, v in m.items() if k != "step"})

    return Emit()


def _trainer(
    model: str | Path, tok: Any, data: _Data, cfg: TrainingConfig, out_dir: Path, gpu: bool,
    init_adapter: str | Path | None, model_hash: str, cache_dir: str | Path | None, emit: Any,
) -> Any:  # fmt: skip
    """TRL's trainer for ``cfg.objective`` on the student with a LoRA adapter (new, or ``init_adapter``
    continued; the reference is the model without it), the reference log-probs cached by content."""
    from peft import LoraConfig, PeftModel

    model_obj = load_student(model, cfg.quantization, gpu)
    peft_config = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    if init_adapter is not None:  # continue an earlier round's adapter
        model_obj = PeftModel.from_pretrained(model_obj, str(init_adapter), is_trainable=True)
        peft_config = None
    if cfg.objective == "sft":
        from trl import SFTTrainer

        return SFTTrainer(
            model=model_obj, args=sft_args(cfg, out_dir, gpu), train_dataset=data.tokens, processing_class=tok,
            peft_config=peft_config, callbacks=[emit],
        )  # fmt: skip
    cache_root = Path(cache_dir) if cache_dir else out_dir / "ref_logps"
    return _trainer_class()(
        model=model_obj, args=dpo_args(cfg, out_dir, gpu), train_dataset=data.tokens, processing_class=tok,
        data_collator=preference_collator(tok.pad_token_id, cfg.max_length), peft_config=peft_config,
        callbacks=[emit], ref_cache=cache_root / f"{data.ref_key}.npz" if cfg.precompute_ref else None,
    )  # fmt: skip


def _save_adapter(trainer: Any, out_dir: Path, manifest: dict[str, Any]) -> Path:
    """The trained adapter with its manifest, in ``out_dir/adapter`` (written whole, then renamed)."""
    adapter, tmp = out_dir / "adapter", out_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp))
    (tmp / "fcdpo_manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(adapter, ignore_errors=True)
    tmp.rename(adapter)
    return adapter
