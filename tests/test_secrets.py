"""Secrets stay out of params, reprs and error messages; a remote teacher without its key fails at once."""

import socket

import pytest

from fcdpo.backends import SamplingParams
from fcdpo.backends.openai_backend import BackendError, OpenAIBackend
from fcdpo.errors import DeterministicError
from fcdpo.secrets import redact, redact_url, secret_name

CANARY = "canary-7f3e9d1c"


def test_secret_names_are_whole_words():
    assert all(
        secret_name(n) for n in ["api_key", "access-token", "clientSecret", "password", "auth", "x_token"]
    )
    assert not any(secret_name(n) for n in ["max_tokens", "api_key_env", "tokenizer", "base_url", "keyword"])


def test_redaction_masks_userinfo_query_secrets_and_secret_options():
    assert redact_url(f"http://bob:{CANARY}@127.0.0.1:8000/v1") == "http://***@127.0.0.1:8000/v1"
    assert redact_url(f"https://h/v1?api_key={CANARY}&x=1") == "https://h/v1?api_key=***&x=1"
    assert redact_url("not a url") == "not a url"
    cfg = {"teacher": {"backend_options": {
        "base_url": f"https://u:{CANARY}@api.example.com/v1", "api_token": CANARY, "max_tokens": 64,
        "api_key_env": "MY_KEY", "headers": [f"http://:{CANARY}@h"],
    }}}  # fmt: skip
    out = redact(cfg)
    assert CANARY not in repr(out)
    assert out["teacher"]["backend_options"]["max_tokens"] == 64
    assert out["teacher"]["backend_options"]["api_key_env"] == "MY_KEY"


def test_mlflow_params_of_a_config_carry_no_secret():
    from fcdpo.config import RunConfig
    from tasks.tracking import flatten

    cfg = RunConfig.model_validate({
        "problems": {"sources": [{"source": "fol", "params": {"n": 2}}]},
        "teacher": {"backend": "openai", "backend_options": {"base_url": f"https://u:{CANARY}@h/v1"}},
    })  # fmt: skip
    params = flatten(redact(cfg.model_dump(mode="json")))
    assert params["teacher.backend_options.base_url"] == "https://***@h/v1"
    assert CANARY not in repr(params)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_remote_teacher_without_its_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(
        DeterministicError, match="needs an API key: set the environment variable OPENAI_API_KEY"
    ):
        OpenAIBackend("m", "https://api.example.com/v1")
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    OpenAIBackend("m", "https://api.example.com/v1").close()  # with the key: fine
    OpenAIBackend("m", "http://127.0.0.1:8000/v1", api_key_required=False).close()


def test_userinfo_in_base_url_never_reaches_reprs_or_errors():
    url = f"http://bob:{CANARY}@127.0.0.1:{_free_port()}/v1"
    be = OpenAIBackend("m", url, max_retries=0, timeout_s=2)
    assert CANARY not in repr(be) and be.base_url.startswith("http://127.0.0.1:")
    with pytest.raises(BackendError) as e:
        be.generate(["x"], [SamplingParams()])
    assert CANARY not in str(e.value) and "***@127.0.0.1" in str(e.value)
    be.close()
