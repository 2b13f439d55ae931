"""The reference result a fault-injection experiment is judged against, made before any fault.

``mpimig inject`` (and ``mpimig chaos``) compare a job's ``--out`` array bit
for bit with a reference of the same program and arguments: its ``--serial``
run, or (``--verify auto``) a fault-free ``mpimig run`` on the same number of
ranks. References are cached by a digest of the program and its arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import UsageError
from .. import pycmd


def opt_value(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def replace_opt(args: list[str], name: str, value: str) -> list[str]:
    out = list(args)
    for i, a in enumerate(out):
        if a == name and i + 1 < len(out):
            out[i + 1] = value
            return out
        if a.startswith(name + "="):
            out[i] = f"{name}={value}"
            return out
    return out + [name, value]


def reference(program: str, prog_args: list[str], cache_dir: Path, mode: str = "serial", n: int = 0
              ) -> tuple[Path, str]:
    """The reference result of ``program`` with the same arguments (cached by the arguments):
    its ``--serial`` run; with ``mode="auto"``, when that fails (a program without
    ``--serial``), a fault-free ``mpimig run -n n`` of it. Returns (path, how it was made)."""
    args = list(prog_args)
    ident = json.dumps([program, replace_opt(list(args), "--out", "")])
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    suffix = Path(opt_value(args, "--out") or "out.npy").suffix or ".npy"   # np.savez appends .npz to another name
    path = cache_dir / f"reference-{Path(program).stem}-{key}{suffix}"
    how_file = path.with_suffix(".how")
    if path.exists():
        return path, how_file.read_text() if how_file.exists() else "serial"
    cache_dir.mkdir(parents=True, exist_ok=True)
    args = replace_opt(args, "--out", str(path))
    res = subprocess.run([sys.executable, program, "--serial", *args], capture_output=True, text=True, timeout=600)
    how = "serial"
    if res.returncode != 0 or not path.exists():
        why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1][-300:]
        if mode != "auto":
            raise UsageError(f"--verify serial: {program} --serial failed: {why}")
        # no serial mode: the same program, the same ranks, no faults
        run_dir = cache_dir / f"reference-{Path(program).stem}-{key}.job"
        shutil.rmtree(run_dir, ignore_errors=True)
        res2 = subprocess.run([*pycmd.module("mpimig"), "run", "-n", str(n), "--job-dir", str(run_dir),
                               program, *args], capture_output=True, text=True, timeout=1200)
        if res2.returncode != 0 or not path.exists():
            what = (f"its fault-free 'mpimig run -n {n}' completed but wrote no --out file {path}" if
                    res2.returncode == 0 else f"so did a fault-free 'mpimig run -n {n}' of it: "
                    f"{(res2.stderr.strip().splitlines() or ['no output'])[-1][-300:]}")
            raise UsageError(f"--verify auto: no reference for {program}: its --serial run failed ({why}), and "
                             f"{what}")
        how = f"a fault-free run on {n} ranks ({program} --serial failed: {why})"
        shutil.rmtree(run_dir, ignore_errors=True)
    how_file.write_text(how)
    return path, how


def same_bits(a: Path, b: Path) -> bool:
    """Whether two results hold the same arrays bit for bit: ``.npy``, ``.npz`` (each array;
    the archive's own bytes carry time stamps), any other file byte for byte."""
    import numpy as np
    if a.suffix not in (".npy", ".npz"):
        return a.read_bytes() == b.read_bytes()
    if a.suffix == ".npy":
        return _same_array(np.load(a), np.load(b))
    with np.load(a) as x, np.load(b) as y:
        return sorted(x.files) == sorted(y.files) and all(_same_array(x[k], y[k]) for k in x.files)


def _same_array(x, y) -> bool:
    return x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()


def verify(args: argparse.Namespace, completed: bool, program: str, prog_args: list[str], out_path: str | None,
            report_dir: Path) -> tuple[bool | None, Path | None]:
    """With ``--verify serial``: is the job's ``--out`` bit-identical to the reference (and where that is)."""
    if args.verify == "none" or not out_path:
        return None, None
    if not completed:
        return False, None
    ref_path, _ = for_args(args, program, prog_args, report_dir)
    return Path(out_path).exists() and same_bits(Path(out_path), ref_path), ref_path


def for_args(args: argparse.Namespace, program: str, prog_args: list[str], report_dir: Path) -> tuple[Path, str]:
    return reference(program, list(prog_args), Path(getattr(args, "reference_dir", None) or report_dir.parent),
                     args.verify, getattr(args, "n", 0))
