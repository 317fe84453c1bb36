"""Run configuration: one pydantic model, loaded from YAML, every field with help text.

Errors name the file, the line and the field::

    configs/bad.yaml:12: pairs.max_pairs_per_prompt: Input should be greater than or equal to 1

``--set key=value`` overrides (dotted paths, YAML values) are applied before validation.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from fcdpo.agent import AgentLimits, PromptSpec
from fcdpo.backends import BACKENDS, SamplingParams
from fcdpo.evaluation import EvalConfig
from fcdpo.labelling import LabellingConfig
from fcdpo.pairs import PAIR_STRATEGIES, PairsConfig
from fcdpo.problems import PROBLEM_SOURCES
from fcdpo.schema import ConfigModel, SafeName
from fcdpo.training import TrainingConfig


class _Strict(ConfigModel):
    pass


class ProblemSourceConfig(_Strict):
    source: str = Field(description="registered problem source: fol, arith, gsm8k, jsonl, or your own")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the source")

    @field_validator("source")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PROBLEM_SOURCES:
            raise ValueError(f"unknown problem source {v!r}; registered: {', '.join(PROBLEM_SOURCES)}")
        return v

    @model_validator(mode="after")
    def _params_fit_the_source(self) -> ProblemSourceConfig:
        """A typo in a parameter, a missing one, or a file that is not there fails when the config loads,
        before a run folder or an MLflow run exists."""
        sig = inspect.signature(PROBLEM_SOURCES.get(self.source))
        accepted = [n for n, p in sig.parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        for name in self.params:
            if name not in accepted and not takes_any:
                raise ValueError(
                    f"problem source {self.source!r} has no parameter {name!r}; its parameters: "
                    + ", ".join(accepted)
                )
        for name, p in sig.parameters.items():
            if (
                p.default is p.empty
                and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                and name not in self.params
            ):
                raise ValueError(f"problem source {self.source!r} needs the parameter {name!r}")
        path = self.params.get("path")
        if path is not None and not Path(str(path)).expanduser().is_file():
            raise ValueError(f"problem source {self.source!r}: path {path!r} is not a file")
        return self


class ProblemsConfig(_Strict):
    sources: list[ProblemSourceConfig] = Field(
        min_length=1, description="problem sets, concatenated in order (at least one)"
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of problems held out (by id hash)")
    split_salt: str = Field("", description="changes the id-hash split without changing the problems")
    max_train: int | None = Field(None, ge=1, description="use at most this many training problems")
    max_test: int | None = Field(None, ge=1, description="evaluate on at most this many held-out problems")


class SamplingConfig(_Strict):
    samples_per_problem: int = Field(16, ge=1, description="chains sampled per training problem (N)")
    temperature: float = Field(0.7, ge=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_tokens_per_step: int = Field(96, ge=1, description="token budget of one reply (one call)")
    seed: int = Field(0, description="base seed; each chain's seed derives from it, the problem id and index")
    shard_size: int = Field(64, ge=1, description="problems per shard (the unit of resumption and fan-out)")
    progress: bool = Field(True, description="show a progress bar while sampling")
    window: int | None = Field(
        None,
        ge=1,
        description="requests in flight at once, each from a chain of its own (every chain its own "
        "asynchronous loop; window // 8 spare chains run their calls meanwhile); null: what the engine "
        "batches (vLLM: max_num_seqs of its memory plan; openai: its concurrency option) plus a quarter "
        "more waiting in its queue, so places freed at a step are filled at once (fcdpo.backends.default_window)",
    )

    def params(self) -> SamplingParams:
        """The engine's sampling parameters of every reply (each chain's seed is added per step)."""
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens_per_step
        )


def _known_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(BACKENDS.names())}")
    return name


class TeacherConfig(_Strict):
    model: str = Field("gemma-3-270m", description="model name, HF id or local path")
    backend: str = Field("vllm", description="registered backend: vllm, openai, oracle, ...")
    backend_options: dict[str, Any] = Field(default_factory=dict, description="backend keyword arguments")
    prompt: PromptSpec = Field(
        default_factory=PromptSpec, description="teacher prompt (demonstrations added)"
    )
    n_demonstrations: int = Field(
        2, ge=0, description="few-shot worked chains per toolset, from training problems with solutions"
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    _backend = field_validator("backend")(lambda v: _known_backend(v))


class RoundsConfig(_Strict):
    """Rounds after the first (iterative DPO / RPO): the student of round k-1 samples its own chains."""

    reference: Literal["original", "previous"] = Field(
        "original",
        description="reference model of rounds >= 2: original (the untrained student; training continues "
        "the previous round's adapter) or previous (the previous round's policy, merged; a fresh adapter on it)",
    )
    keep_pairs: bool = Field(
        False, description="train round k on the pairs of every round so far, not only round k's own"
    )
    samples_per_problem: int | None = Field(
        None,
        ge=1,
        description="chains the student samples per training problem each round; null = the teacher's",
    )
    problems: Literal["all", "split"] = Field(
        "all",
        description="which training problems rounds >= 2 sample: all of them each round, or split (the "
        "training problems divided into one disjoint part per round)",
    )
    temperature: float = Field(0.7, ge=0, description="temperature of the student's on-policy chains")
    chosen_from_teacher: bool = Field(
        False,
        description="also pair the teacher's correct chains (chosen) with the student's incorrect ones: a "
        "weak student may sample no correct chain of its own, and then a round of only its own chains has "
        "no pairs",
    )


class StudentConfig(_Strict):
    model: str = Field("gemma-3-270m", description="model name, HF id or local path")
    prompt: PromptSpec = Field(default_factory=PromptSpec, description="student prompt: no demonstrations")
    backend: str = Field("vllm", description="backend that serves the student for evaluation")
    backend_options: dict[str, Any] = Field(default_factory=dict, description="backend keyword arguments")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="DPO + LoRA settings")
    rounds: int = Field(
        1,
        ge=1,
        le=10,
        description="training rounds: round 1 learns from the teacher's chains; each later round, the "
        "previous round's student samples chains on the training problems in its own prompt (on-policy), "
        "they are labelled and paired, and training continues from it (see round)",
    )
    round: RoundsConfig = Field(default_factory=RoundsConfig, description="how rounds >= 2 run")
    on_policy_samples: int = Field(
        0,
        ge=0,
        description="round 1: the untrained student also samples this many chains per training problem the "
        "teacher solved, in its own prompt (temperature: round.temperature), and the pairs are the teacher's "
        "correct chains (chosen) x the student's own incorrect ones (rejected), as round.chosen_from_teacher "
        "pairs them in later rounds; 0: the paper's pairs, the teacher's correct x incorrect chains",
    )

    _backend = field_validator("backend")(lambda v: _known_backend(v))

    @field_validator("prompt")
    @classmethod
    def _no_demos(cls, v: PromptSpec) -> PromptSpec:
        if v.demonstrations:
            raise ValueError(
                "the student prompt takes no demonstrations (it is what the student sees at inference)"
            )
        return v


class TrackingConfig(_Strict):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
        "with artifacts in ./mlartifacts (no server needed)",
    )
    experiment: str = Field("fcdpo", description="MLflow experiment the runs go to")
    registered_model: str | None = Field(
        "fcdpo-student",
        description="registered model the trained adapter becomes a new version of (null: log it, do not register)",
    )


class OrchestrationConfig(_Strict):
    executor: Literal["local", "deployment"] = Field(
        "local",
        description="sampling fan-out: 'local' = shards run in the flow process sharing one engine; "
        "'deployment' = each shard is a flow run of the sample-shard deployment (gpu work pool), "
        "so N GPU workers sample in parallel (workers must share the run folder)",
    )
    shard_deployment: str = Field(
        "sample-shard/sample-shard", description="'flow/deployment' name the deployment executor triggers"
    )
    shard_attempts: int = Field(
        3,
        ge=1,
        description="deployment executor: flow runs per shard before giving up; a crashed run (worker "
        "killed, OOM) is triggered again and resumes its shard file",
    )


# a stage -> the stage whose output it reads (evaluate stands alone: it evaluates the untrained student, and
# the trained one when train runs too)
STAGE_NEEDS = {"pairs": "sample", "train": "pairs"}


class RunConfig(_Strict):
    name: SafeName = Field("default", description="run name: the run's folder under out_dir")
    out_dir: str = Field("runs", description="where run outputs are written")
    shared_dir: str | None = Field(
        None,
        description="null: stage outputs go in the run folder (out_dir/name). A folder: each stage's output "
        "goes there in a folder named by a hash of the stage's inputs, so runs that share upstream stages "
        "share their outputs and cached results (what `fcdpo experiment` sets for its arms)",
    )
    problems: ProblemsConfig
    agent: AgentLimits = Field(default_factory=AgentLimits, description="agent loop limits")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    labelling: LabellingConfig = Field(
        default_factory=LabellingConfig, description="how chains are labelled (sampling, pairs, evaluation)"
    )
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig, description="before/after evaluation")
    stages: list[Literal["sample", "pairs", "train", "evaluate"]] = Field(
        ["sample", "pairs", "train", "evaluate"],
        min_length=1,
        description="stages to run (in the method's order whatever the list's order): sample (teacher chains, "
        "labelled), pairs (needs sample), train (DPO; needs pairs), evaluate (the untrained student on held-out "
        "problems, and the trained one when train runs)",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="how the Prefect flow fans out sampling"
    )

    @field_validator("stages")
    @classmethod
    def _stages_have_their_inputs(cls, v: list[str]) -> list[str]:
        for stage, needs in STAGE_NEEDS.items():
            if stage in v and needs not in v:
                raise ValueError(f"stage {stage!r} needs {needs!r} (it uses its output); add it to stages")
        return v

    @field_validator("pairs")
    @classmethod
    def _strategy(cls, v: PairsConfig) -> PairsConfig:
        if v.strategy not in PAIR_STRATEGIES:
            raise ValueError(
                f"unknown pair strategy {v.strategy!r}; registered: {', '.join(PAIR_STRATEGIES)}"
            )
        return v


class ConfigError(ValueError):
    def __init__(self, path: str, line: int | None, field: str, message: str):
        self.path, self.line, self.field = path, line, field
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at ``loc`` (or of its nearest existing ancestor)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == key), None)
            if nxt is None:
                key_node = next((k for k, _ in node.value if k.value == key), None)
                return key_node.start_mark.line + 1 if key_node is not None else line
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError("--set", None, dotted, f"{k} is not a section")
    d[keys[-1]] = value


MAX_YAML_VALUES = 100_000  # a run config has a few hundred; aliases can make a 1 KB file expand to 10^8


def _expanded_size(node: yaml.Node | None, memo: dict[int, int] | None = None) -> int:
    """How many values the document has once every alias is expanded (shared nodes counted each time)."""
    if node is None:
        return 0
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a cycle counts once
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = size = min(size, MAX_YAML_VALUES + 1)
    return size


def read_yaml(path: str | Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """A YAML mapping and its node tree (for line numbers); errors name the file and line."""
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(path, None, "", f"cannot read the file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(path, line, "", f"not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    try:
        node = yaml.compose(text)
        if _expanded_size(node) > MAX_YAML_VALUES:
            raise ConfigError(
                path, None, "", f"the YAML expands to more than {MAX_YAML_VALUES:,} values through aliases "
                "(&anchor / *alias); write the values out"
            )  # fmt: skip
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(
            path, mark.line + 1 if mark else None, "", f"invalid YAML: {getattr(e, 'problem', e)}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(path, 1, "", "the config must be a mapping")
    return data, node


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """``key=value`` strings (dotted keys, YAML values) set into ``data``; an error names the ``--set``."""
    for ov in overrides:
        key, sep, raw = ov.partition("=")
        where = f"--set {ov if len(ov) <= 120 else ov[:117] + '...'}"
        if not sep or not key.strip():
            raise ConfigError(where, None, "", "expected KEY=VALUE (a dotted config key, a YAML value)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(
                where, None, key.strip(), f"invalid YAML value: {getattr(e, 'problem', e)}"
            ) from None
        try:
            _set(data, key.strip(), value)
        except ConfigError as e:
            raise ConfigError(where, None, e.field, str(e).split(": ", 2)[-1]) from None


def override_for(field: str, overrides: list[str] | tuple[str, ...]) -> str | None:
    """The last ``--set`` among ``overrides`` whose key is the failing config ``field``, lies above it or
    below it (None: the value came from the file)."""
    for ov in reversed(overrides):
        key = ov.partition("=")[0].strip()
        if field == key or field.startswith(key + ".") or key.startswith(field + "."):
            return ov
    return None


def validate(
    model: type[ConfigModel],
    data: dict[str, Any],
    path: str,
    node: yaml.Node | None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Any:
    """``model`` from ``data``; the first error names the file, the line and the field, or the ``--set``
    among ``overrides`` that gave the field its value."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        field = ".".join(str(x) for x in loc)
        msg = err["msg"].removeprefix("Value error, ")
        if msg == "Extra inputs are not permitted":
            msg = "unknown key (no such setting here)"
        more = f" (and {len(e.errors()) - 1} more errors)" if len(e.errors()) > 1 else ""
        if (ov := override_for(field, overrides)) is not None:
            raise ConfigError(f"--set {ov}", None, field, msg + more) from None
        raise ConfigError(path, _line_of(node, loc), field, msg + more) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config in ``path`` with ``overrides`` (``--set``); an error names the file and line, or the
    ``--set`` argument the bad value came from."""
    data, node = read_yaml(path)
    apply_overrides(data, overrides)
    return validate(RunConfig, data, str(path), node, overrides)
