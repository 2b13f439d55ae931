"""``mpimig storm``: the message storm under random migrations, seed after seed.

For each seed it draws a migration schedule (random points and ranks, onto this
machine or the given hosts; sometimes two ranks at the same point, sometimes
one rank twice), sometimes a checkpoint interval, runs the storm workload
(mpimig/verify/workload.py of this installation, or your own copy of
apps/storm.py with --program) with ``mpimig run``, and reads the job's result file (message totals) and
``status.json`` (what became of each migration). It prints a line per seed
and a totals table, and exits non-zero if any seed failed or any message was
lost, duplicated, reordered or corrupted.

    mpimig storm --seeds 100 -n 4
    mpimig storm --seeds 3 -n 4 --steps 40 --migrations 3 --job-root /tmp/storm

Even with one host, a migration moves the rank into a new (spawned) process.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from . import campaign
from .. import pycmd

MSG_KEYS = ("sent", "received", "lost", "duplicated", "out_of_order", "corrupted", "unexpected",
            "collective_errors")
BAD_KEYS = ("lost", "duplicated", "out_of_order", "corrupted", "unexpected", "collective_errors")


def default_program() -> Path:
    """The installed storm workload's file (found without importing it: that would start MPI here)."""
    spec = importlib.util.find_spec("mpimig.verify.workload")
    if spec is None or spec.origin is None:
        raise UsageError("mpimig.verify.workload is missing from this installation")
    return Path(spec.origin).resolve()


def this_host() -> str:
    return socket.gethostname()


def make_schedule(seed: int, n: int, steps: int, k: int, hosts: list[str]) -> tuple[list[tuple], int | None]:
    """The migrations (point, rank, host) and the checkpoint interval (or None) of a seed.

    Points are drawn from the first 60% of the run so the moves happen before
    it ends. Even seeds put two ranks at one point, seeds divisible by 3 move
    one rank twice (so seed 0, 6, 12, ... have both); other seeds do either
    sometimes.
    """
    rnd = random.Random(f"mpimig-storm-{seed}")
    lo, hi = 2, max(3, int(steps * 0.6))
    migs: list[list[Any]] = [[rnd.randint(lo, hi), rnd.randrange(n), rnd.choice(hosts)] for _ in range(k)]
    if k >= 2 and n >= 2 and (seed % 2 == 0 or rnd.random() < 0.3):
        a, b = rnd.sample(range(k), 2)                      # two ranks at the same point
        migs[b][0] = migs[a][0]
        if migs[b][1] == migs[a][1]:
            migs[b][1] = (migs[a][1] + 1 + rnd.randrange(n - 1)) % n
    if k >= 2 and (seed % 3 == 0 or rnd.random() < 0.3):
        pairs = [(a, b) for a in range(k) for b in range(k)
                 if a != b and migs[a][0] != migs[b][0]]
        if not pairs:
            pairs = [(a, b) for a in range(k) for b in range(k) if a != b]
        a, b = rnd.choice(pairs)                            # one rank twice
        # keep a same-point pair intact: move b's rank only if b is not in one
        same = [i for i in range(k) if i != b and migs[i][0] == migs[b][0]]
        if same and migs[a][1] in {migs[i][1] for i in same}:
            a, b = b, a
        migs[b][1] = migs[a][1]
    ckpt = rnd.randint(2, 6) if rnd.random() < 0.35 else None
    migs.sort()
    return [tuple(m) for m in migs], ckpt


def move_facts(moves: dict[str, list[int]]) -> dict[str, bool]:
    """From the program's own record (rank -> points at which it arrived in a new
    process): were two ranks moved at one point (in one plan), one rank twice?"""
    by_point: dict[int, int] = {}
    for pts in moves.values():
        for p in pts:
            by_point[p] = by_point.get(p, 0) + 1
    return {"same_point": any(v >= 2 for v in by_point.values()),
            "rank_twice": any(len(v) >= 2 for v in moves.values())}


def job_env(local_only: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if local_only:
        # one machine: keep Open MPI's TCP traffic (between spawned processes) on loopback,
        # so interfaces that come and go (other jobs' lab bridges) cannot break a run
        env.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")
    return env


def seed_command(seed: int, args, program: Path, migs: list[tuple], ckpt: int | None, jd: Path) -> list[str]:
    """The ``mpimig run`` command line of one seed."""
    cmd = [*pycmd.module("mpimig"), "run", "-n", str(args.n), "--job-dir", str(jd),
           "--restart", "never", "--timeout", str(args.timeout)]
    if args.hosts:
        cmd += ["--hosts", args.hosts]
    if ckpt:
        cmd += ["--ckpt-every", str(ckpt)]
    cmd += list(args.run_arg or [])
    for p, r, h in migs:
        cmd += ["--migrate", f"{p}:{r}:{h}" + (f":{args.strategy}" if args.strategy else "")]
    cmd += [str(program), "--seed", str(seed), "--steps", str(args.steps), "--msgs", str(args.msgs),
            "--work-ms", str(args.work_ms), "--out", str(jd / "result.json")]
    if args.ballast:
        cmd += ["--ballast", str(args.ballast)]
    return cmd


def run_job(cmd: list[str], jd: Path, timeout: float, local_only: bool) -> int | None:
    """Run ``cmd`` in its own session with output in ``jd/output.log``; its exit
    status, or None if it was killed after ``timeout`` seconds.

    The job runs in its job directory: ``python -m mpimig`` there imports the
    same mpimig as this process, never a checkout's from the current directory.
    """
    with open(jd / "output.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(jd),
                                env=job_env(local_only), start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _migration_facts(rec: dict, migrations: list[dict], scheduled: int) -> None:
    """What status.json says became of the scheduled migrations."""
    rec["migrations"] = [{k: m.get(k) for k in ("id", "rank", "at_point", "to", "state", "strategy")}
                         for m in migrations]
    rec["done"] = sum(1 for m in migrations if m.get("state") == "done")
    rec["cancelled"] = sum(1 for m in migrations if str(m.get("state", "")).startswith("cancelled"))
    rec["unfinished"] = len(migrations) - rec["done"] - rec["cancelled"]
    rec["missing"] = max(0, scheduled - len(migrations))


def _result_facts(rec: dict, res: dict | None, jd: Path) -> None:
    """The program's own totals (or, without a result, what the job said about itself)."""
    rec["moved"] = 0
    if res is not None:
        moves = res.get("moves", {})
        rec["moved"] = sum(len(v) for v in moves.values())
        rec.update(move_facts(moves))
        for k in MSG_KEYS + ("held_total", "kept_requests", "wildcard", "probe", "deferred"):
            rec[k] = int(res.get(k, 0))
        rec["notes"] = res.get("notes", [])[:10]
        return
    try:      # stuck ranks, errors
        lines = (jd / "output.log").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    rec["notes"] = [x for x in lines if x.startswith(("storm: rank", "mpimig: rank", "mpimig: job"))][:10]


def judge(rec: dict, res: dict | None, rc: int | None, migrations: list[dict], timeout: float) -> str | None:
    """What went wrong with a seed (the first thing of: hang, no result, message errors,
    exit status, moves the program did not see, unfinished migrations), or None."""
    log = Path(rec["dir"]) / "output.log"
    if rc is None:
        return f"timed out after {timeout:.0f} s (hang?)"
    if res is None:
        return f"no result file (mpimig run exit status {rc}); see {log}"
    if not res.get("ok") or any(res.get(k, 0) for k in BAD_KEYS) or res.get("sent") != res.get("expected"):
        return "message errors: " + ", ".join(f"{k}={res.get(k)}" for k in BAD_KEYS if res.get(k))
    if rc != 0:
        return f"mpimig run exit status {rc}; see {log}"
    if rec["moved"] != rec["done"]:
        return (f"status.json has {rec['done']} migrations done, the program saw "
                f"{rec['moved']} moves into new processes")
    if rec["unfinished"] or rec["missing"]:
        return (f"{rec['unfinished']} migrations left unfinished, {rec['missing']} missing: "
                + ", ".join(f"{m['id']}:{m['state']}" for m in migrations
                            if m.get("state") != "done" and not str(m.get("state")).startswith("cancelled")))
    return None


def run_seed(seed: int, args, program: Path, hosts: list[str], job_root: Path) -> dict:
    """Run one seed; return its record (never raises for a failed job)."""
    jd = job_root / f"seed-{seed:04d}"
    if jd.exists():
        shutil.rmtree(jd)
    jd.mkdir(parents=True)
    migs, ckpt = make_schedule(seed, args.n, args.steps, args.migrations, hosts)
    if args.no_ckpt:
        ckpt = None
    cmd = seed_command(seed, args, program, migs, ckpt, jd)
    rec: dict[str, Any] = {"seed": seed, "schedule": [list(m) for m in migs], "ckpt_every": ckpt, "ok": False,
                           "error": None, "dir": str(jd)}
    t0 = time.monotonic()
    rc = run_job(cmd, jd, args.timeout + 60, local_only=not args.hosts)
    rec["seconds"] = round(time.monotonic() - t0, 1)
    rec["rc"] = rc
    res = _read_json(jd / "result.json")
    migrations = (_read_json(jd / "status.json") or {}).get("migrations", [])
    _migration_facts(rec, migrations, len(migs))
    _result_facts(rec, res, jd)
    rec["error"] = judge(rec, res, rc, migrations, args.timeout + 60)
    rec["ok"] = rec["error"] is None
    if rec["ok"] and not args.keep_dirs:
        shutil.rmtree(jd / "ckpt", ignore_errors=True)
    return rec


def format_line(rec: dict) -> str:
    if "sent" in rec:
        msg = (f"sent {rec['sent']:6d} recv {rec['received']:6d} lost {rec['lost']} dup {rec['duplicated']} "
               f"ooo {rec['out_of_order']} corrupt {rec['corrupted']}")
    else:
        msg = "no result"
    extra = []
    if rec.get("same_point"):
        extra.append("2 ranks in one plan")
    if rec.get("rank_twice"):
        extra.append("a rank twice")
    line = (f"seed {rec['seed']:4d}  {'ok  ' if rec['ok'] else 'FAIL'}  {msg}  migrations {rec['done']} done "
            f"{rec['cancelled']} cancelled  ckpt {rec['ckpt_every'] or '-'}  {rec['seconds']:.1f} s"
            + (f"  [{', '.join(extra)}]" if extra else ""))
    if rec.get("error"):
        line += f"\n      error: {rec['error']}"
        for n in rec.get("notes", [])[:5]:
            line += f"\n      {n}"
    return line


def _flag(key: str) -> Any:
    return lambda r: bool(r.get(key))


#: how ``mpimig storm`` totals its seeds and what its table shows
CAMPAIGN = campaign.Campaign(
    count_key="seeds", failures_key="failures",
    sums=MSG_KEYS + ("done", "cancelled", "unfinished", "moved", "held_total"),
    extra=lambda recs: {"migrations": sum(len(r["schedule"]) for r in recs)},
    counts=(("with_checkpoints", _flag("ckpt_every")), ("same_point_runs", _flag("same_point")),
            ("rank_twice_runs", _flag("rank_twice"))),
    ok=lambda t: t["failures"] == 0 and not any(t[k] for k in BAD_KEYS),
    rows=(
        ("seeds run", "seeds"),
        ("  with checkpoints", "with_checkpoints"),
        ("messages sent", "sent"),
        ("messages received", "received"),
        ("lost", "lost"),
        ("duplicated", "duplicated"),
        ("out of order", "out_of_order"),
        ("corrupted", "corrupted"),
        ("unexpected matches", "unexpected"),
        ("collective errors", "collective_errors"),
        ("held at safe points", "held_total"),
        ("migrations scheduled", "migrations"),
        ("migrations done", "done"),
        ("migrations cancelled", "cancelled"),
        ("migrations unfinished", "unfinished"),
        ("moves seen by the program", "moved"),
        ("runs: 2 ranks moved in one plan", "same_point_runs"),
        ("runs: a rank moved twice", "rank_twice_runs"),
        ("failures", "failures"),
        ("seconds", "seconds"),
    ))


def totals(recs: list[dict]) -> dict:
    return campaign.totals(recs, CAMPAIGN)


def format_totals(t: dict) -> str:
    return campaign.format_totals(t, CAMPAIGN)


def _check_args(args) -> None:
    if args.n < 2:
        raise UsageError("-n must be at least 2 (a storm needs senders and receivers)")
    if args.strategy:
        from ..migration.protocol import check_strategy
        err = check_strategy(args.strategy)
        if err:
            raise UsageError(f"--strategy: {err}")
    if args.seeds < 1 or args.steps < 4 or args.migrations < 0:
        raise UsageError("--seeds must be >= 1, --steps >= 4, --migrations >= 0")


def cmd_storm(args) -> int:
    _check_args(args)
    program = Path(args.program).resolve() if args.program else default_program()
    if not program.exists():
        raise UsageError(f"storm program {program} not found (give --program PATH/TO/storm.py)")
    hosts = [h.split(":")[0] for h in args.hosts.split(",") if h.strip()] if args.hosts else [this_host()]
    job_root = Path(args.job_root or Path("mpimig-jobs") / "storm").resolve()
    job_root.mkdir(parents=True, exist_ok=True)
    print(f"mpimig storm: {args.seeds} seeds from {args.first_seed}, {args.n} ranks, {args.steps} steps, "
          f"{args.msgs} messages per step per rank, {args.migrations} migrations per seed onto "
          f"{', '.join(hosts)}; jobs in {job_root}", flush=True)
    recs = campaign.run_seeds(range(args.first_seed, args.first_seed + args.seeds),
                              lambda seed: run_seed(seed, args, program, hosts, job_root), format_line,
                              name="mpimig storm",
                              stop=(lambda rec: not rec["ok"]) if args.stop_on_failure else None)
    t = totals(recs)
    print(format_totals(t), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"totals": t, "seeds": recs}, indent=1))
    return 0 if t["ok"] and len(recs) == args.seeds else 1


def register(sub) -> None:
    p = sub.add_parser(
        "storm", help="message storm under random migrations, many seeds",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("-n", "--np", dest="n", type=int, default=4, help="ranks (default 4)")
    p.add_argument("--steps", type=int, default=50, help="checkpoint points per run (default 50)")
    p.add_argument("--msgs", type=int, default=12, help="messages per step per rank (default 12)")
    p.add_argument("--work-ms", type=float, default=40.0,
                   help="extra milliseconds per step, so scheduled migrations happen (default 40)")
    p.add_argument("--migrations", type=int, default=3, help="migrations per seed (default 3)")
    p.add_argument("--hosts", help="host list for mpimig run (h1:2,h2:2); targets are drawn from it "
                                   "(default: this machine)")
    p.add_argument("--no-ckpt", action="store_true", help="never add --ckpt-every")
    p.add_argument("--strategy", help="migration strategy of every move (default: stop-and-copy)")
    p.add_argument("--ballast", type=int, default=0, metavar="BYTES",
                   help="bulk state per rank for the program (its --ballast)")
    p.add_argument("--run-arg", action="append", metavar="ARG",
                   help="extra argument for mpimig run, e.g. --run-arg=--mpiexec-arg=... (repeatable)")
    p.add_argument("--job-root", help="where the job directories go (default mpimig-jobs/storm)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run (default 300)")
    p.add_argument("--program", help="a storm program of your own, e.g. a copy of apps/storm.py "
                                     "(default: the installed mpimig/verify/workload.py)")
    p.add_argument("--keep-dirs", action="store_true", help="keep checkpoints of successful runs")
    p.add_argument("--stop-on-failure", action="store_true")
    p.add_argument("--json", metavar="FILE", help="write totals and per-seed records here")
    p.set_defaults(func=cmd_storm)
