import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The session's own Prefect home and result storage, never the user's ~/.prefect: the storage holds every
# cached task result, and cache keys name run folders under pytest's tmp paths, which repeat from one
# session to the next (/tmp/pytest-of-<user>/pytest-0/...). Sharing it, a result cached by an earlier
# session answered this session's runs from cache (the project's CI, run on a machine where tests had run
# before, failed 6 tests that way). Prefect 3.7 derives the storage path from ~/.prefect whatever
# PREFECT_HOME says (PrefectHQ/prefect#23046), so both are set (test_deployments.py's servers and
# workers inherit them). Made once per process: a second import of this file (``from tests.conftest
# import ...`` runs it again under another module name) must not point os.environ, and so every subprocess,
# at another storage than the one Prefect already loaded its settings from (a killed run's subprocess
# then cached its results where this process never looked).
_PREFIX = f"fcdpo-tests-prefect-{os.getpid()}-"
if Path(os.environ.get("PREFECT_HOME", "")).name.startswith(_PREFIX):
    PREFECT_HOME = os.environ["PREFECT_HOME"]
else:
    PREFECT_HOME = tempfile.mkdtemp(prefix=_PREFIX)
    os.environ["PREFECT_HOME"] = PREFECT_HOME
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(PREFECT_HOME, "storage")


def pytest_unconfigure(config):
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def fol_set():
    from fcdpo.problems import load_source

    return load_source("fol", n=30, seed=11)


@pytest.fixture(scope="session")
def arith_set():
    from fcdpo.problems import load_source

    return load_source("arith", n=30, seed=11)


@pytest.fixture(scope="session")
def vllm_backend():
    """One real vLLM engine on the default model for the whole test session (engine start ~60 s on CPU).

    ``gpu_memory_utilization=0.14`` is a freshly started machine's share (0.3 of an 11.3 GiB node 0 is
    0.14 of 24 GiB): the engine must start anyway, because its KV cache is sized in bytes by the workload
    (the tests keep at most 32 chains of < 2048 tokens in flight), not by that fraction.

    float32: on a CPU with native bf16 the engine runs in bfloat16 by default, whose batches are not
    invariant: the same seeds gave other chains when batched with others (a clean CI run here failed the
    seed test, and the asynchronous sampler matched the step-synchronous loop on 7 of 9 chains)."""
    from fcdpo.backends import Workload
    from fcdpo.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend(
        "gemma-3-270m",
        gpu_memory_utilization=0.14,
        max_model_len=4096,
        workload=Workload(32, 2048),
        dtype="float32",
        # a request per turn, as the step-synchronous loop the tests compare with; the session tests turn
        # sessions on (a session seeds its generator once per chain, so its chains are its own)
        sessions=False,
    )
    yield backend
    backend.close()


def gsm8k_style_file(path):
    """A tiny file in GSM8K's own schema, written by the test (tests never read ../shared)."""
    import json

    rows = [
        {
            "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
            "answer": "<<3+4=7>>7\n#### 7",
        },
        {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "answer": "<<6*5=30>>30\n#### 30"},
        {
            "question": "Mia had 20 stickers and gave away 8. How many are left?",
            "answer": "<<20-8=12>>12\n#### 12",
        },
        {
            "question": "Ann splits 18 candies equally among 3 friends. How many does each get?",
            "answer": "<<18/3=6>>6\n#### 6",
        },
        {
            "question": "Sam reads 12 pages a day. How many pages in 3 days?",
            "answer": "<<12*3=36>>36\n#### 36",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_lora_adapter(
    base_dir, out, seed=0, r=2, alpha=8, target_modules=("q_proj", "v_proj"), b_scale=1.0
):
    """A real LoRA adapter on ``base_dir`` saved to ``out``: untrained, B randomly initialised (an adapter as
    PEFT makes it, B zero, would not change a single token), B scaled by ``b_scale``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base_dir)),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False),
    )
    if b_scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(b_scale)
    model.save_pretrained(str(out))
    return out


def build_tiny_model(root, chat_template: str | None = None):
    """A tiny random Llama with a byte-level BPE tokenizer trained in the test (no hub, a few seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fcdpo.toolsets import TOOLSETS

    corpus = [TOOLSETS.get(n).docs() for n in ("arithmetic", "fol")] + [
        "Problem: Tom has 3 apples. >>> Add(a=3, b=4)\n7\n>>> Answer(7)\n>>> Stop()\n",
        "Reasoning(\"The rule says all cats are animals\") Prove(premises=[...], statement='x')",
    ]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 4, trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = chat_template
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(root))
    fast.save_pretrained(str(root))
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def oracle_pairs(out_dir, n=12, samples=6, error_rate=0.4, student=None, max_pairs=3):
    """Real chains from the oracle teacher on FOL + arithmetic problems, paired (for training tests)."""
    from fcdpo.agent import Agent
    from fcdpo.backends.oracle import OracleBackend
    from fcdpo.pairs import PairsConfig, build_pairs
    from fcdpo.problems import ProblemSet, load_source

    problems = ProblemSet.concat(
        "p", [load_source("fol", n=n // 2, seed=5, difficulty="easy"), load_source("arith", n=n // 2, seed=5)]
    )
    from fcdpo.labelling import label_records
    from fcdpo.rollout import run_chains

    backend = OracleBackend(list(problems), error_rate=error_rate)
    chains = run_chains(Agent(), backend, list(problems), samples, base_seed=2)
    by_id = {p.id: p for p in problems}
    chains = label_records(chains, by_id)
    cfg = PairsConfig(max_pairs_per_prompt=max_pairs)
    return build_pairs(chains, by_id, out_dir, student, cfg, save_dataset=False), problems


def tiny_run_config(tmp_path, tiny_model, **over):
    """A pipeline config that runs in seconds: oracle teacher (gold chains with injected errors), the tiny
    random student trained 2 DPO steps and evaluated through the oracle backend. ``over``: dotted keys."""
    from fcdpo.config import RunConfig

    data = {
        "name": "tiny-flow",
        "out_dir": str(tmp_path / "runs"),
        "problems": {
            "sources": [
                {"source": "fol", "params": {"n": 10, "seed": 4, "difficulty": "easy"}},
                {"source": "arith", "params": {"n": 10, "seed": 4, "steps": 1}},
            ],
            "test_fraction": 0.3,
        },
        "agent": {"max_steps": 14, "max_tries": 2},
        "teacher": {
            "backend": "oracle",
            "backend_options": {"error_rate": 0.4},
            "n_demonstrations": 1,
            "sampling": {"samples_per_problem": 4, "progress": False},
        },
        "student": {
            "model": str(tiny_model),
            "backend": "oracle",
            "training": {"max_steps": 2, "batch_size": 2, "save_steps": 1},
        },
        "pairs": {"max_pairs_per_prompt": 2},
        "evaluation": {"k": 0, "bootstrap": 200},
    }
    for k, v in over.items():
        d = data
        *path, last = k.split(".")
        for p in path:
            d = d.setdefault(p, {})
        d[last] = v
    return RunConfig.model_validate(data)


@pytest.fixture(scope="module")
def harness():
    """A real, temporary Prefect API for the module's flows (Prefect's own test harness)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_runs(flow_run_id):
    """Every task run of a flow run, read from the Prefect API."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as c:
            return await c.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )

    return asyncio.run(read())


# every valid `stages` value (fcdpo.config.STAGE_NEEDS): each must behave the same on every path
STAGE_COMBINATIONS = [
    ["sample"],
    ["sample", "pairs"],
    ["sample", "pairs", "train"],
    ["sample", "pairs", "train", "evaluate"],
    ["sample", "pairs", "evaluate"],
    ["sample", "evaluate"],
    ["evaluate"],
]


def run_outputs(run_dir):
    """What a pipeline run left in its folder: the data files by content digest, the rest by presence."""
    from fcdpo.hashing import file_sha256

    out = {}
    for rel in ("chains.jsonl", "pairs/pairs.parquet"):
        if (run_dir / rel).is_file():
            out[rel] = file_sha256(run_dir / rel)
    present = {
        "shards": any((run_dir / "shards").glob("shard-*.jsonl")),
        "training/adapter": (run_dir / "training" / "adapter" / "adapter_model.safetensors").is_file(),
        **{rel: (run_dir / rel).is_file() for rel in (
            "eval/before/greedy.jsonl", "eval/after/greedy.jsonl", "eval/report.md", "eval/comparison.json",
            "summary.json",
        )},
    }  # fmt: skip
    return {**out, **{k: "present" for k, v in present.items() if v}}


def expected_outputs(stages):
    s, e = set(stages), {"summary.json"}
    if "sample" in s:
        e |= {"shards", "chains.jsonl"}
    if "pairs" in s:
        e.add("pairs/pairs.parquet")
    if "train" in s:
        e.add("training/adapter")
    if "evaluate" in s:
        e.add("eval/before/greedy.jsonl")
    if {"train", "evaluate"} <= s:
        e |= {"eval/after/greedy.jsonl", "eval/report.md", "eval/comparison.json"}
    return e


def summary_results(summary):
    """A run summary without what differs between two runs of the same config (times, ids, paths)."""
    return summary.model_dump(
        include={"stages", "train_problems", "test_problems", "chains", "per_task", "pairs", "prompts_with_pairs",
                 "before", "after", "comparison"}
    ) | {"training_steps": summary.training.steps if summary.training else None}  # fmt: skip


def check_mlflow_record(client, summary, flow_run_id, registered="fcdpo-student"):
    """What one full pipeline run leaves in MLflow (issue 13): the headline metrics on the parent run, each
    dataset on the run that consumed it, the adapter as a logged model linked to the pairs dataset and
    registered as a version tagged with the Prefect flow run. Returns the model version."""
    parent = client.get_run(summary.mlflow.run_id)
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    m, c = parent.data.metrics, summary.comparison
    assert m["all.accuracy_before"] == summary.before["all"].accuracy
    assert m["all.accuracy_after"] == summary.after["all"].accuracy == c["all"].after
    assert m["all.difference"] == c["all"].difference and m["all.mcnemar_p"] == c["all"].mcnemar_p
    assert (m["all.difference_ci_low"], m["all.difference_ci_high"]) == tuple(c["all"].difference_ci)
    assert m["pairs"] == summary.pairs and m["chains"] == summary.chains and m["seconds.training"] > 0
    assert {f"{t}.accuracy_after" for t in c} <= set(m)

    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    runs = {r.data.tags["fcdpo.stage"]: r for r in children}

    def inputs(stage):
        return {
            (d.dataset.name, {t.key: t.value for t in d.tags}.get("mlflow.data.context")): d.dataset
            for d in runs[stage].inputs.dataset_inputs
        }

    assert set(inputs("problems")) == {("training problems", "training"), ("held-out problems", "evaluation")}
    assert set(inputs("sampling")) == {("training problems", "training")}
    assert set(inputs("pairs")) == {("chains", "training")}
    assert set(inputs("train-dpo")) == {("pairs", "training")}
    for stage in ("eval-before", "eval-after"):
        assert set(inputs(stage)) == {("held-out problems", "evaluation")}
        assert runs[stage].data.metrics["all.accuracy"] == getattr(summary, stage[5:])["all"].accuracy
    pairs_ds = inputs("train-dpo")[("pairs", "training")]
    assert len(pairs_ds.digest) >= 16 and "chosen" in pairs_ds.schema and pairs_ds.source
    samples = {a.path for a in client.list_artifacts(runs["train-dpo"].info.run_id, "data")}
    assert "data/pairs.sample.jsonl" in samples

    (model,) = client.search_logged_models(
        [exp.experiment_id], filter_string=f"source_run_id = '{runs['train-dpo'].info.run_id}'"
    )
    assert (
        model.status.to_string() == "READY"
        if hasattr(model.status, "to_string")
        else str(model.status).endswith("READY")
    )
    assert model.params["pairs_digest"] and int(model.params["global_step"]) == summary.training.steps
    # an output of train-dpo, so the run's page lists it under "Logged models"
    outputs = client.get_run(runs["train-dpo"].info.run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model.model_id, summary.training.steps)]
    arts = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    assert {"fcdpo_manifest.json", "adapter_model.safetensors"} <= arts
    linked = {(x.key, x.dataset_name, x.dataset_digest) for x in model.metrics or []}
    assert any(name == "pairs" and digest == pairs_ds.digest for _, name, digest in linked), linked
    assert any(k == "all.accuracy" and name == "held-out problems" for k, name, _ in linked), linked
    (version,) = client.search_model_versions(
        f"name = '{registered}' and run_id = '{runs['train-dpo'].info.run_id}'"
    )
    assert (
        version.source == f"models:/{model.model_id}" and version.tags["prefect.flow_run_id"] == flow_run_id
    )
    return version
