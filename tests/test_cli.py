"""The ``mpimig`` command line: help, argument errors, ``run --dry-run``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

from mpimig.checkpoint import CheckpointStore
from mpimig.cli import build_parser, main

from conftest import APPS, base_env, mpimig_cmd, run_cmd

VENV_BIN = Path(sys.executable).parent
RING = APPS / "ring.py"


def cli_env(**extra) -> dict:
    """base_env with this venv's bin (mpiexec) first on PATH and no MPIMIG_* settings."""
    env = base_env(**extra)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    for k in [k for k in env if k.startswith("MPIMIG_")]:
        del env[k]
    return env


def subcommands(parser=None, prefix=()):
    parser = parser or build_parser()
    yield list(prefix)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, prefix + (name,))


def test_top_level_help_through_the_console_script(tmp_path):
    exe = VENV_BIN / "mpimig"
    res = run_cmd([exe, "--help"], timeout=60, env=cli_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "usage: mpimig" in res.stdout and "run" in res.stdout
    assert "Traceback" not in res.stderr
    res = run_cmd(mpimig_cmd("--version"), timeout=60, env=cli_env(), cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("mpimig ")


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: mpimig" in capsys.readouterr().out


ALL_COMMANDS = list(subcommands())


def test_the_subcommands_we_document_exist():
    names = {" ".join(c) for c in ALL_COMMANDS}
    assert {"run", "inspect", "migrate", "status"} <= names


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: " ".join(c) or "mpimig")
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(command + ["--help"])
    out = capsys.readouterr()
    assert info.value.code == 0, out.err
    assert out.out.startswith("usage: mpimig" + "".join(" " + c for c in command))


def run_bad(tmp_path, *args):
    """A failing command line in a real process: exit 1 or 2, no traceback."""
    res = run_cmd(mpimig_cmd(*args), timeout=60, env=cli_env(), cwd=tmp_path)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode in (1, 2), (res.returncode, res.stderr)
    return res


def run_main(argv, capsys):
    """``mpimig ARGV`` in this process (fast); an uncaught exception fails the test."""
    rc: int | str | None
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in-process commands from an empty directory with mpiexec on PATH."""
    monkeypatch.chdir(tmp_path)
    for k, v in cli_env().items():
        if k.startswith(("PATH", "OMPI_")):
            monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith("MPIMIG_")]:
        monkeypatch.delenv(k)
    return tmp_path


def test_wrong_arguments_in_a_real_process(tmp_path):
    res = run_bad(tmp_path, "run", RING)
    assert res.returncode == 2 and "-n" in res.stderr and "usage: mpimig run" in res.stderr
    res = run_bad(tmp_path, "run", "-n", "0", RING)
    assert res.returncode == 1 and "-n must be at least 1" in res.stderr
    assert not (tmp_path / "mpimig-jobs").exists()


@pytest.mark.parametrize("args, problem, code", [
    (["run", RING], "the following arguments are required: -n/--np", 2),
    (["run", "-n", "0", RING], "-n must be at least 1", 1),
    (["run", "-n", "-3", RING], "-n must be at least 1", 1),
    (["run", "-n", "two", RING], "invalid int value: 'two'", 2),
    (["run", "-n", "2", "--restart", "maybe", RING], "invalid choice: 'maybe'", 2),
    (["run", "-n", "2", "--migrate", "x:y", RING], "bad migration schedule entry 'x:y'", 1),
    (["run", "-n", "2", "--migrate", "3:2:h1", RING], "rank 2 does not exist", 1),
    (["run", "-n", "4", "--migrate", "3:4:h1", RING], "rank 4 does not exist", 1),
    (["run", "-n", "2", "--keep", "0", RING], "--keep must be at least 1", 1),
    (["run", "-n", "2", "no_such_program.py"], "no_such_program.py not found", 1),
], ids=["missing-n", "n0", "n-negative", "n-not-int", "restart-value", "migrate-spec", "migrate-rank",
        "migrate-rank-n4", "keep0", "missing-program"])
def test_wrong_arguments_are_named(in_tmp, capsys, args, problem, code):
    rc, out, err = run_main(args, capsys)
    assert rc == code, err
    assert problem in err, err
    assert out == ""
    assert "running:" not in err                    # nothing was launched
    assert not (in_tmp / "mpimig-jobs").exists()    # nor any job directory made


def test_missing_executable_is_named(tmp_path):
    res = run_bad(tmp_path, "run", "-n", "1", "no_such_binary_xyz")
    assert "no_such_binary_xyz" in res.stderr
    assert res.returncode == 1


def test_dry_run_prints_the_mpiexec_command(in_tmp, capsys, monkeypatch):
    for k in [k for k in os.environ if k.startswith("OMPI_MCA_")]:
        monkeypatch.delenv(k)
    rc, out, err = run_main(["run", "-n", "4", "--dry-run", "--job-dir", in_tmp / "job", RING, "--laps", "3"],
                            capsys)
    assert rc == 0, err
    line = [ln for ln in err.splitlines() if "mpiexec" in ln]
    assert len(line) == 1, err
    cmd = line[0]
    assert "OMPI_MCA_btl='^ofi'" in cmd
    assert "--oversubscribe" in cmd and " -n 4 " in cmd
    assert cmd.endswith(f"{RING} --laps 3")
    assert not (in_tmp / "job" / "complete.json").exists()


@pytest.mark.parametrize("args, preconnect", [
    (["-n", "4", "--hosts", "a:3,b:3", "--spares", "2"], True),       # hosts, warm spares: connected at start-up
    (["-n", "4", "--spares", "2"], False),                            # one host: shared memory
    (["-n", "4", "--hosts", "a:3,b:3", "--spares-per-host", "0"], False),   # no warm spare
    (["-n", "70", "--hosts", "a:40,b:40", "--spares", "2"], False),   # above PRECONNECT_MAX processes
])
def test_a_job_over_hosts_with_warm_spares_is_connected_at_start_up(in_tmp, capsys, monkeypatch, args, preconnect):
    for k in [k for k in os.environ if k.startswith("OMPI_MCA_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("MPIMIG_LAB_DIR", str(in_tmp / "no-lab"))     # hosts a, b: not checked against a lab that is up
    rc, out, err = run_main(["run", *args, "--dry-run", "--job-dir", in_tmp / "job", RING], capsys)
    assert rc == 0, err
    (cmd,) = [ln for ln in err.splitlines() if "mpiexec" in ln]
    assert ("OMPI_MCA_mpi_preconnect_mpi=1" in cmd) is preconnect, cmd
    monkeypatch.setenv("OMPI_MCA_mpi_preconnect_mpi", "0")             # the user's setting wins
    rc, out, err = run_main(["run", *args, "--dry-run", "--job-dir", in_tmp / "job", RING], capsys)
    assert "mpi_preconnect" not in [ln for ln in err.splitlines() if "mpiexec" in ln][0]


def _finished_job(job: Path) -> None:
    """A job directory as a completed run leaves it: committed epochs and a record."""
    store = CheckpointStore(job / "ckpt", job_id="old")
    for epoch in (1, 2):
        store.write_rank(epoch, 0, 1, epoch, {}, {"x": epoch})
        store.commit(epoch, 1, epoch)
    store.close()
    (job / "complete.json").write_text(json.dumps({"status": "ok", "run_id": "old"}))


@pytest.mark.parametrize("restart", ["auto", "never", "always"])
def test_dry_run_changes_nothing_on_disk(in_tmp, capsys, restart):
    """A dry run only prints: it must not delete the job's checkpoints or record."""
    job = in_tmp / "job"
    _finished_job(job)
    before = sorted(p.relative_to(job) for p in job.rglob("*"))
    rc, out, err = run_main(["run", "-n", "1", "--dry-run", "--restart", restart, "--job-dir", job, RING], capsys)
    assert rc == 0, err
    after = sorted(p.relative_to(job) for p in job.rglob("*"))
    assert after == before, f"--dry-run --restart {restart} changed the job directory:\n{err}"
    assert CheckpointStore(job / "ckpt").committed_epochs() == [1, 2]


# A command module that cannot be imported must break the command line loudly,
# naming the module: never make its commands disappear from --help.

@pytest.mark.parametrize("bad", ["mpimig.no_such_command_module", "cmd_needs_a_missing_dependency"])
def test_a_broken_command_module_fails_help_and_names_it(bad, tmp_path, monkeypatch, capsys):
    import mpimig.cli as cli
    (tmp_path / "cmd_needs_a_missing_dependency.py").write_text(
        "import no_such_dependency_xyz  # noqa: F401\n\ndef register(sub):\n    sub.add_parser('broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, bad])
    with pytest.raises(ImportError) as info:
        main(["--help"])
    assert f"command module {bad} cannot be imported" in str(info.value)
    assert info.value.name == bad
    assert "usage: mpimig" not in capsys.readouterr().out      # no help that quietly lacks a command


def test_a_broken_command_module_fails_the_real_command(tmp_path):
    """The console script exits non-zero with the module's name (a traceback is fine: it is a bug)."""
    code = ("import sys, mpimig.cli as c; c.COMMAND_MODULES.append('mpimig.no_such_command_module'); "
            "sys.exit(c.main(['--help']))")
    res = run_cmd([sys.executable, "-c", code], timeout=60, env=cli_env(), cwd=tmp_path)
    assert res.returncode != 0
    assert "mpimig.no_such_command_module" in res.stderr and "usage: mpimig" not in res.stdout


def test_every_listed_command_module_registers_a_command():
    """Each module of COMMAND_MODULES adds at least one command (none is a leftover that adds nothing)."""
    import mpimig.cli as cli
    for name in cli.COMMAND_MODULES:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        cli.register_commands(sub, name)
        assert sub.choices, f"{name} registered no command"
