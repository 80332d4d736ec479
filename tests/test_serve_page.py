"""The chat page (edgellm/serve/static/index.html) in real headless Chromium, driven by Selenium.

Two servers: a stand-in (stdlib HTTP, below) that streams answers chosen by the test, for what a model cannot be
made to say on cue (a fenced code block, an XSS probe, an error, a stream long enough to stop), served under a
base path so the page's relative URLs are checked; and the real `edgellm serve` app with SmolLM2, for the
end-to-end walk a person takes: pick the model, send, watch the answer stream, stop a long one. The last one
leaves a screenshot in tests/artifacts/serve_page.png.

Needs Debian's `chromium` and `chromium-driver` (skipped with that reason where they are missing).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "edgellm" / "serve" / "static" / "index.html"
ARTIFACTS = REPO / "tests" / "artifacts"

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# ---------------------------------------------------------------- the page's own promises, no browser needed


def test_csp_hash_matches_the_inline_script():
    """The Content-Security-Policy admits the one inline script by its hash; an edit to the script must update it
    (else the browser refuses to run it and the page is dead)."""
    html = PAGE.read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(scripts) == 1, "one inline script, no external ones (no build step, no CDN)"
    digest = "sha256-" + base64.b64encode(hashlib.sha256(scripts[0].encode("utf-8")).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1)
    assert f"'{digest}'" in csp, f"update the page's CSP script-src to '{digest}'"
    assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]


def test_page_uses_only_relative_urls():
    """No absolute URL and no root-relative API path: the page must work under any base path and offline."""
    html = PAGE.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)
    assert not re.search(r"""["'`]/v1/""", html)
    assert 'api("v1/chat/completions")' in html and 'api("v1/models")' in html


# ---------------------------------------------------------------- the browser

@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("headless Chromium not installed: apt-get install chromium chromium-driver (Debian)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,820", "--force-prefers-reduced-motion", "--lang=en-US"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver's path is given, so Selenium Manager never tries to download one (no internet here).
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    drv.set_script_timeout(30)
    yield drv
    drv.quit()


def wait(drv, cond, timeout=20.0, what="condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout, poll_frequency=0.02).until(lambda d: cond(d), message=f"waiting for {what}")


def open_page(drv, url):
    drv.get(url)
    drv.execute_script("localStorage.clear()")
    drv.get(url)
    wait(drv, lambda d: d.find_element("id", "model").get_attribute("data-loaded") is not None, what="models list")


def last_answer(drv):
    return drv.find_elements("css selector", "#log .msg.assistant")[-1]


def answer_text(drv):
    return drv.execute_script(
        "const m = document.querySelectorAll('#log .msg.assistant'); return m.length ? m[m.length-1]"
        ".querySelector('.content').textContent : ''")


def type_and_enter(drv, text):
    from selenium.webdriver.common.keys import Keys

    box = drv.find_element("id", "prompt")
    box.click()
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def watch_stream(drv, timeout=60.0):
    """Sample the streaming answer until it finishes: the distinct lengths it went through and its final status."""
    lengths, t_end = [], time.monotonic() + timeout
    while time.monotonic() < t_end:
        status, n = drv.execute_script(
            "const m = document.querySelectorAll('#log .msg.assistant'); const a = m[m.length-1];"
            "return [a.dataset.status, a.querySelector('.content').textContent.length];")
        if n and (not lengths or lengths[-1] != n):
            lengths.append(n)
        if status != "streaming":
            return lengths, status
        time.sleep(0.02)
    raise AssertionError(f"the answer did not finish in {timeout} s (lengths seen: {lengths[-5:]})")


def ui_idle(drv):
    s = drv.find_element("id", "send")
    return (drv.find_element("id", "composer").get_attribute("data-state") == "idle" and s.is_enabled()
            and not drv.find_element("id", "stop").is_enabled())


def severe_console_errors(drv):
    """Console errors other than the ones a test provokes on purpose (HTTP 4xx answers, an aborted fetch)."""
    return [e for e in drv.get_log("browser") if e["level"] == "SEVERE"
            and not re.search(r"status of 4\d\d|AbortError|net::ERR_", e["message"])]


# ---------------------------------------------------------------- the stand-in server

XSS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
CODE_ANSWER = (
    "Here is the function, and a probe: " + XSS + " and `inline <b>code</b>`.\n\n"
    "```python\ndef add(a, b):\n    return a + b  # " + XSS + "\n```\n\nDone."
)


class StandIn(ThreadingHTTPServer):
    """Mimics edgellm serve's routes under BASE: GET v1/models, POST v1/chat/completions (SSE), with Bearer auth
    when `key` is set. The last user message picks the answer: 'code' (CODE_ANSWER), 'long' (streams for
    minutes until the client goes away), 'error' (a 400 in OpenAI's shape), anything else a short greeting."""

    BASE = "/chat/ui/"
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.key: str | None = None
        self.requests: list[dict] = []        # each chat request: {"body": ..., "auth": ...}
        self.disconnects = threading.Event()  # a stream's client went away mid-answer

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}{self.BASE}"


class Handler(BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args):  # quiet
        pass

    def _json(self, status, obj, extra=()):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _route(self):
        if not self.path.startswith(StandIn.BASE):
            self._json(404, {"error": {"message": f"not found: {self.path}", "type": "invalid_request_error"}})
            return None
        return self.path[len(StandIn.BASE):]

    def _authorized(self):
        if self.server.key is None or self.headers.get("Authorization") == f"Bearer {self.server.key}":
            return True
        self._json(401, {"error": {"message": "Invalid API key.", "type": "invalid_request_error",
                                   "code": "invalid_api_key"}}, [("WWW-Authenticate", "Bearer")])
        return False

    def do_GET(self):
        route = self._route()
        if route == "":
            body = PAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif route == "v1/models":
            if self._authorized():
                self._json(200, {"object": "list", "data": [{"id": "fake-a", "object": "model"},
                                                            {"id": "fake-b", "object": "model"}]})
        elif route is not None:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        route = self._route()
        if route != "v1/chat/completions" or not self._authorized():
            if route is not None and route != "v1/chat/completions":
                self._json(404, {"error": {"message": "not found"}})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"body": body, "auth": self.headers.get("Authorization")})
        prompt = body["messages"][-1]["content"]
        if prompt == "error":
            self._json(400, {"error": {"message": "max_tokens must be at least 1", "type": "invalid_request_error",
                                       "param": "max_tokens", "code": None}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # HTTP/1.0: the body runs until the connection closes

        def event(delta=None, finish=None, usage=None, raw=None):
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                     "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
            if usage:
                chunk["usage"] = usage
            self.wfile.write((raw or f"data: {json.dumps(chunk)}\n\n").encode())
            self.wfile.flush()

        try:
            event({"role": "assistant", "content": ""})
            self.wfile.write(b": keep-alive comment, ignored\n\n")
            if prompt == "long":
                for i in range(4000):
                    event({"content": f"word{i} "})
                    time.sleep(0.03)
                return
            text = CODE_ANSWER if prompt == "code" else f"Hello! You said {prompt!r}. This is the stand-in."
            pieces = re.findall(r"\s*\S+|\s+", text)
            for p in pieces:
                event({"content": p})
                time.sleep(0.01 if prompt == "code" else 0.06)
            event(finish="stop")
            event(usage={"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)})
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnects.set()


@pytest.fixture()
def standin():
    srv = StandIn()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# ---------------------------------------------------------------- the page against the stand-in


def test_streams_an_answer_and_sends_the_history(browser, standin):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    drv = browser
    open_page(drv, standin.url)
    picker = Select(drv.find_element("id", "model"))
    assert [o.text for o in picker.options] == ["fake-a", "fake-b"]
    picker.select_by_value("fake-b")

    # Shift+Enter is a new line, not a send.
    box = drv.find_element("id", "prompt")
    box.click()
    box.send_keys("two")
    ActionChains(drv).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    box.send_keys("lines")
    assert box.get_attribute("value") == "two\nlines" and not standin.requests
    box.send_keys(Keys.ENTER)

    lengths, status = watch_stream(drv)
    assert status == "done"
    assert len(lengths) >= 4 and lengths == sorted(lengths), f"the answer should grow as it streams: {lengths}"
    assert answer_text(drv) == "Hello! You said 'two\\nlines'. This is the stand-in."
    assert ui_idle(drv) and box.get_attribute("value") == ""
    assert "tokens/s" in last_answer(drv).find_element("css selector", ".meta").text
    req = standin.requests[0]["body"]
    assert req["model"] == "fake-b" and req["stream"] is True and standin.requests[0]["auth"] is None
    assert req["messages"] == [{"role": "user", "content": "two\nlines"}]

    # The second turn carries the first one; the Send button works as well as Enter.
    drv.find_element("id", "max-tokens").send_keys("64")
    box.send_keys("again")
    drv.find_element("id", "send").click()
    assert watch_stream(drv)[1] == "done"
    req = standin.requests[1]["body"]
    assert [m["role"] for m in req["messages"]] == ["user", "assistant", "user"]
    assert req["messages"][1]["content"].startswith("Hello! You said") and req["max_tokens"] == 64
    assert drv.execute_script("return localStorage.getItem('edgellm.model')") == "fake-b"
    assert not severe_console_errors(drv)


def test_stop_ends_the_stream(browser, standin):
    drv = browser
    open_page(drv, standin.url)
    type_and_enter(drv, "long")
    wait(drv, lambda d: len(answer_text(d)) > 60, what="the long answer to start")
    assert drv.find_element("id", "stop").is_enabled() and not drv.find_element("id", "send").is_enabled()
    drv.find_element("id", "stop").click()
    wait(drv, lambda d: last_answer(d).get_attribute("data-status") == "stopped", timeout=5, what="the stop")
    assert ui_idle(drv)
    assert standin.disconnects.wait(5), "the server should see the client go away"
    stopped_at = answer_text(drv)
    time.sleep(0.3)
    assert answer_text(drv) == stopped_at, "nothing arrives after Stop"
    assert "stopped" in last_answer(drv).find_element("css selector", ".meta").text
    # The UI is ready again: the next message streams normally and carries the partial answer in its history.
    type_and_enter(drv, "after")
    assert watch_stream(drv)[1] == "done"
    msgs = standin.requests[-1]["body"]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"] and msgs[1]["content"].strip() == stopped_at


def test_code_blocks_render_and_model_output_stays_text(browser, standin):
    drv = browser
    open_page(drv, standin.url)
    type_and_enter(drv, "code")
    assert watch_stream(drv)[1] == "done"
    ans = last_answer(drv)
    pres = ans.find_elements("css selector", ".content pre > code")
    assert len(pres) == 1
    code = pres[0]
    assert code.get_attribute("class") == "language-python"
    assert drv.execute_script("return arguments[0].textContent", code) == (
        "def add(a, b):\n    return a + b  # " + XSS)
    # The probe shows as text, in and out of the code block, and nothing of it became markup or ran.
    assert XSS in ans.find_element("css selector", ".content p").text
    assert drv.execute_script("return window.__pwned") is None
    assert not drv.find_elements("css selector", "#log img, #log script, #log b")
    inline = ans.find_elements("css selector", ".content p > code")
    assert [c.text for c in inline] == ["inline <b>code</b>"]
    drv.save_screenshot(str(_artifact("serve_page_standin.png")))


@pytest.mark.parametrize("text, expect", [
    # (markdown, [(tag, text), ...]) for the top-level blocks the renderer makes
    ("plain", [("P", "plain")]),
    ("a\n\nb", [("P", "a"), ("P", "b")]),
    ("```\nx < y\n```", [("PRE", "x < y")]),
    ("```js\nlet a\n", [("PRE", "let a\n")]),                           # unclosed, as mid-stream
    ("~~~\n```\ninside\n~~~\nafter", [("PRE", "```\ninside"), ("P", "after")]),
    ("````\n```\n````", [("PRE", "```")]),                                # a longer fence holds a shorter one
    ("x <script>alert(1)</script>", [("P", "x <script>alert(1)</script>")]),
])
def test_markdown_renderer(browser, standin, text, expect):
    drv = browser
    if not drv.current_url.startswith(standin.url):
        open_page(drv, standin.url)
    got = drv.execute_script(
        "const f = window.edgellmChat.renderMarkdown(arguments[0]);"
        "return Array.from(f.children).map(e => [e.tagName, e.textContent]);", text)
    assert [tuple(g) for g in got] == expect


def test_api_key_and_server_errors(browser, standin):
    from selenium.webdriver.common.keys import Keys

    drv = browser
    standin.key = "sk-test-123"
    open_page(drv, standin.url)
    err = drv.find_element("id", "error")
    assert "Invalid API key." in err.text and "401" in err.text  # the server's own message
    field = drv.find_element("id", "api-key")
    assert field.get_attribute("type") == "password"
    field.send_keys("sk-test-123", Keys.TAB)  # change fires on leaving the field
    wait(drv, lambda d: d.find_element("id", "model").get_attribute("data-loaded") == "2", what="models with the key")
    assert err.text == ""
    assert drv.execute_script("return localStorage.getItem('edgellm.apiKey')") == "sk-test-123"
    type_and_enter(drv, "hi")
    assert watch_stream(drv)[1] == "done"
    assert standin.requests[-1]["auth"] == "Bearer sk-test-123"

    # The key survives a reload; a request the server refuses shows its message and gives the text back to retry.
    drv.refresh()
    wait(drv, lambda d: d.find_element("id", "model").get_attribute("data-loaded") == "2", what="models after reload")
    assert drv.find_element("id", "api-key").get_attribute("value") == "sk-test-123"
    type_and_enter(drv, "error")
    wait(drv, lambda d: "max_tokens must be at least 1" in d.find_element("id", "error").text, what="the error")
    assert "400" in drv.find_element("id", "error").text
    assert last_answer(drv).get_attribute("data-status") == "error"
    assert drv.find_element("id", "prompt").get_attribute("value") == "error"
    assert ui_idle(drv)


# ---------------------------------------------------------------- the page against the real server


def _artifact(name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEY = "sk-page-test-key"


@pytest.fixture(scope="module")
def real_server(smollm2_path):
    """`edgellm serve` as the CLI builds it (SmolLM2, a key required), on uvicorn in a background thread."""
    app_mod = pytest.importorskip("edgellm.serve.app", reason="edgellm.serve.app not there yet")
    uvicorn = pytest.importorskip("uvicorn")
    from edgellm.serve.config import ServeConfig

    from starlette.applications import Starlette
    from starlette.routing import Mount

    inner = app_mod.create_app(ServeConfig(models=[str(smollm2_path)], api_keys=[KEY],
                                           llm_kwargs={"n_ctx": 2048}))
    # The app at / (as `edgellm serve` runs it) and mounted under /llm/ (as another ASGI host would mount it),
    # one app and one model behind both; the outer lifespan runs the app's own.
    app = Starlette(routes=[Mount("/llm", app=inner), Mount("/", app=inner)],
                    lifespan=lambda _: inner.router.lifespan_context(inner))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    t_end = time.monotonic() + 120
    while not server.started:
        assert t.is_alive() and time.monotonic() < t_end, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    t.join(30)


def _set(drv, element_id, value):
    el = drv.find_element("id", element_id)
    el.clear()
    el.send_keys(str(value))


@pytest.mark.slow
def test_real_server_chat_stream_and_stop(browser, real_server):
    """A person's walk through the page against the real server and model: the key, the picker, a streamed answer,
    a long answer stopped, a code answer; the screenshot is tests/artifacts/serve_page.png."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    drv = browser
    open_page(drv, real_server)
    # Auth is on: the page says so in the server's words until the key is given.
    assert "401" in drv.find_element("id", "error").text
    drv.find_element("id", "api-key").send_keys(KEY, Keys.TAB)
    wait(drv, lambda d: d.find_element("id", "model").get_attribute("data-loaded") not in (None, "0"),
         what="the real server's models")
    assert drv.find_element("id", "error").text == ""
    picker = Select(drv.find_element("id", "model"))
    ids = [o.get_attribute("value") for o in picker.options]
    assert len(ids) == 1 and "smollm2" in ids[0].lower(), ids
    picker.select_by_value(ids[0])
    _set(drv, "temperature", 0)

    # A short answer streams in pieces and finishes.
    _set(drv, "max-tokens", 48)
    type_and_enter(drv, "Hi! Who are you?")
    lengths, status = watch_stream(drv, timeout=120)
    assert status == "done", drv.find_element("id", "error").text
    assert len(lengths) >= 3 and lengths == sorted(lengths), f"the answer should grow as it streams: {lengths}"
    assert last_answer(drv).get_attribute("data-finish") in ("stop", "length")
    assert ui_idle(drv)

    # A long one is stopped midway: the stream ends, the UI is ready at once, and the server is free for the next.
    _set(drv, "max-tokens", 1500)
    type_and_enter(drv, "Write a very long story about a dragon who learns to bake bread. Make it long.")
    wait(drv, lambda d: len(answer_text(d)) > 120, timeout=120, what="the long story to start")
    drv.find_element("id", "stop").click()
    wait(drv, lambda d: last_answer(d).get_attribute("data-status") == "stopped", timeout=5, what="the stop")
    assert ui_idle(drv)
    stopped_at = answer_text(drv)
    time.sleep(0.5)
    assert answer_text(drv) == stopped_at

    _set(drv, "max-tokens", 160)
    type_and_enter(drv, "Write a Python function that adds two numbers, in a code block.")
    t0 = time.monotonic()
    lengths, status = watch_stream(drv, timeout=120)
    assert status == "done", drv.find_element("id", "error").text
    assert time.monotonic() - t0 < 90, "the stopped story should not hold the engine"
    assert len(drv.find_elements("css selector", "#log .msg")) == 6
    assert not severe_console_errors(drv)
    drv.save_screenshot(str(_artifact("serve_page.png")))


@pytest.mark.slow
def test_real_server_under_a_base_path(browser, real_server):
    """Mounted at /llm/, the page finds its API at /llm/v1/... by relative URLs."""
    from selenium.webdriver.common.keys import Keys

    drv = browser
    open_page(drv, real_server + "llm/")
    drv.find_element("id", "api-key").send_keys(KEY, Keys.TAB)
    wait(drv, lambda d: d.find_element("id", "model").get_attribute("data-loaded") == "1", what="models under /llm/")
    _set(drv, "max-tokens", 12)
    type_and_enter(drv, "Say hello.")
    lengths, status = watch_stream(drv, timeout=120)
    assert status == "done" and lengths, drv.find_element("id", "error").text
    urls = drv.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    api_urls = [u for u in urls if "/v1/" in u]
    assert api_urls and all(u.startswith(real_server + "llm/v1/") for u in api_urls), api_urls
