"""`edgellm bench` (pp / tg like llama-bench, `-d` context depth) and the random-weight shape presets of
bench/random_weights.py that the side-by-side benchmarks use."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgellm.cli import cli

REPO = Path(__file__).resolve().parents[1]


def test_bench_json_and_depth(smollm2_path):
    r = CliRunner().invoke(cli, ["bench", str(smollm2_path), "-p", "16", "-n", "4", "-r", "1", "-d", "70",
                                 "-t", "2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["depth"] == 70 and doc["pp"]["n"] == 16 and doc["tg"]["n"] == 4
    assert doc["pp"]["tok_s"] > 0 and doc["tg"]["tok_s"] > 0 and doc["tg"]["gb_s"] > 0


def test_bench_depth_past_the_context_is_a_clear_error(smollm2_path):
    r = CliRunner().invoke(cli, ["bench", str(smollm2_path), "-p", "16", "-n", "0", "-r", "1", "-d", "9000"])
    assert r.exit_code == 2
    assert "exceed the model's context (8192)" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["bench", str(smollm2_path), "-d", "-1"])
    assert r.exit_code == 2


def _random_weights():
    spec = importlib.util.spec_from_file_location("random_weights", REPO / "bench" / "random_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name,params", [("smollm2-360m", 362e6), ("smollm2-1.7b", 1711e6),
                                         ("qwen2.5-0.5b", 494e6)])
def test_shape_presets_have_the_published_sizes(name, params):
    """The presets' tensors add up to the published parameter counts (tied embeddings counted once)."""
    rw = _random_weights()
    from edgellm.quant import GGMLType

    man = rw.preset_manifest(name, GGMLType.Q4_0)
    total = 0
    for t in man["tensors"]:
        n = 1
        for d in t["shape"]:
            n *= d
        total += n
    assert abs(total - params) / params < 0.01, total
    names = {t["name"] for t in man["tensors"]}
    assert ("blk.0.attn_q.bias" in names) == name.startswith("qwen")


def test_shape_preset_builds_a_file_the_native_core_runs(tmp_path, monkeypatch):
    """A preset shrunk to 2 layers and a small vocabulary: written, loaded, and run by the default backend."""
    rw = _random_weights()
    from edgellm.backends.loader import create_backend
    from edgellm.model import Model
    from edgellm.quant import GGMLType

    monkeypatch.setitem(rw.PRESETS, "tiny-qwen2", ("qwen2", 2, 128, 256, 4, 2, 512, 1e6, 1e-6, 256))
    out = tmp_path / "tiny.gguf"
    rw.build(rw.preset_manifest("tiny-qwen2", GGMLType.Q8_0), str(out))
    m = Model(out)
    try:
        be = create_backend(m, "auto", 1)
        from edgellm.bench import run_bench
        res = run_bench(m, be, n_prompt=8, n_gen=2, reps=1)
        assert res["backend"] in ("native", "numba", "reference") and res["pp"]["tok_s"] > 0
        try:
            from edgellm.backends.native import NativeBackend  # noqa: F401
            assert res["backend"] == "native"
        except ImportError:
            pass
    finally:
        m.close()


def test_bench_depth_past_a_sliding_window(gemma3_path):
    """Gemma 3's window layers (512 tokens) keep only their window while the depth is fed in, as in the engine."""
    r = CliRunner().invoke(cli, ["bench", str(gemma3_path), "-p", "16", "-n", "4", "-r", "1", "-d", "1100",
                                 "-t", "2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["depth"] == 1100 and doc["pp"]["tok_s"] > 0 and doc["tg"]["tok_s"] > 0
