"""``mpimig inject``: fault-injection experiments with a report.

It starts a job with ``mpimig run`` (the same options; the run's code is not
repeated here), kills parts of it while it runs, waits for the job to end and
reports: faults injected and survived, time to detect, to recover and to
resume, work lost (checkpoint points computed twice) and whether the final
result is bit-identical to a reference. The report is a JSON file, a printed
table and a PNG timeline (``--report DIR``, default ``JOB_DIR/inject``).

    mpimig inject --kill rank:1@point:25 -n 4 --ckpt-every 5 --relaunch 2 \\
        apps/heat2d.py --n 64 --steps 80 --work-ms 20 --out '{job}/out.npy'
    mpimig inject --seeds 20 --kinds rank,host,coordinator -n 4 --hosts h1:2,h2:2,h3:2 \\
        --ckpt-every 5 apps/heat2d.py --n 64 --steps 80 --work-ms 20 --out '{job}/out.npy'

Faults (``--kill WHAT@WHEN``, repeatable):

  rank:R@point:P       logical rank R dies (SIGKILL) right after checkpoint point P
  ranks:R1+R2@point:P  several ranks at once
  rank:R@time:S        ... S seconds after the job started computing
  host:H@point:P       a whole lab host: every process in its namespace (needs the lab)
  coordinator@point:P  the coordinator process (also @time:S)
  ckpt-write:R@epoch:E rank R dies while epoch E is being written (its file is in
                       epoch-E.tmp, the vote has not happened: E is never committed)
  ckpt-async-pending:R@epoch:E
                       with --ckpt-async: rank R dies right after its snapshot of
                       epoch E, before the vote and commit (E is never committed)
  migration-source     the old process of the first migrating rank dies before it
                       sends its state (the job needs a --migrate schedule)
  migration-target     its new process dies before it receives the state

``step:P`` is the same as ``point:P``. Or a seeded random schedule: ``--seed
S --random K`` (K faults of ``--kinds``), and ``--seeds N``: N jobs, seeds
``--first-seed`` .. +N-1, with totals (like ``mpimig storm``).

Processes are found by the job's own records, never by name: the
coordinator's ``status.json`` (logical rank -> pid, the coordinator's pid),
the lab's namespaces for hosts; exact-place faults are fired inside the
process (mpimig/ft/hooks.py). The job always runs with a coordinator.

``{job}`` in the program's arguments becomes the job directory. When the
program has ``--out FILE``, a reference is made before the job (and cached by
the arguments): the program's ``--serial`` run (apps/heat2d.py has one), or,
for a program without ``--serial`` (``--verify auto``, the default), a
fault-free ``mpimig run`` on the same number of ranks; the two results (``.npy``,
``.npz``: each array; another file: its bytes) must be equal bit for bit. A program that can give no reference is
told so before any fault is spent.

Without ``--ft`` (online recovery), a killed rank or coordinator makes Open
MPI end the whole job, and ``--relaunch`` brings it back from the last
committed epoch; a lost host ends the job even with ``--ft``. inject sets
``--relaunch`` to the number of faults + 1 when it is not given.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import events
from ..errors import UsageError
from ..verify import campaign
from .hooks import read_progress
from .report import CAMPAIGN as CAMPAIGN  # re-exported: the campaign of ``--seeds``
from .report import (
    analyse,
    describe_event,
    format_table,
    format_totals,
    seed_line,
    timeline_png,
    totals,
    totals_png,
)

from .faults import IN_PROCESS, RANDOM_KINDS, parse_fault, random_schedule
from .reference import for_args, opt_value, verify
from .. import pycmd

if TYPE_CHECKING:
    from ..lab.hosts import Lab


# ------------------------------------------------------------------- the job

class _Status:
    """The coordinator's status.json of the job's current run."""

    def __init__(self, job_dir: Path):
        self.path = job_dir / "status.json"

    def read(self, run_id: str | None) -> dict | None:
        try:
            st = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if run_id and st.get("run_id") != run_id:
            return None
        return st


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _lab() -> Lab | None:
    try:
        from .. import lab
        return lab.current()
    except Exception:  # noqa: BLE001 - no lab on this machine
        return None


class _Watch:
    """What the injector has seen of one job so far, and the faults it fired."""

    def __init__(self, job_dir: Path, report_dir: Path, faults: list[dict], t_launch: float,
                 say: Callable[[str], None], quiet: bool):
        self.job_dir, self.report_dir, self.faults = job_dir, report_dir, faults
        self.t_launch, self.say, self.quiet = t_launch, say, quiet
        self.status = _Status(job_dir)
        self.samples: list[list] = []
        self.tail: list = [0, b""]          # events.jsonl: bytes read, partial last line
        self.run_id: str | None = None
        self.t_started: float | None = None
        self.fired: dict[int, dict] = {}
        self.killed_hosts: list[str] = []
        self.last_print = 0.0


def run_experiment(args: argparse.Namespace, run_args: list[str], faults: list[dict], job_dir: Path,
                   report_dir: Path, program: str, prog_args: list[str], quiet: bool = False) -> dict:
    """Start the job, inject ``faults``, wait for the end, verify; return the report."""
    _fresh_dirs(job_dir, report_dir)
    cmd = [*pycmd.module("mpimig"), "run", *run_args]
    say: Callable[[str], None] = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    say(f"mpimig inject: {len(faults)} fault(s): {', '.join(f['spec'] for f in faults) or 'none'}")
    say(f"mpimig inject: job {job_dir}; run output in {report_dir}/run.err")
    # the job's output files stay open while it runs; closed once it has ended
    with open(report_dir / "run.out", "w") as out, open(report_dir / "run.err", "w") as err:
        t_launch = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=_job_env(faults, report_dir),
                                start_new_session=True)
        w = _Watch(job_dir, report_dir, faults, t_launch, say, quiet)
        try:
            timed_out = _watch(proc, w, time.monotonic() + args.experiment_timeout)
        finally:
            _stop(proc, w)
    t_end = time.time()
    evs = events.read(job_dir)
    completed = _completed(job_dir, proc)
    out_path = opt_value(prog_args, "--out")
    verified, ref_path = verify(args, completed, program, prog_args, out_path, report_dir)
    report = analyse(evs, faults, w.samples, t_launch, t_end, completed, verified)
    report.update({"command": cmd, "job_dir": str(job_dir), "report_dir": str(report_dir),
                   "result": out_path, "reference": str(ref_path) if ref_path else None,
                   "timed_out": timed_out, "returncode": proc.returncode})
    _write_report(report, evs, w)
    return report


def _fresh_dirs(job_dir: Path, report_dir: Path) -> None:
    """No records of an earlier run in the job directory; an empty report directory."""
    for p in (job_dir / "events.jsonl", job_dir / "complete.json", job_dir / "status.json"):
        if p.exists():
            p.unlink()
    if report_dir.exists():
        shutil.rmtree(report_dir)
    report_dir.mkdir(parents=True)
    job_dir.mkdir(parents=True, exist_ok=True)


def _fired_in_process(f: dict) -> bool:
    """Faults the job's own processes fire at an exact place (mpimig/ft/hooks.py)."""
    return f["kind"] in IN_PROCESS or (f["kind"] == "rank" and "point" in f)


def _job_env(faults: list[dict], report_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MPIMIG_INJECT"] = json.dumps([f for f in faults if _fired_in_process(f)])
    env["MPIMIG_INJECT_DIR"] = str(report_dir)
    return env


def _watch(proc: subprocess.Popen, w: _Watch, deadline: float) -> bool:
    """Follow the job until it ends, firing the faults that are due; True if it hit ``deadline``."""
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return True
        _take_events(w)
        pr = read_progress(w.report_dir)
        if pr and (not w.samples or w.samples[-1][:3] != [pr[1], pr[0], pr[2]]):
            w.samples.append([pr[1], pr[0], pr[2]])
        _fire_due(w, pr)
        if not w.quiet and time.monotonic() - w.last_print > 2.0:
            w.last_print = time.monotonic()
            w.say(f"  {time.time() - w.t_launch:6.1f} s  {_progress_text(pr)}")
        time.sleep(0.01)      # polling the job's files against the deadline
    return False


def _take_events(w: _Watch) -> None:
    """Read the job's new events: the run id, when it started computing; print the telling ones."""
    new, w.tail = _read_new(w.job_dir / events.EVENTS_FILE, w.tail)
    for ev in new:
        if ev["event"] == "launch":
            w.run_id = ev["run_id"]
        if ev["event"] == "started" and w.t_started is None:
            w.t_started = ev["t"]
        if ev["event"] in ("injected", "job_lost", "relaunch", "started", "failure", "recovered", "finished"):
            w.say("  " + describe_event(ev, w.t_launch))


def _is_due(f: dict, w: _Watch, pr: tuple | None) -> bool:
    return (("point" in f and pr is not None and pr[0] >= f["point"] and pr[2] == w.run_id)
            or ("time" in f and w.t_started is not None and time.time() - w.t_started >= f["time"]))


def _fire_due(w: _Watch, pr: tuple | None) -> None:
    """Fire the faults fired from outside the job whose point or time has come."""
    for f in w.faults:
        if f["id"] in w.fired or _fired_in_process(f) or not _is_due(f, w, pr):
            continue
        # the time of the fault is taken before the kill: the launcher may log
        # the job's loss before this event is written
        t_fire = time.time()
        rec = _fire(f, w.status, w.run_id, pr)
        if rec is not None:
            w.fired[f["id"]] = rec
            if f["kind"] == "host":
                w.killed_hosts.append(f["target"])
            events.emit(w.job_dir, "injected", w.run_id or "", id=f["id"], kind=f["kind"],
                        target=f["target"], by="injector", t=t_fire, **rec)


def _progress_text(pr: tuple | None) -> str:
    if pr is None:
        return "starting"
    if time.time() - pr[1] > 2.0:
        return f"point {pr[0]}, epoch {pr[3]}: no new point for {time.time() - pr[1]:.0f} s"
    return f"point {pr[0]}, epoch {pr[3]}"


def _stop(proc: subprocess.Popen, w: _Watch) -> None:
    """End the job if it still runs (its session, by pid) and bring back the hosts it killed."""
    if proc.poll() is None:
        from .._proc import kill_session
        kill_session(proc.pid)
    proc.wait()
    lab = _lab()
    for h in w.killed_hosts:
        if lab is not None:
            from ..lab.hosts import revive
            try:
                revive(lab, h)
            except Exception as exc:  # noqa: BLE001 - report, do not hide the experiment
                w.say(f"mpimig inject: could not revive {h}: {exc}")


def _completed(job_dir: Path, proc: subprocess.Popen) -> bool:
    """The job says it completed (complete.json) and its launcher ended well."""
    rec = None
    with contextlib.suppress(OSError, ValueError):
        rec = json.loads((job_dir / "complete.json").read_text())
    return bool(rec and rec.get("status") == "ok" and proc.returncode == 0)


def _write_report(report: dict, evs: list[dict], w: _Watch) -> None:
    """report.json, then the timeline PNG (or why there is none) and report.json again."""
    (w.report_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    try:
        timeline_png(report, evs, w.samples, w.t_launch, w.report_dir / "timeline.png")
        report["png"] = str(w.report_dir / "timeline.png")
    except Exception as exc:  # noqa: BLE001 - the JSON report stands without the picture
        report["png_error"] = f"{type(exc).__name__}: {exc}"
    (w.report_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))


def _read_new(path: Path, tail: list) -> tuple[list[dict], list]:
    """Events appended to ``path`` since the last call (``tail``: offset, partial line)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(tail[0])
            data = fh.read()
    except OSError:
        return [], tail
    buf = tail[1] + data
    lines = buf.split(b"\n")
    out = []
    for line in lines[:-1]:
        with contextlib.suppress(ValueError):    # a line that is not JSON is skipped
            out.append(json.loads(line))
    return out, [tail[0] + len(data), lines[-1]]


def _fire(f: dict, status: _Status, run_id: str | None, pr: tuple | None) -> dict | None:
    """Kill what ``f`` names, found by the job's records; None if not yet possible."""
    point = pr[0] if pr else None
    if f["kind"] == "host":
        lab = _lab()
        if lab is None:
            raise UsageError(f"--kill {f['spec']}: host faults need the lab (mpimig lab up)")
        pids = lab.kill(f["target"])
        return {"pids": pids, "point": point}
    st = status.read(run_id)
    if st is None:
        return None
    # pids are this machine's: lab hosts are network namespaces, not pid namespaces
    if f["kind"] == "coordinator":
        pid = st["coordinator"]["pid"]
        return {"pids": [pid] if _kill(pid) else [], "point": point, "host": st["coordinator"].get("host")}
    pids = [st["routing"][r]["pid"] for r in f["ranks"]]
    return {"pids": [p for p in pids if _kill(p)], "point": point,
            "hosts": [st["routing"][r].get("host") for r in f["ranks"]]}


# ------------------------------------------------------------------ command

def _span(prog_args: list[str], given: int | None) -> int:
    if given:
        return given
    v = opt_value(prog_args, "--steps")
    if v is None or not v.isdigit():
        raise UsageError("a random schedule needs to know how many checkpoint points the job runs: "
                         "give --span P (the program has no --steps)")
    return int(v)


def cmd_inject(args: argparse.Namespace) -> int:
    if args.seeds and args.kill:
        raise UsageError("--seeds draws random faults: do not combine it with --kill")
    if args.n < 1:
        raise UsageError("-n must be at least 1")
    from ..launch.options import check_schedule, job_config
    # mpimig run's own checks of its options, before a reference is made or a fault is spent
    check_schedule(job_config(argparse.Namespace(**vars(args))), args.n, args.hosts)
    hosts = [h.split(":")[0] for h in (args.hosts or "").split(",") if h.strip()]
    kinds = _kinds(args, hosts)
    program = str(Path(args.program).resolve()) if args.program.endswith(".py") else args.program
    args.coordinator = True             # status.json: the pids of ranks and coordinator
    base_job = Path(args.job_dir or Path("mpimig-jobs") / f"inject-{Path(args.program).stem}").resolve()
    if args.verify == "auto" and not opt_value(args.args, "--out"):
        args.verify = "none"
    one = functools.partial(_one_job, args, program)
    if args.seeds:
        return _cmd_seeds(args, one, kinds, hosts, base_job)

    faults = _schedule(args, kinds, hosts)
    report_dir = Path(args.report).resolve() if args.report else base_job / "inject"
    rep = one(args.seed, faults, base_job, report_dir, quiet=False)
    print(format_table(rep), flush=True)
    print(f"mpimig inject: report {report_dir / 'report.json'}"
          + (f", timeline {rep['png']}" if rep.get("png") else f" (no PNG: {rep.get('png_error')})"))
    return 0 if rep["ok"] else 1


def _kinds(args: argparse.Namespace, hosts: list[str]) -> list[str]:
    """The kinds a random schedule draws from (``host`` only with the lab and 2+ hosts)."""
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in RANDOM_KINDS]
    if bad:
        raise UsageError(f"--kinds: unknown {', '.join(bad)}; use {', '.join(RANDOM_KINDS)}")
    if "host" in kinds and (args.seeds or args.seed is not None) and (len(hosts) < 2 or _lab() is None):
        if args.kinds_given:
            raise UsageError("--kinds host needs the lab (mpimig lab up) and at least 2 hosts in --hosts")
        kinds = [k for k in kinds if k != "host"]
    return kinds


def _schedule(args: argparse.Namespace, kinds: list[str], hosts: list[str]) -> list[dict]:
    """The faults of one job: ``--seed``'s random schedule or the ``--kill`` list, checked against the job."""
    if args.seed is not None:
        faults = random_schedule(args.seed, args.random, kinds, args.n, _span(args.args, args.span),
                                 args.ckpt_every, hosts)
    else:
        faults = [parse_fault(s, i + 1) for i, s in enumerate(args.kill or [])]
    if not faults:
        raise UsageError("no fault to inject: give --kill WHAT@WHEN, --seed S, or --seeds N")
    for f in faults:
        for r in f.get("ranks", []):
            if not 0 <= r < args.n:
                raise UsageError(f"--kill {f['spec']}: rank {r} does not exist (ranks 0..{args.n - 1})")
        if f["kind"] == "host" and hosts and f["target"] not in hosts:
            raise UsageError(f"--kill {f['spec']}: host {f['target']} is not in --hosts ({', '.join(hosts)})")
        if f["kind"] == "ckpt-async-pending" and not getattr(args, "ckpt_async", False):
            raise UsageError(f"--kill {f['spec']}: the job checkpoints synchronously: add --ckpt-async")
        if f["kind"].startswith("migration") and not args.migrate:
            raise UsageError(f"--kill {f['spec']}: the job has no migration: add --migrate STEP:RANK:HOST")
    return faults


def _one_job(args: argparse.Namespace, program: str, seed: int | None, faults: list[dict], job_dir: Path,
             report_dir: Path, quiet: bool) -> dict:
    """Run one job with ``faults`` (``mpimig run`` with the command's options) and write its report."""
    from ..launch.options import run_argv
    prog_args = [a.replace("{job}", str(job_dir)) for a in args.args]
    ns = argparse.Namespace(**vars(args))
    ns.args = prog_args
    ns.program = program
    ns.job_dir = str(job_dir)
    ns.restart = "never"
    if not ns.relaunch:       # a lost host loses the job even with --ft
        ns.relaunch = len(faults) + 1
    if ns.timeout is None:
        ns.timeout = args.experiment_timeout / 2
    if args.verify != "none" and opt_value(prog_args, "--out"):
        ref, how = for_args(args, program, prog_args, report_dir)
        if not quiet:
            print(f"mpimig inject: reference {ref} ({how})", flush=True)
    rep = run_experiment(args, run_argv(ns, args._run_actions), faults, job_dir, report_dir, program, prog_args,
                         quiet=quiet)
    rep["seed"] = seed
    rep["schedule"] = [f["spec"] for f in faults]
    (report_dir / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    return rep


def _cmd_seeds(args: argparse.Namespace, one: Callable[..., dict], kinds: list[str], hosts: list[str],
               base_job: Path) -> int:
    """``--seeds N``: a job per seed with a random schedule, a line per job, the totals and their plot."""
    root = Path(args.report).resolve() if args.report else base_job
    root.mkdir(parents=True, exist_ok=True)
    span = _span(args.args, args.span)
    print(f"mpimig inject: {args.seeds} seeds from {args.first_seed}, {args.random} fault(s) per job of "
          f"{', '.join(kinds)}; {args.n} ranks{' on ' + args.hosts if args.hosts else ''}; "
          f"{'online recovery (--ft)' if args.ft else 'relaunch'}; reports in {root}", flush=True)

    def one_seed(seed: int) -> dict:
        faults = random_schedule(seed, args.random, kinds, args.n, span, args.ckpt_every, hosts)
        job_dir = root / f"seed-{seed}"
        return one(seed, faults, job_dir, job_dir / "inject", quiet=True)

    reports = campaign.run_seeds(range(args.first_seed, args.first_seed + args.seeds), one_seed, seed_line,
                                 name="mpimig inject")
    t = totals(reports)
    t["command"] = sys.argv
    t["seeds_run"] = [r["seed"] for r in reports]
    path = Path(args.json).resolve() if args.json else root / "inject-totals.json"
    path.write_text(json.dumps({"totals": t, "jobs": reports}, indent=1, default=str))
    png: Path | str = root / "inject-totals.png"
    try:
        totals_png(reports, root / "inject-totals.png")
    except Exception as exc:  # noqa: BLE001 - the totals stand without the picture (e.g. no matplotlib)
        png = f"(no PNG: {exc})"
    print(format_totals(t), flush=True)
    print(f"mpimig inject: totals {path}, plot {png}", flush=True)
    return 0 if t["ok"] and len(reports) == args.seeds else 1


def register(sub) -> None:
    from ..launch.options import add_run_arguments
    p = sub.add_parser(
        "inject", help="fault-injection experiment: run a job, kill parts of it, report recovery",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)   # the program's own options (--n 64) must never match ours
    g = p.add_argument_group("faults and report")
    g.add_argument("--kill", action="append", metavar="WHAT@WHEN",
                   help="a fault to inject (repeatable; see above)")
    g.add_argument("--seed", type=int, help="draw a random schedule of --random faults with this seed")
    g.add_argument("--random", type=int, default=1, metavar="K", help="faults per job of a random schedule (1)")
    g.add_argument("--kinds", default=None, metavar="LIST",
                   help=f"kinds a random schedule draws from ({', '.join(RANDOM_KINDS)}; default "
                        "rank,ranks,coordinator,ckpt-write, and host with the lab and 2+ hosts)")
    g.add_argument("--seeds", type=int, default=0, metavar="N",
                   help="run N jobs with seeded random schedules and print totals")
    g.add_argument("--first-seed", type=int, default=0, help="first seed of --seeds (0)")
    g.add_argument("--span", type=int, metavar="P",
                   help="checkpoint points the job runs, for random schedules (default: the program's --steps)")
    g.add_argument("--verify", choices=("auto", "serial", "none"), default="auto",
                   help="compare the program's --out, bit for bit, with a reference made before the job "
                        "(cached): serial: the program's --serial run; auto (default, when the program has --out): "
                        "that, or a fault-free 'mpimig run -n N' of the program when it has no --serial")
    g.add_argument("--reference-dir", help="where --serial references are kept (default: next to the reports)")
    g.add_argument("--report", metavar="DIR", help="report directory (default JOB_DIR/inject; with --seeds "
                                                   "the root of one job directory per seed)")
    g.add_argument("--json", help="with --seeds: the totals JSON (default ROOT/inject-totals.json)")
    g.add_argument("--experiment-timeout", type=float, default=900.0, metavar="S",
                   help="give up on a job after S seconds (900); each launch gets half unless --timeout")
    actions = add_run_arguments(p)
    p.set_defaults(func=_dispatch, _run_actions=actions)


def _dispatch(args: argparse.Namespace) -> int:
    args.kinds_given = args.kinds is not None
    if args.kinds is None:
        args.kinds = "rank,ranks,coordinator,ckpt-write,host"
    return cmd_inject(args)
