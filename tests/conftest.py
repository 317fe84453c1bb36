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
