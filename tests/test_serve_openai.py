"""edgellm serve end to end: the real server (uvicorn on a free localhost port) and the real `openai` client."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import numpy as np
import pytest
import uvicorn

from edgellm.serve.app import create_app
from edgellm.serve.auth import KeyStore
from edgellm.serve.config import ServeConfig, parse_rate
from edgellm.serve.limits import TokenBucket


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from edgellm.api import LLM

    m = LLM(smollm2_path, n_ctx=1024, n_parallel=4)
    yield m
    m.close()


@pytest.fixture(scope="module")
def srv(llm):
    s = ServerThread(create_app(ServeConfig(llms={"smollm2": llm}, max_body=1 << 20)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(llm, tmp_path_factory):
    f = tmp_path_factory.mktemp("keys") / "keys.txt"
    f.write_text("# comment\nalpha-key-0123456789\nsha256:" + hashlib.sha256(b"hashed-key").hexdigest() + "\n")
    keys = ServeConfig.keys_from(str(f), env="beta-key-abcdef")
    s = ServerThread(create_app(ServeConfig(llms={"smollm2": llm}, api_keys=keys, rate_limit=parse_rate("3/min"),
                                            max_queue=0)))
    yield s
    s.stop()


MSG = [{"role": "user", "content": "What is the capital of France?"}]


def engine_state(llm):
    from edgellm.serve.metrics import engine_snapshot

    return llm.runner.call(engine_snapshot)


# ------------------------------------------------------------------------------------------------ the OpenAI client
def test_models_list_and_health(srv):
    c = srv.client()
    ids = [m.id for m in c.models.list().data]
    assert ids == ["smollm2"]
    assert c.models.retrieve("SmolLM2-135M-Instruct.Q4_1").id == "smollm2"   # the file stem picks it too
    r = httpx.get(srv.url + "/health", headers={"X-Request-Id": "abc-123"})
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.headers["x-request-id"] == "abc-123"


def test_embeddings(srv, llm):
    """The real client (which asks for base64 by default) and plain floats agree with LLM.embed; mean pooling, unit
    length; similar sentences are closer than unrelated ones; an input too long is a 400."""
    c = srv.client()
    texts = ["The cat sat on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]
    got = c.embeddings.create(model="smollm2", input=texts)
    vecs = np.array([d.embedding for d in got.data])
    assert vecs.shape == (3, llm.model.hparams.n_embd) and [d.index for d in got.data] == [0, 1, 2]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, rtol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    np.testing.assert_allclose(vecs[0], llm.embed(texts[0]), rtol=1e-5, atol=1e-6)
    floats = c.embeddings.create(model="smollm2", input=texts[2], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, vecs[2], rtol=1e-5, atol=1e-6)
    assert got.usage.prompt_tokens == sum(len(llm.tokenize(t)) for t in texts)
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="smollm2", input="word " * 2000)
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="smollm2", input="x", dimensions=3)


def test_chat_streamed_equals_whole(srv):
    c = srv.client()
    whole = c.chat.completions.create(model="smollm2", messages=MSG, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    chunks = list(c.chat.completions.create(model="smollm2", messages=MSG, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_streamed_and_list_prompt(srv):
    c = srv.client()
    r = c.completions.create(model="smollm2", prompt=["The capital of France is", "One, two, three,"], max_tokens=6,
                             temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1] and r.usage.completion_tokens == 12
    parts = [ch.choices[0].text for ch in c.completions.create(model="smollm2", prompt="The capital of France is",
                                                                max_tokens=6, temperature=0, stream=True)]
    assert "".join(parts) == r.choices[0].text


def test_n_choices_and_seeds(srv):
    c = srv.client()
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "Write a word."}], max_tokens=10,
              temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, n=3)
    a = c.chat.completions.create(seed=7, extra_body={k: kw.pop(k) for k in ("top_k", "min_p")}, **kw)
    b = c.chat.completions.create(seed=7, extra_body={"top_k": 0, "min_p": 0.0}, **kw)
    ta, tb = [ch.message.content for ch in a.choices], [ch.message.content for ch in b.choices]
    assert len(ta) == 3 and [ch.index for ch in a.choices] == [0, 1, 2]
    assert ta == tb                 # same seed, same texts
    assert len(set(ta)) > 1         # seed + i per choice: the choices differ


def test_stop_strings(srv):
    r = srv.client().completions.create(model="smollm2", prompt="The capital of France is", max_tokens=20,
                                        temperature=0, stop=["."])
    assert r.choices[0].finish_reason == "stop" and "." not in r.choices[0].text and r.choices[0].text


def test_response_format_json_schema(srv):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    r = srv.client().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_logprobs(srv):
    c = srv.client()
    r = c.chat.completions.create(model="smollm2", messages=MSG, max_tokens=5, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    cr = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0,
                              logprobs=2)
    lp = cr.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs[0]) == 2 and lp.text_offset[0] == len("The capital of France is")


def test_errors_are_typed(srv):
    c = srv.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=MSG)
    assert e.value.body["code"] == "model_not_found"
    for bad in (dict(temperature=-1), dict(max_tokens=-5), dict(n=0), dict(logit_bias={"abc": 1}),
                dict(logit_bias={"99999999": 1}), dict(response_format={"type": "xml"}), dict(top_p=7),
                dict(extra_body={"grammar": "root ::= ("}), dict(messages=[]),
                dict(messages=[{"role": "wizard", "content": "hi"}])):
        kw = {"model": "smollm2", "messages": MSG, "max_tokens": 2, **bad}
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**kw)
        assert e.value.status_code == 400 and e.value.body["message"], bad
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="smollm2", prompt="x" * 6000, max_tokens=2)   # past the context


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"model": "smollm2", "messages": "hi"}',
                                  b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], '
                                  b'"temperature": NaN}', b'{"model": 5}', b"\xff\xfe"])
def test_malformed_bodies_are_400(srv, body):
    r = httpx.post(srv.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_body_limit_and_unknown_route(srv):
    r = httpx.post(srv.url + "/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(srv.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_tokenize_detokenize(srv):
    ids = httpx.post(srv.url + "/tokenize", json={"content": "Hello world", "add_special": False}).json()["tokens"]
    assert httpx.post(srv.url + "/detokenize", json={"tokens": ids}).json()["content"] == "Hello world"
    assert httpx.post(srv.url + "/detokenize", json={"tokens": [-1]}).status_code == 400


def test_disconnect_frees_the_sequence(srv, llm):
    # 960 tokens take ~3 s here: the client leaves after 4 events, long before the end. On a machine so loaded that
    # the client reads its first events only after the whole generation, the test would prove nothing: it tries
    # again (twice at most) rather than pass or fail on a race.
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
            "max_tokens": 960, "ignore_eos": True, "temperature": 0}
    for attempt in range(3):
        running = 0
        with httpx.Client(timeout=30) as h:
            with h.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
                n = 0
                for line in r.iter_lines():
                    n += line.startswith("data: ")
                    if n >= 4:
                        # read while the stream is still open: once it closes, the server may abort at once
                        running = engine_state(llm)["running"]
                        break
        if running == 1:
            break
    assert running == 1, "the generation ended before the client could leave, three times"
    t0 = time.monotonic()
    while engine_state(llm)["running"] and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert engine_state(llm)["running"] == 0 and engine_state(llm)["waiting"] == 0

    def drop_idle(core):   # finished requests keep their blocks for reuse: let them go to see what is left
        for seq in list(core.idle.values()):
            core._free(seq)

    llm.runner.call(drop_idle)
    assert all(g["used"] == 0 for g in engine_state(llm)["groups"])
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'edgellm_running_sequences{model="smollm2"} 0.0' in metrics
    assert "edgellm_time_to_first_token_seconds_bucket" in metrics and "edgellm_kv_blocks" in metrics


def test_a_non_streamed_client_that_leaves_frees_its_sequence(srv, llm):
    """A client that gives up on a non-streamed request while tokens are still coming: the sequence is cancelled
    within a poll interval, not generated to the end of its context for nobody."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 960, "ignore_eos": True, "temperature": 0}
    before = llm.runner.call(lambda core: core.n_evaluated)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=1.0)
    t0 = time.monotonic()
    while engine_state(llm)["running"] and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert engine_state(llm)["running"] == 0 and time.monotonic() - t0 < 3
    # cancelled ~0.5 s after the client left: far fewer than the 960 tokens it asked for (at < 500 tok/s here)
    assert llm.runner.call(lambda core: core.n_evaluated) - before < 800


def test_temperature_zero_same_alone_and_under_load(srv):
    prompts = ["The capital of France is", "My favourite colour is", "Once upon a time", "def fibonacci(n):"]

    def one(p):
        return srv.client().completions.create(model="smollm2", prompt=p, max_tokens=16, temperature=0).choices[0].text

    alone = one(prompts[0])
    with ThreadPoolExecutor(4) as ex:
        together = list(ex.map(one, prompts))
    assert together[0] == alone


# ------------------------------------------------------------------------------------------------ keys and limits
def test_auth(keyed):
    for key in ("wrong", "alpha-key-012345678", "alpha-key-01234567890", "hashed"):   # prefix / extension of a key
        with pytest.raises(openai.AuthenticationError) as e:
            keyed.client(key).models.list()
        assert e.value.status_code == 401
    r = httpx.get(keyed.url + "/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(keyed.url + "/health").status_code == 200           # open
    assert httpx.get(keyed.url + "/metrics").status_code == 401
    for key in ("alpha-key-0123456789", "beta-key-abcdef", "hashed-key"):
        assert keyed.client(key).models.list().data[0].id == "smollm2"


def test_keys_compared_as_fixed_length_digests(monkeypatch):
    import edgellm.serve.auth as auth

    seen = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    store = KeyStore(["k", "a-much-longer-key-" * 10, "sha256:" + "0" * 64])
    for token in ("", "k", "x" * 10_000, "a-much-longer-key-"):
        store.check(token)
    assert seen and all(p == (32, 32) for p in seen)       # every comparison: two SHA-256 digests
    assert len(seen) == 4 * 3                               # every stored key, whatever matched
    assert store.check("k") == hashlib.sha256(b"k").hexdigest()[:8]   # logged as its id, never the key


def test_rate_limit_429(keyed):
    a, b = keyed.client("alpha-key-0123456789"), keyed.client("beta-key-abcdef")
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(5):
            a.models.list()
            a.completions.create(model="smollm2", prompt="Hi", max_tokens=1)
    h = e.value.response.headers
    assert int(h["retry-after"]) >= 1 and h["x-ratelimit-limit-requests"] == "3"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert b.completions.create(model="smollm2", prompt="Hi", max_tokens=1).choices   # others unaffected


def test_queue_full_503(keyed):
    c = keyed.client("hashed-key")   # max_queue=0 and 4 places: five choices at once do not fit
    with pytest.raises(openai.InternalServerError) as e:
        c.completions.create(model="smollm2", prompt="Hi", max_tokens=1, n=5)
    assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1


def test_request_timeout_ends_whole_and_streamed_requests(llm):
    """The server's request timeout: a whole response is a 504, a stream ends with a timeout error event, both
    within a fraction of a second of the deadline, and their sequences leave the engine."""
    s = ServerThread(create_app(ServeConfig(llms={"smollm2": llm}, request_timeout=0.4)))
    try:
        body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0,
                "ignore_eos": True}
        t0 = time.monotonic()
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert 0.35 < took < 2.0
        t0 = time.monotonic()
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        took = time.monotonic() - t0
        assert json.loads(events[-1])["error"]["code"] == "timeout" and len(events) > 2
        assert 0.35 < took < 2.0
        t0 = time.monotonic()
        while engine_state(llm)["running"] and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert engine_state(llm)["running"] == 0
    finally:
        s.stop()


def test_token_bucket_refills():
    now = [0.0]
    b = TokenBucket(60, clock=lambda: now[0])   # one per second
    assert all(b.try_take(1) == 0 for _ in range(60)) and b.try_take(1) == pytest.approx(1.0)
    now[0] += 2
    assert b.try_take(1) == 0
    assert parse_rate("10/s") == 600 and parse_rate("120/h") == 2 and parse_rate("60") == 60


def test_one_json_log_line_per_request(keyed):
    """--log-format json: one line per request with its id, the key's id (never the key), model, status and
    token counts."""
    import io
    import logging

    from edgellm.serve.logs import JSONFormatter, LOGGER

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JSONFormatter())
    log = logging.getLogger(LOGGER)
    was, level = log.disabled, log.level
    log.disabled = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        r = httpx.post(keyed.url + "/v1/completions", headers={"Authorization": "Bearer beta-key-abcdef",
                                                               "X-Request-Id": "req-42"},
                       json={"model": "smollm2", "prompt": "Hi", "max_tokens": 3, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=60)
    finally:
        log.removeHandler(handler)
        log.disabled, log.level = was, level
    lines = [json.loads(x) for x in buf.getvalue().splitlines() if x.strip()]
    mine = [x for x in lines if x.get("request_id") == "req-42"]
    assert len(mine) == 1, lines
    rec = mine[0]
    assert rec["status"] == 200 and rec["model"] == "smollm2" and rec["generated_tokens"] == 3
    assert rec["key_id"] == hashlib.sha256(b"beta-key-abcdef").hexdigest()[:8]
    text = buf.getvalue()
    assert "beta-key-abcdef" not in text and "wrong" not in text
    assert any(x.get("status") == 401 for x in lines)


# ------------------------------------------------------------------------------------------ speculative decoding
@pytest.fixture(scope="module")
def spec_srv(smollm2_path):
    from edgellm.api import LLM

    m = LLM(smollm2_path, n_ctx=1024, n_parallel=4, speculative="ngram")
    m.spec = m.spec.replace(adaptive=False)   # draft every step: the counts below must not hang on measured timings
    s = ServerThread(create_app(ServeConfig(llms={"smollm2": m})))
    yield s
    s.stop()
    m.close()


def test_speculative_requests_match_plain_and_are_counted(spec_srv):
    """Per request (llama-server's speculative.n_max / n_min / p_min): greedy text identical with and without
    drafts; usage reports kept and cut drafts with OpenAI's prediction names; /metrics has the totals."""
    c = spec_srv.client()
    text = ("The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. "
            "Pack my box with five dozen liquor jugs.")
    msgs = [{"role": "user", "content": f"Repeat exactly: {text}"}]
    plain = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=40, temperature=0,
                                      extra_body={"speculative.n_max": 0})
    assert plain.usage.completion_tokens_details is None
    drafted = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=40, temperature=0,
                                        extra_body={"speculative.n_max": 8})
    assert drafted.choices[0].message.content == plain.choices[0].message.content
    d = drafted.usage.completion_tokens_details
    assert d is not None and d.accepted_prediction_tokens + d.rejected_prediction_tokens > 0
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="smollm2", messages=msgs, max_tokens=40, temperature=0, stream=True) if ch.choices)
    assert streamed == plain.choices[0].message.content
    metrics = httpx.get(spec_srv.url + "/metrics").text
    assert 'edgellm_draft_tokens_total{model="smollm2"}' in metrics
    assert 'edgellm_draft_acceptance_rate{model="smollm2"}' in metrics
    for bad in ({"speculative.n_max": 999}, {"speculative.p_min": 2}, {"speculative.n_min": 9, "speculative.n_max": 2},
                {"speculative.n_max": True}, {"speculative.n_max": "4"}, {"speculative.p_min": -1}):
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=4, extra_body=bad)


def test_completion_echo(srv):
    """echo=True through the real client: the prompt, then the completion (streamed: the prompt first)."""
    c = srv.client()
    plain = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    echo = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0,
                                echo=True)
    assert echo.choices[0].text == "The capital of France is" + plain.choices[0].text
    parts = [ch.choices[0].text for ch in c.completions.create(model="smollm2", prompt="The capital of France is",
                                                                max_tokens=4, temperature=0, echo=True, stream=True)]
    assert parts[0] == "The capital of France is" and "".join(parts) == echo.choices[0].text
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="smollm2", prompt="Hi", max_tokens=2, echo=True, logprobs=2)
