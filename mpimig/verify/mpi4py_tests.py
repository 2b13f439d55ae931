"""mpi4py's own test directory, for ``mpimig conformance``: fetched once, pinned, cached.

The tests are mpi4py's, never a copy kept in mpimig: the source distribution of
the *installed* mpi4py version is downloaded from PyPI (the URL and its sha256
are pinned in :data:`PINNED`), checked, and its ``test/`` directory unpacked into
a user cache directory (``$XDG_CACHE_HOME/mpimig`` or ``~/.cache/mpimig``). A later
run uses the cache; a cache that does not match the pin is unpacked again.

No MPI here: the command imports this module without starting MPI.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from importlib import metadata
from pathlib import Path

from ..errors import UsageError

#: mpi4py version -> (sdist URL on PyPI, its sha256). The version must be the installed one.
PINNED: dict[str, tuple[str, str]] = {
    "4.1.2": ("https://files.pythonhosted.org/packages/75/83/231445bbcf7ef10864746c244ff2d82000011449b79275642c5d4ed8c8f4/"
              "mpi4py-4.1.2.tar.gz",
              "56860286dc45f20e8821e93cb06669e30462348bf866f685553fa4b712d58d02"),
}

_MARK = ".mpimig-sdist-sha256"     # in the unpacked directory: the sha256 of the sdist it came from


def installed_version() -> str:
    """The installed mpi4py's version (from its metadata: MPI is not started)."""
    try:
        return metadata.version("mpi4py")
    except metadata.PackageNotFoundError:
        raise UsageError("mpi4py is not installed") from None


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpimig"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def test_dir(version: str | None = None, cache: Path | None = None, sdist: Path | None = None) -> Path:
    """The ``test/`` directory of mpi4py ``version`` (default: the installed one).

    ``sdist``: a local copy of the source distribution to use instead of a download
    (still checked against the pin).

    Raises:
        UsageError: no pin for this version, a download that fails, or a file whose
            sha256 is not the pinned one.
    """
    version = version or installed_version()
    if version not in PINNED:
        raise UsageError(f"no pinned mpi4py source distribution for mpi4py {version} (pinned: "
                         f"{', '.join(sorted(PINNED))}); add its URL and sha256 to "
                         f"mpimig/verify/mpi4py_tests.py PINNED, or pass --testdir DIR")
    url, want = PINNED[version]
    root = (cache or cache_root()) / f"mpi4py-{version}"
    tdir = root / "test"
    mark = root / _MARK
    if tdir.is_dir() and mark.is_file() and mark.read_text().strip() == want:
        return tdir
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tarball = Path(tmp) / url.rsplit("/", 1)[1]
        if sdist is not None:
            shutil.copyfile(sdist, tarball)
        else:
            try:
                with urllib.request.urlopen(url, timeout=120) as resp, open(tarball, "wb") as f:
                    shutil.copyfileobj(resp, f)
            except OSError as exc:
                raise UsageError(f"cannot download mpi4py {version}'s source distribution from {url}: {exc} "
                                 f"(pass --sdist FILE with a local copy, or --testdir DIR)") from None
        got = sha256(tarball)
        if got != want:
            raise UsageError(f"{sdist or url}: sha256 {got}, but mpi4py {version}'s pinned sdist has {want}")
        prefix = f"mpi4py-{version}/test/"
        with tarfile.open(tarball) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            if hasattr(tarfile, "data_filter"):    # Python >= 3.11.4: refuse links and paths out of tmp
                tf.extractall(tmp, members=members, filter="data")
            else:                                  # only regular files and directories under the prefix
                tf.extractall(tmp, members=[m for m in members if ".." not in Path(m.name).parts])
        if tdir.exists():
            shutil.rmtree(tdir)
        os.replace(Path(tmp) / prefix.rstrip("/"), tdir)
    mark.write_text(want + "\n")
    return tdir
