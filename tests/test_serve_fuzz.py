"""Property-based fuzz of the server's request schemas: whatever the body, never a 5xx and always OpenAI's error
shape for a 4xx (the app in process; max_tokens capped so that the bodies that do run stay short)."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.serve.app import create_app
from edgellm.serve.config import ServeConfig


@pytest.fixture(scope="module")
def client(smollm2_path):
    from edgellm.api import LLM

    llm = LLM(smollm2_path, n_ctx=256, n_parallel=4)
    app = create_app(ServeConfig(llms={"smollm2": llm}, max_tokens=3, max_n=3, api_keys=["fuzz-key"]))
    with TestClient(app, headers={"Authorization": "Bearer fuzz-key"}) as c:
        yield c
    llm.close()


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=3), max_leaves=8)
FIELDS = ["model", "messages", "prompt", "n", "stream", "stream_options", "stop", "max_tokens", "seed", "temperature",
          "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
          "response_format", "top_k", "min_p", "repeat_penalty", "grammar", "json_schema", "mirostat", "tools",
          "content", "tokens", "max_completion_tokens", "samplers", "ignore_eos"]
good = {"model": st.just("smollm2"), "messages": st.just([{"role": "user", "content": "Hi"}]),
        "prompt": st.sampled_from(["Hi", ["a", "b"], [1, 2, 3]]), "content": st.just("hello")}
optional = {f: (good[f] | values) if f in good else values for f in FIELDS}
bodies = st.fixed_dictionaries({}, optional=optional) | st.fixed_dictionaries(
    {"model": good["model"], "messages": good["messages"], "prompt": good["prompt"]},
    optional={f: v for f, v in optional.items() if f not in good})   # mostly well formed: reaches the engine
ROUTES = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]


@settings(max_examples=int(__import__('os').environ.get('EDGELLM_FUZZ_EXAMPLES', 120)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=bodies)
def test_no_5xx_for_any_body(client, route, body):
    logging.getLogger("edgellm.serve").disabled = True
    r = client.post(route, content=json.dumps(body))
    assert r.status_code < 500, (route, body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=max(40, int(__import__('os').environ.get('EDGELLM_FUZZ_EXAMPLES', 0)) // 10), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES + ["/v1/models", "/metrics"]), raw=st.binary(max_size=64))
def test_no_5xx_for_any_bytes(client, route, raw):
    r = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500 and "error" in r.json()
