"""The `edgellm` command as a user meets it: real processes, real model, errors on one line."""

from __future__ import annotations

import json
import subprocess

import pytest
import sys


from conftest import load_fixture


def edgellm(*args, input=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=timeout)


def assert_one_line_error(p, *words):
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    for w in words:
        assert w in lines[0]


def test_run_answers_the_capital_of_france(smollm2_path):
    p = edgellm("run", smollm2_path, "--raw", "-p", "The capital of France is", "-n", "12", "--seed", "1", "--verbose")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout
    assert "tok/s" in p.stderr and "tok/s" not in p.stdout  # stats on stderr only


def test_run_raw_greedy_matches_llamacpp(smollm2_path, fixtures):
    case = load_fixture(fixtures, "logits-smollm2-135m-instruct-q4_1.json")["cases"][0]
    p = edgellm("run", smollm2_path, "--raw", "-p", case["prompt"], "-n", "5", "--temp", "0")
    assert p.returncode == 0, p.stderr
    text = p.stdout[:-1]  # run ends the answer with a newline of its own
    assert len(text) > len(" Paris") and case["greedy32_text"].startswith(text)


def test_chat_prompt_uses_the_template(smollm2_path):
    p = edgellm("run", smollm2_path, "--chat", "-p", "What is the capital of France? Answer in one word.", "-n", "24", "--temp", "0")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout and "<|im" not in p.stdout


def test_interactive_chat_reads_turns_until_bye(smollm2_path):
    p = edgellm("run", smollm2_path, "-n", "8", "--temp", "0", input="Hello!\n\n/bye\nnever read\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()


def test_chat_save_and_load(smollm2_path, tmp_path):
    """/save FILE writes the conversation as JSON; /load FILE brings it back (a later turn sees it); a file that is
    not a saved chat changes nothing and says why."""
    saved, bad = tmp_path / "chat.json", tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "", "content": "x"}]}')
    script = (f"My name is Ada.\n/save {saved}\n/clear\n/load {bad}\n/load {tmp_path}\n/load {saved}\n"
              f"/save {tmp_path / 'again.json'}\n/bye\n")
    p = edgellm("run", smollm2_path, "-n", "8", "--temp", "0", input=script)
    assert p.returncode == 0, p.stderr
    first = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] and first[0]["content"] == "My name is Ada."
    assert json.loads((tmp_path / "again.json").read_text())["messages"] == first   # loaded back whole
    assert p.stderr.count("cannot load") == 2 and "Loaded 2 messages" in p.stderr and "Traceback" not in p.stderr


def test_tokenize_json_matches_llamacpp(smollm2_path, fixtures):
    case = next(c for c in load_fixture(fixtures, "tokenizer-smollm2-135m-instruct-q4_1.json")["cases"] if c["ids"])
    p = edgellm("tokenize", smollm2_path, case["text"], "--json", "--no-add-special")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"ids": case["ids"]}


def test_info_describes_the_model(smollm2_path):
    p = edgellm("info", smollm2_path)
    assert p.returncode == 0, p.stderr
    assert "llama" in p.stdout and "n_layer" in p.stdout and "49152" in p.stdout


def test_missing_model_is_one_line(tmp_path):
    assert_one_line_error(edgellm("run", tmp_path / "nope.gguf", "-p", "hi"), "nope.gguf")


def test_unknown_name_is_one_line():
    assert_one_line_error(edgellm("info", "no-such-model"), "no-such-model")


def test_garbage_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTAGGUF" + bytes(100))
    assert_one_line_error(edgellm("run", bad, "-p", "hi"), "magic")


def test_truncated_model_is_one_line(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    assert_one_line_error(edgellm("run", cut, "-p", "hi"))


def test_bad_flag_is_a_usage_error(smollm2_path):
    p = edgellm("run", smollm2_path, "--temp", "hot")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "temp" in p.stderr


def test_prompt_longer_than_context_is_one_line(smollm2_path):
    assert_one_line_error(edgellm("run", smollm2_path, "-p", "word " * 64, "-c", "16", "--raw"), "context")


def test_ctrl_c_stops_the_answer_not_the_chat(smollm2_path):
    import os
    import signal
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "run", str(smollm2_path), "-n", "300", "--verbose",
                          "-c", "2048"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        p.stdin.write("Write a very long story about a dragon.\n")
        p.stdin.flush()
        first = p.stdout.read(20)  # the answer is streaming
        assert first
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)  # stops this answer...
        time.sleep(0.5)
        p.stdin.write("Say hello.\n/bye\n")  # ...and the chat goes on to the next turn
        p.stdin.flush()
        out, err = p.communicate(timeout=240)  # closes stdin: EOF after /bye
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert err.count("prompt:") == 2, err  # one stats line per answered turn


def test_grammar_and_json_schema_flags(smollm2_path, tmp_path):
    p = edgellm("run", smollm2_path, "--raw", "-p", "Is Paris in France? Answer:", "--grammar", 'root ::= " yes" | " no"',
                "-n", "8", "--temp", "0")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() in ("yes", "no")
    gfile = tmp_path / "abc.gbnf"
    gfile.write_text('root ::= [abc]+ "."\n')
    p = edgellm("run", smollm2_path, "--raw", "-p", "Letters:", "--grammar-file", gfile, "-n", "12", "--seed", "1")
    assert p.returncode == 0, p.stderr
    text = p.stdout.rstrip("\n")
    assert text and set(text.rstrip(".")) <= set("abc")
    schema = '{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}},"required":["name","age"]}'
    p = edgellm("run", smollm2_path, "--chat", "-p", "Give me a person as JSON.", "-j", schema, "-n", "48", "--temp", "0")
    assert p.returncode == 0, p.stderr
    obj = json.loads(p.stdout)
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int)


def test_sampler_flags(smollm2_path):
    p = edgellm("run", smollm2_path, "--raw", "-p", "Once upon a time", "--mirostat", "2", "--dry-multiplier", "0.8",
                "--logit-bias", "13-inf", "--samplers", "penalties;top_k;temperature", "--seed", "3", "-n", "12")
    assert p.returncode == 0, p.stderr and p.stdout.strip()
    assert_one_line_error(edgellm("run", smollm2_path, "-p", "hi", "--samplers", "top_k;bogus"), "bogus")
    assert_one_line_error(edgellm("run", smollm2_path, "-p", "hi", "--top-p", "nan"), "top_p")
    assert_one_line_error(edgellm("run", smollm2_path, "-p", "hi", "--grammar", "root ::= ("), "GBNF")
    p = edgellm("run", smollm2_path, "-p", "hi", "--logit-bias", "12x")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "logit-bias" in p.stderr


def test_prompt_file_ignore_eos_and_kv_flags(smollm2_path, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("The capital of France is", encoding="utf-8")
    a = edgellm("run", smollm2_path, "--raw", "-f", f, "-n", "6", "--temp", "0")
    b = edgellm("run", smollm2_path, "--raw", "-p", "The capital of France is", "-n", "6", "--temp", "0")
    assert a.returncode == 0 and a.stdout == b.stdout and "Paris" in a.stdout
    assert_one_line_error(edgellm("run", smollm2_path, "-f", tmp_path / "none.txt"), "none.txt")
    both = edgellm("run", smollm2_path, "-f", f, "-p", "hi")
    assert both.returncode == 2 and "not both" in both.stderr and "Traceback" not in both.stderr
    # EOS pushed up by a logit bias ends the text at once; --ignore-eos overrides that and runs to -n
    from edgellm.model import Model

    m = Model(smollm2_path)
    eos = m.tokenizer.eos_id
    m.close()
    args = ("run", smollm2_path, "--raw", "-p", "Hello", "--temp", "0", "-n", "20", "--logit-bias", f"{eos}+100", "--verbose")
    short, long = edgellm(*args), edgellm(*args, "--ignore-eos")
    assert short.returncode == 0 and long.returncode == 0, long.stderr
    assert "generation: 1 tokens" in short.stderr and "generation: 20 tokens" in long.stderr
    # KV cache flags: q8_0 rows, a budget, and what --verbose says about them
    p = edgellm("run", smollm2_path, "--raw", "-p", "Hello", "-n", "4", "-ctk", "q8_0", "-ctv", "q8_0", "--kv-budget", "20MiB",
                "--verbose")
    assert p.returncode == 0, p.stderr
    assert "KV pool q8_0" in p.stderr and "budget 20 MiB" in p.stderr
    assert edgellm("run", smollm2_path, "-p", "Hi", "-ctk", "q4_0").returncode == 2       # not a cache type
    assert_one_line_error(edgellm("run", smollm2_path, "-p", "Hi", "--kv-budget", "lots"), "lots")
    p = edgellm("info", smollm2_path, "--kv-budget", "50MiB")
    assert p.returncode == 0 and "n_ctx 2048" in p.stdout and "budget 50 MiB" in p.stdout


def test_run_with_speculative_decoding(smollm2_path, gemma3_path):
    """--spec-type ngram and -md give the plain greedy text; --verbose reports the drafts; bad pairs are one-line
    errors (a draft with another vocabulary, ngram with a draft model, draft without one)."""
    prompt = "Copy: alpha beta gamma delta epsilon zeta eta theta. Copy: alpha beta gamma"
    plain = edgellm("run", smollm2_path, "--raw", "-p", prompt, "-n", "24", "--temp", "0")
    assert plain.returncode == 0, plain.stderr
    for extra in (["--spec-type", "ngram"], ["-md", smollm2_path, "--draft-p-min", "0"],
                  ["-md", smollm2_path, "--draft-vocab", "3000"]):
        p = edgellm("run", smollm2_path, "--raw", "-p", prompt, "-n", "24", "--temp", "0", "--verbose", *extra)
        assert p.returncode == 0, p.stderr
        assert p.stdout == plain.stdout
        assert "speculative (" in p.stderr and "accepted" in p.stderr
    assert_one_line_error(edgellm("run", smollm2_path, "-p", "Hi", "-n", "2", "-md", gemma3_path),
                          "different vocabularies")
    for bad in (["--spec-type", "ngram", "-md", smollm2_path], ["--spec-type", "draft"], ["--draft-max", "99"],
                ["-md", smollm2_path, "--draft-vocab", "lots"], ["-md", smollm2_path, "--draft-vocab", "-3"]):
        p = edgellm("run", smollm2_path, "-p", "Hi", "-n", "2", *bad)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (bad, p.stderr)
    assert_one_line_error(edgellm("run", smollm2_path, "-p", "Hi", "-n", "2", "--draft-p-min", "nan"), "p_min")


def test_ctrl_c_during_run_p_exits_130(smollm2_path):
    """SIGINT while `run -p` generates: exit status 130 and no traceback (the chat keeps going instead: Ctrl-C there
    only stops the answer)."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "run", str(smollm2_path), "--raw", "-p", "Once upon a time",
                          "-n", "-1", "--temp", "0", "-c", "8192"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 60
        while p.stdout.read(1) == "" and time.monotonic() < deadline:   # wait for the first generated text
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err


def test_run_takes_a_question_as_ollama_does(smollm2_path):
    """`edgellm run MODEL "question"` answers it as a chat turn (the model's template), the same as -p with --chat;
    a question and -p together are a usage error."""
    q = edgellm("run", smollm2_path, "Name the capital of France.", "-n", "16", "--temp", "0")
    chat = edgellm("run", smollm2_path, "-p", "Name the capital of France.", "--chat", "-n", "16", "--temp", "0")
    assert q.returncode == 0 and chat.returncode == 0, (q.stderr, chat.stderr)
    assert q.stdout == chat.stdout and "Paris" in q.stdout
    both = edgellm("run", smollm2_path, "Hi", "-p", "Hello", "-n", "2")
    assert both.returncode == 2 and "Traceback" not in both.stderr
    # -p answers as a chat too where the file has a template (as llama-cli and ollama); --raw continues it
    p = edgellm("run", smollm2_path, "-p", "Name the capital of France.", "-n", "16", "--temp", "0")
    raw = edgellm("run", smollm2_path, "--raw", "-p", "Name the capital of France.", "-n", "16", "--temp", "0")
    assert p.stdout == q.stdout and raw.returncode == 0 and raw.stdout != q.stdout


def test_text_files_are_regular_bounded_and_honest(smollm2_path, tmp_path):
    """-f reads regular files only (no /dev/zero, FIFO or directory: a one-line error, not a hang or a memory blow-up);
    bytes that are not UTF-8 are replaced and a warning says how many."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        assert_one_line_error(edgellm("run", smollm2_path, "-f", path, "-n", "2", timeout=60), "not a regular file")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait \xff done")
    p = edgellm("run", smollm2_path, "-f", bad, "-n", "2", "--temp", "0")
    assert p.returncode == 0, p.stderr
    assert "not valid UTF-8: 2 undecodable" in p.stderr


def test_base_model_without_chat_template_is_flagged(smollm2_path, gemma3_path):
    """The Gemma 3 file has no chat template (a base model): info says so and chatting with it warns; SmolLM2 (an
    instruct model with its template) does not warn; --raw continuation never warns."""
    info = edgellm("info", gemma3_path)
    assert info.returncode == 0 and "none in the file" in info.stdout
    g = edgellm("run", gemma3_path, "What is 2+2?", "-n", "2", "--temp", "0")
    assert g.returncode == 0 and "no chat template" in g.stderr
    raw = edgellm("run", gemma3_path, "-p", "2+2=", "-n", "2", "--temp", "0")
    s = edgellm("run", smollm2_path, "What is 2+2?", "-n", "2", "--temp", "0")
    assert "no chat template" not in raw.stderr and "no chat template" not in s.stderr


def test_chat_slash_commands(smollm2_path):
    """The interactive chat takes Ollama's commands: /? help, /set parameter, /set system, /show info, /clear, \"\"\"
    for several lines; an unknown /command is reported and never sent to the model; /bye ends the chat."""
    script = "\n".join([
        "/?", "/set parameter temperature 0", "/set parameter num_predict 6", "/set parameter top_k abc", "/bogus",
        "/show info", "What is 2+2?", "/clear", '"""', "What is", "2+2?", '"""', "/set system You are terse.",
        "/bye", "Never sent",
    ]) + "\n"
    p = edgellm("run", smollm2_path, input=script)
    assert p.returncode == 0, p.stderr
    assert "/set parameter NAME VALUE" in p.stderr and "Set temperature to 0.0." in p.stderr
    assert "unknown command '/bogus'" in p.stderr and "bad value for top_k" in p.stderr
    assert "num_predict 6" in p.stderr and "Cleared the conversation." in p.stderr
    answers = [line for line in p.stdout.splitlines() if line.strip()]
    assert len(answers) == 2
    # each as a first turn: the one-line question, then (after /clear) the two-line one
    for answer, question in zip(answers, ("What is 2+2?", "What is\n2+2?")):
        direct = edgellm("run", smollm2_path, question, "-n", "6", "--temp", "0")
        assert direct.stdout.strip() == answer


def test_check_tensors_names_a_corrupt_tensor(smollm2_path, tmp_path):
    """A block scale overwritten with NaN (bytes that are not valid Q4_1): --check-tensors on info and run, and
    LLM(check_tensors=True), name the tensor in a one-line error; the intact file passes."""
    import shutil

    from edgellm import LLM, ModelError
    from edgellm.gguf import GGUFFile

    bad = tmp_path / "bad.gguf"
    shutil.copy(smollm2_path, bad)
    g = GGUFFile(bad)
    info = next(t for t in g.tensors.values() if t.type.name == "Q4_1")
    g.close()
    with open(bad, "r+b") as f:
        f.seek(info.offset + 20 * 7)   # block 7's scale d (Q4_1 blocks are 20 bytes: d, m, 16 bytes of nibbles)
        f.write(b"\x00\x7e")           # a half-precision NaN
    ok = edgellm("info", smollm2_path, "--check-tensors")
    assert ok.returncode == 0 and "checked" in ok.stdout
    assert_one_line_error(edgellm("info", bad, "--check-tensors"), info.name, "block 7")
    assert_one_line_error(edgellm("run", bad, "-p", "Hi", "-n", "1", "--check-tensors"), info.name)
    with pytest.raises(ModelError, match=info.name):
        LLM(bad, n_ctx=64, check_tensors=True)


def test_numba_fallback_announces_its_first_compile(tmp_path, smollm2_path):
    """Without the native core (EDGELLM_NATIVE=0: as a machine without a C compiler), a cold numba cache makes the
    first run say on stderr that it is compiling; `info` says why the native core is not used."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, EDGELLM_NATIVE="0", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    info = subprocess.run([sys.executable, "-m", "edgellm.cli", "info", str(smollm2_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "backend:      numba (edgellm's native core is disabled by EDGELLM_NATIVE=0)" in info.stdout
    import io
    from contextlib import redirect_stderr

    from edgellm.backends import loader

    cold, warm = tmp_path / "cold", tmp_path / "warm"
    cold.mkdir()
    (warm / "sub").mkdir(parents=True)
    (warm / "sub" / "kernels._matmul-12.py311.nbi").write_bytes(b"")
    for places, said in (([cold], True), ([cold, warm], False)):
        buf = io.StringIO()
        with redirect_stderr(buf):
            loader._announce_numba_compile(["native: not built"], places)
        assert ("compiling the numba fallback's kernels" in buf.getvalue()
                and "native: not built" in buf.getvalue()) == said
