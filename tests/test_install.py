"""The package works installed, not only checked out (issue 10, item 5).

A non-editable install into a fresh virtual environment runs ``mpimig demo``
from an empty directory: the programs the commands run are part of the
package. matplotlib is an optional extra (``plots``): without it the package
and every command's help work, and a command that draws says how to install it.
"""
from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, base_env, run_cmd

# what a source distribution of mpimig is made of (tests/, apps/, docs/ are not installed)
SOURCES = ["setup.cfg", "pyproject.toml", "README.md", "mpimig"]


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
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
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
