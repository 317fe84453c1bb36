import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
    """One real vLLM engine on the default model for the whole test session (engine start ~60 s on CPU)."""
    from fcdpo.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend("gemma-3-270m", gpu_memory_utilization=0.25, max_model_len=4096)
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
