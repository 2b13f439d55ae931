"""Defects found by running mpimig the way a newcomer does (non-editable install, own
programs in the style of mpi4py's tutorials, outside the repository); each test failed
before its fix."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from conftest import base_env

from mpimig.ft.reference import reference, same_bits

PROGS = Path(__file__).resolve().parent / "progs"


def test_inject_reference_of_a_program_that_writes_an_npz_archive(tmp_path, monkeypatch):
    """``mpimig inject --verify auto`` of a program without --serial whose --out is an
    ``np.savez`` archive: the reference was looked for at ``reference-...npy`` while
    ``np.savez`` wrote ``reference-...npy.npz``, and inject refused with 'no reference ...
    so did a fault-free run of it: job completed'; and ``same_bits`` could not compare two
    archives (their zip bytes carry time stamps)."""
    for k, v in base_env().items():
        monkeypatch.setenv(k, v)
    prog = tmp_path / "tut_savez.py"
    shutil.copy(PROGS / "tut_savez.py", prog)
    path, how = reference(str(prog), ["--steps", "4", "--out", "{job}/out.npz"], tmp_path / "refs", "auto", 2)
    assert path.suffix == ".npz" and path.exists(), (path, how)
    assert "fault-free run on 2 ranks" in how
    # the same arrays in another archive (other order, other zip bytes): the same result
    with np.load(path) as z:
        x, steps = z["x"].copy(), z["steps"].copy()
    assert x.shape == (2, 3) and steps.tolist() == [4]
    other = tmp_path / "other.npz"
    np.savez(other, steps=steps, x=x)
    assert other.read_bytes() != path.read_bytes() and same_bits(other, path)
    x[0, 0] = np.nextafter(x[0, 0], np.inf)
    changed = tmp_path / "changed.npz"
    np.savez(changed, x=x, steps=steps)
    assert not same_bits(changed, path)
