"""The package works installed, not only checked out (issue 10, item 5).

A non-editable install into a fresh virtual environment runs ``mpimig demo``
from an empty directory: the programs the commands run are part of the
package. matplotlib is an optional extra (``plots``): without it the package
and every command's help work, and a command that draws says how to install it.

The suite's own setup keeps no machine-wide state (item 7): the MPICH venv
that the lab tests use is kept per checkout, and its freshness check cannot be
fooled by the directory it runs in.
"""
from __future__ import annotations

import json
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, base_env, run_cmd

# what a source distribution of mpimig is made of (tests/, apps/, docs/ are not installed)
SOURCES = ["setup.cfg", "pyproject.toml", "README.md", "mpimig"]


def clone(dst: Path) -> None:
    """A copy of this checkout's sources at ``dst`` (pip writes build files into what it installs)."""
    dst.mkdir(parents=True)
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, dst / name)


def fresh_venv(where: Path) -> Path:
    """A new virtual environment (no pip of its own) that sees this environment's packages
    (pip, setuptools, mpi4py, numpy, h5py, dill, the MPI wheel) through a .pth path line, but not
    its mpimig: a plain path line does not run this environment's own .pth files, and the editable
    install of mpimig here is one of those. Returns its python."""
    run_cmd([sys.executable, "-m", "venv", "--without-pip", where], timeout=120, check_rc=0)
    py = where / "bin" / "python"
    res = run_cmd([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60,
                  check_rc=0)
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(res.stdout.strip(), "_test_deps.pth").write_text("".join(p + "\n" for p in sorted(ours)))
    return py


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv with mpimig installed from a copy of this checkout, NOT editable."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    clone(src)
    py = fresh_venv(base / "venv")
    # --no-deps: the dependencies are this environment's (above); the build backend comes from
    # the pip cache or the package index, as for any pip install
    run_cmd([py, "-m", "pip", "install", "-q", "--no-deps", src], timeout=600, cwd=base, check_rc=0)
    shutil.rmtree(src)      # nothing may still point into the sources
    return py.parent


def test_the_install_is_not_editable(installed, tmp_path):
    code = ("import json, mpimig, mpimig.apps.heat2d as h, importlib.metadata as md; "
            "print(json.dumps([mpimig.__file__, h.__file__, md.requires('mpimig')]))")
    res = run_cmd([installed / "python", "-c", code], timeout=60, cwd="/", check_rc=0)
    pkg, app, requires = json.loads(res.stdout)
    site = Path(installed).parent / "lib"
    assert Path(pkg).is_relative_to(site) and Path(app).is_relative_to(site), (pkg, app)
    assert not Path(pkg).is_relative_to(ROOT)
    deps = {r.split(";")[0].strip(): r for r in requires}
    assert "matplotlib" in deps and 'extra == "plots"' in deps["matplotlib"], requires
    assert {"mpi4py>=4.1", "numpy", "h5py", "dill"} <= {r for r in requires if ";" not in r}


def test_demo_runs_from_an_empty_directory(installed, tmp_path):
    """`pip install .` (not -e), then `mpimig demo` elsewhere: heat2d checkpointed, killed,
    restarted with a migration, and verified bit for bit against its serial run."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = base_env(PATH=f"{installed}:{Path(sys.executable).parent}:/usr/bin:/bin")   # mpiexec: the MPI wheel's
    res = run_cmd([installed / "mpimig", "demo", "--dir", tmp_path / "demo"], timeout=420, env=env, cwd=empty)
    out = f"\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}"
    assert "result bit-identical to the serial reference: yes" in res.stdout, out
    assert "migration of rank 1" in res.stdout and ": done" in res.stdout, out
    assert str(installed.parent / "lib") in res.stderr, f"the job did not run the installed heat2d{out}"
    assert list(empty.iterdir()) == [], "the demo wrote into the directory it was started from"
    assert res.returncode == 0, out


# --- matplotlib is optional ---

NO_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None  # as if not installed\n"


def test_every_command_works_without_matplotlib(tmp_path):
    code = NO_MATPLOTLIB + ("import mpimig.cli as c\n"
                            "for cmd in (['--help'], ['bench', 'migrate', '--help'], ['inject', '--help']):\n"
                            "    try:\n        c.main(cmd)\n    except SystemExit as e:\n"
                            "        assert e.code == 0, (cmd, e.code)\n"
                            "print('help ok')\n")
    res = run_cmd([sys.executable, "-c", code], timeout=60, env=base_env(), cwd=tmp_path)
    assert "help ok" in res.stdout and res.returncode == 0, res.stderr[-3000:]


def test_a_command_that_draws_says_how_to_install_matplotlib(tmp_path):
    """`bench migrate --strategies` draws its results: without matplotlib it stops before any job."""
    code = NO_MATPLOTLIB + ("import sys, mpimig.cli as c\n"
                            f"sys.exit(c.main(['bench', 'migrate', '--strategies', 'all', '--sizes', '1M', "
                            f"'--dir', {str(tmp_path / 'work')!r}]))\n")
    res = run_cmd([sys.executable, "-c", code], timeout=60, env=base_env(), cwd=tmp_path)
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert "needs matplotlib: pip install 'mpimig[plots]'" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "work").exists(), "jobs ran before the missing plotting library was noticed"


def test_import_pyplot_gives_the_agg_backend():
    from mpimig._plots import import_pyplot
    plt = import_pyplot("a test")
    import matplotlib
    assert matplotlib.get_backend().lower() == "agg" and hasattr(plt, "subplots")


# --- the suite's setup from two clones on one machine (issue 10, item 7) ---

def test_two_clones_do_not_share_the_mpich_venv(tmp_path, monkeypatch):
    """CI clones afresh each run. The first clone's session leaves an MPICH venv with an
    editable install of that clone; the second clone's session must not take it for its own,
    even though it runs from its own checkout, and after the first clone is deleted."""
    import lab_fixtures as lf
    monkeypatch.delenv("MPIMIG_MPICH_VENV", raising=False)
    first, second = tmp_path / "ci-1" / "mpimig", tmp_path / "ci-2" / "mpimig"
    clone(first)
    clone(second)
    v1, v2 = lf.mpich_venv_dir(first, tmp_path), lf.mpich_venv_dir(second, tmp_path)
    assert v1 != v2 and v1 == lf.mpich_venv_dir(first, tmp_path)       # per checkout, reused by it
    default = lf.mpich_venv_dir(first)
    assert default.parent == Path(tempfile.gettempdir()) and default != lf.mpich_venv_dir(second)

    # the first session: a venv with the dependencies and the first clone, editable
    py = fresh_venv(v1)
    run_cmd([py, "-m", "pip", "install", "-q", "--no-deps", "-e", first], timeout=600, cwd=tmp_path, check_rc=0)
    assert lf.venv_has_checkout(py, first)

    # the second session runs from its own checkout: there `python -c` imports the second
    # clone's mpimig from the working directory (what fooled the old check) ...
    res = run_cmd([py, "-c", "import mpimig; print(mpimig.__file__)"], timeout=60, cwd=second, check_rc=0)
    assert Path(res.stdout.strip()).is_relative_to(second)
    # ... but the check runs from "/" and sees the first clone's install
    monkeypatch.chdir(second)
    assert not lf.venv_has_checkout(py, second)
    assert not lf.mpich_venv_ready(v2, second)          # so it makes its own, at its own path

    # the first clone is deleted, as CI does: its venv now fails the check for it too,
    # and the next session removes it (a cache per checkout must not pile up on the machine)
    (v1 / lf.CHECKOUT_MARK).write_text(f"{first.resolve()}\n")
    v2.mkdir()
    (v2 / lf.CHECKOUT_MARK).write_text(f"{second.resolve()}\n")
    assert lf.prune_mpich_venvs(tmp_path) == []
    shutil.rmtree(first.parent)
    assert not lf.venv_has_checkout(py, first)
    assert lf.prune_mpich_venvs(tmp_path) == [v1]
    assert not v1.exists() and v2.exists()
