"""The gRPC service (edgellm/serve/edgellm.proto) with a real grpcio client: the same text as the Python API,
streamed; keys, limits and bad arguments as gRPC status codes; a cancelled call frees its sequence."""

from __future__ import annotations

import time

import pytest

grpc = pytest.importorskip("grpc", reason="the grpc extra (grpcio, grpcio-tools) is not installed")

from edgellm.serve.app import create_app  # noqa: E402
from edgellm.serve.config import ServeConfig, parse_rate  # noqa: E402
from edgellm.serve.grpc_server import load_protos, serve_grpc  # noqa: E402

KEY = "grpc-key-0123456789"


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from edgellm.api import LLM

    m = LLM(smollm2_path, n_ctx=512, n_parallel=4)
    yield m
    m.close()


@pytest.fixture(scope="module")
def protos():
    return load_protos()


def _start(llm, **config):
    app = create_app(ServeConfig(llms={"smollm2": llm}, **config))
    g, port = serve_grpc(app.state.server, "127.0.0.1", 0)
    return g, grpc.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def open_srv(llm, protos):
    g, channel = _start(llm)
    yield protos[1].LLMStub(channel)
    channel.close()
    g.stop(0)


@pytest.fixture(scope="module")
def keyed(llm, protos):
    g, channel = _start(llm, api_keys=[KEY], rate_limit=parse_rate("3/min"))
    yield protos[1].LLMStub(channel)
    channel.close()
    g.stop(0)


def test_generate_streams_the_text_the_api_gives(open_srv, protos, llm):
    pb = protos[0]
    chunks = list(open_srv.Generate(pb.GenerateRequest(prompt="The capital of France is", max_tokens=12,
                                                       sampling=pb.Sampling(temperature=0))))
    assert len(chunks) > 1 and chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].completion_tokens > 0 and chunks[-1].prompt_tokens > 0
    text = "".join(c.text for c in chunks)
    assert text == llm.generate("The capital of France is", max_tokens=12, temperature=0)


def test_chat_and_models(open_srv, protos, llm):
    pb = protos[0]
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    got = "".join(c.text for c in open_srv.Chat(pb.ChatRequest(
        messages=[pb.Message(**m) for m in msgs], max_tokens=16, sampling=pb.Sampling(temperature=0))))
    want = llm.create_chat_completion(msgs, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    assert got == want and "Paris" in got
    assert list(open_srv.Models(pb.ModelsRequest()).models) == ["smollm2"]


@pytest.mark.parametrize("req, code", [
    (dict(model="nope", prompt="hi"), grpc.StatusCode.NOT_FOUND),
    (dict(prompt="hi", max_tokens=-1), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt="hi", sampling=dict(temperature=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt="hi", sampling=dict(top_k=-5)), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt="hi", stop=["x"] * 100), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_arguments_are_status_codes(open_srv, protos, req, code):
    pb = protos[0]
    if "sampling" in req:
        req["sampling"] = pb.Sampling(**req["sampling"])
    with pytest.raises(grpc.RpcError) as e:
        list(open_srv.Generate(pb.GenerateRequest(**req)))
    assert e.value.code() == code and e.value.details()


def test_keys_and_rate_limit(keyed, protos):
    pb = protos[0]
    req = pb.GenerateRequest(prompt="Hi", max_tokens=2)
    for meta in ((), (("authorization", "Bearer wrong"),), (("authorization", "Bearer " + KEY[:-1]),)):
        with pytest.raises(grpc.RpcError) as e:
            list(keyed.Generate(req, metadata=meta))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = (("authorization", "Bearer " + KEY),)
    codes = []
    for _ in range(5):   # 3 per minute
        try:
            list(keyed.Generate(req, metadata=ok))
            codes.append("ok")
        except grpc.RpcError as e:
            codes.append(e.code())
    assert codes[:3] == ["ok"] * 3 and codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


def test_a_cancelled_call_frees_its_sequence(open_srv, protos, llm):
    pb = protos[0]
    call = open_srv.Generate(pb.GenerateRequest(prompt="Once upon a time", max_tokens=400,
                                                sampling=pb.Sampling(temperature=0)))
    first = next(call)
    assert first.text or first.finish_reason
    call.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if llm.runner.call(lambda core: not core.scheduler.running and not core.scheduler.waiting):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the cancelled sequence still runs")


def test_serve_grpc_port_beside_http(smollm2_path, protos):
    """`edgellm serve MODEL --grpc-port G`: both listen on localhost; the gRPC answer and /health come back."""
    import socket
    import subprocess
    import sys

    import httpx

    def free():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    http, g = free(), free()
    p = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", str(smollm2_path), "--port", str(http),
                          "--grpc-port", str(g), "-c", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.2)
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            stub = protos[1].LLMStub(ch)
            assert list(stub.Models(protos[0].ModelsRequest(), timeout=10).models) == [smollm2_path.stem]
            out = list(stub.Generate(protos[0].GenerateRequest(prompt="Hi", max_tokens=3), timeout=30))
            assert out[-1].finish_reason
    finally:
        p.terminate()
        p.wait(30)
