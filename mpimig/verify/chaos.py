"""``mpimig chaos``: random migrations, kills, message storms and ballast, seed after seed.

Each seed draws one scenario and runs it as a fault-injection experiment (the
machinery of ``mpimig inject``: mpimig/ft/inject.py starts ``mpimig run``,
fires the faults, reads the event log and checks the result): a workload (the
message storm of ``mpimig storm``, some seeds with ballast; or heat2d, whose
result is compared bit for bit with its ``--serial`` run), random migrations
with every strategy, random kills, a checkpoint interval, online recovery
(``--ft``) or relaunch, warm spares or none. It prints a line per seed on
stderr and the invariants' totals on stdout, and exits non-zero when one is
broken: a message lost, duplicated, reordered or corrupted, a result that is
not bit-identical, a hang, a job that did not complete. SIGTERM or Ctrl-C
stops the running job and prints the totals of the seeds run. docs/chaos.md
has the details.

    mpimig chaos --seeds 200
    mpimig chaos --seeds 3 --seed-base 100 --json chaos.json

Kills (``--kinds``; each seed draws 1..``--kills`` of them):

  rank, ranks          one / two logical ranks (SIGKILL right after a checkpoint point)
  coordinator          the coordinator process
  spare                a warm spare before it takes a rank (the job gets one; found
                       through the coordinator's session and the spare's MPI world rank)
  ckpt-write           a rank while its file of an epoch is written (before the vote)
  migration-source     the old process of the first move, before it sends its state
  migration-target     its new process, before it receives it
  host                 a whole lab host (only with the lab up and 2+ hosts in --hosts;
                       otherwise skipped, with a note)

Every launch runs under ``--timeout`` and every seed under a deadline: a hang
is killed, counted and reported, never waited for.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import events
from ..errors import UsageError
from . import campaign, storm

WORKLOADS = ("storm", "heat2d")
KILL_KINDS = ("rank", "ranks", "coordinator", "spare", "ckpt-write", "migration-source", "migration-target",
              "host")


def strategies() -> tuple[str, ...]:
    """Every registered migration strategy."""
    from ..migration.protocol import STRATEGIES
    return tuple(STRATEGIES)


# --------------------------------------------------------------------------- scenario

@dataclass
class Scenario:
    """What one seed runs: the workload, the moves, the kills and how the job recovers."""

    seed: int
    workload: str
    n: int
    steps: int
    ckpt_every: int
    ft: bool
    spares: int
    ballast: int
    migrations: list[tuple[int, int, str, str]]     # (point, rank, host, strategy)
    faults: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        moves = " ".join(f"{p}:{r}:{s}" for p, r, _h, s in self.migrations)
        kills = " ".join(f["spec"] for f in self.faults)
        return (f"{self.workload}{f'+ballast {self.ballast >> 10} KiB' if self.ballast else ''} "
                f"{'ft' if self.ft else 'relaunch'}{f' spares {self.spares}' if self.spares else ''} "
                f"ckpt {self.ckpt_every}; moves [{moves}]; kills [{kills}]")


def draw(seed: int, opts: argparse.Namespace, hosts: list[str], kinds: list[str]) -> Scenario:
    """The seed's scenario (a pure function of the seed and the options).

    Seeds cycle through the workloads (every third seed runs heat2d) and the
    strategies (the first move of seed s uses strategy s mod 4), so a few
    seeds cover them all; the rest is drawn at random.
    """
    from ..ft.faults import parse_fault
    rnd = random.Random(f"mpimig-chaos-{seed}")
    workload = "heat2d" if seed % 3 == 2 else "storm"
    n, steps = opts.n, opts.steps
    ckpt_every = rnd.randint(3, 6)
    ft = rnd.random() < opts.ft_share
    strats = strategies()
    k = rnd.randint(1, max(1, opts.migrations))
    migs: list[tuple[int, int, str, str]] = []
    for i, (p, r, h) in enumerate(storm.make_schedule(seed, n, steps, k, hosts)[0]):
        while any(m[0] == p and m[1] == r for m in migs):     # one rank twice: not at one point
            p += 3
        migs.append((p, r, h, strats[(seed + i) % len(strats)] if i == 0 else rnd.choice(strats)))
    ballast = 0
    if workload == "storm" and rnd.random() < 0.5:
        ballast = rnd.choice((64 << 10, 1 << 20, 4 << 20))
    nk = rnd.randint(1, max(1, opts.kills))
    specs: list[str] = []
    extra: list[dict] = []
    used = set()
    for _ in range(nk):
        left = [x for x in kinds if x not in used or x in ("rank", "ckpt-write")]   # others once a seed
        if not left:
            break
        kind = rnd.choice(left)
        used.add(kind)
        p = rnd.randint(ckpt_every + 1, max(ckpt_every + 2, int(steps * 0.75)))
        if kind == "rank":
            specs.append(f"rank:{rnd.randrange(n)}@point:{p}")
        elif kind == "ranks":
            specs.append(f"ranks:{'+'.join(map(str, sorted(rnd.sample(range(n), 2))))}@point:{p}")
        elif kind == "coordinator":
            specs.append(f"coordinator@point:{p}")
        elif kind == "ckpt-write":
            specs.append(f"ckpt-write:{rnd.randrange(n)}@epoch:{rnd.randint(1, max(1, steps // ckpt_every - 1))}")
        elif kind in ("migration-source", "migration-target"):
            specs.append(kind)
        elif kind == "host":
            specs.append(f"host:{rnd.choice(hosts)}@point:{p}")
        elif kind == "spare":
            # before the first move: a move to this host takes the idle spare (and its refill is
            # a spawned process, which the spare killer does not look for)
            p = rnd.randint(2, max(2, migs[0][0] - 1))
            extra.append({"spec": f"spare@point:{p}", "kind": "spare", "target": "spare", "at_point": p})
    faults = [parse_fault(s, i + 1) for i, s in enumerate(dict.fromkeys(specs))]
    for f in extra:
        faults.append({"id": len(faults) + 1, **f})
    spares = 1 if any(f["kind"] == "spare" for f in faults) else int(rnd.random() < 0.5)
    return Scenario(seed, workload, n, steps, ckpt_every, ft, spares, ballast, migs, faults)


# --------------------------------------------------------------------------- the job

def _program(workload: str) -> Path:
    if workload == "storm":
        return storm.default_program()
    spec = importlib.util.find_spec("mpimig.apps.heat2d")
    if spec is None or spec.origin is None:
        raise UsageError("mpimig.apps.heat2d is missing from this installation")
    return Path(spec.origin).resolve()


def job_command(sc: Scenario, opts: argparse.Namespace, jd: Path) -> tuple[list[str], Path, list[str]]:
    """``mpimig run``'s arguments for the scenario, the program, and the program's arguments."""
    program = _program(sc.workload)
    run = ["-n", str(sc.n), "--job-dir", str(jd), "--restart", "never", "--coordinator",
           "--ckpt-every", str(sc.ckpt_every), "--timeout", str(opts.timeout),
           "--relaunch", str(len(sc.faults) + 1)]
    if opts.hosts:
        run += ["--hosts", opts.hosts]
    if sc.ft:
        run.append("--ft")
    if sc.spares:
        run += ["--spares", str(sc.spares)]
    for p, r, h, s in sc.migrations:
        run += ["--migrate", f"{p}:{r}:{h}:{s}"]
    if sc.workload == "storm":
        prog_args = ["--seed", str(sc.seed), "--steps", str(sc.steps), "--msgs", str(opts.msgs),
                     "--work-ms", str(opts.work_ms), "--out", str(jd / "result.json"),
                     "--stall-seconds", str(max(10.0, opts.timeout / 2))]
        if sc.ballast:
            prog_args += ["--ballast", str(sc.ballast)]
    else:
        prog_args = ["--n", str(opts.grid), "--steps", str(sc.steps), "--work-ms", str(opts.work_ms),
                     "--out", str(jd / "out.npy")]
    return run + [str(program)] + prog_args, program, prog_args


class SpareKiller(threading.Thread):
    """Fires the ``spare`` faults, which ``mpimig inject`` does not know: at the fault's
    point (rank 0's progress file), one warm spare is SIGKILLed (idle, or already promised
    to a scheduled move: the coordinator reserves it when it plans the move).

    The spare is found by the job's records: the coordinator's pid (status.json)
    gives the job's session; of its processes, an idle spare is one of the job's
    first launch (PMIx namespace ``...@1``) whose MPI world rank is above the
    ranks' (world rank 0 is the coordinator, 1..n the ranks) and whose pid is not
    in the routing table (a spare that took a rank is a rank). Never by process name.
    """

    def __init__(self, faults: list[dict], job_dir: Path, report_dir: Path, n: int) -> None:
        super().__init__(name="chaos-spare-killer", daemon=True)
        self.faults = [f for f in faults if f["kind"] == "spare"]
        self.job_dir, self.report_dir, self.n = job_dir, report_dir, n
        self.done = threading.Event()

    def run(self) -> None:
        from ..ft.hooks import read_progress
        left = list(self.faults)
        while left and not self.done.wait(0.02):    # polling the job's progress file, bounded by done
            pr = read_progress(self.report_dir)
            if pr is None:
                continue
            for f in [f for f in left if pr[0] >= f["at_point"]]:
                if self._fire(f, pr):
                    left.remove(f)

    def _fire(self, f: dict, pr: tuple) -> bool:
        st = _read_json(self.job_dir / "status.json")
        if not st or st.get("run_id") != pr[2]:
            return False
        pid = spare_pid(st, self.n)
        if pid is None:
            return False
        t = time.time()
        try:
            os.kill(pid, 9)
        except OSError:
            return False
        events.emit(self.job_dir, "injected", pr[2], id=f["id"], kind="spare", target="spare", by="chaos",
                    t=t, pids=[pid], point=pr[0])
        return True


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        k, _, v = item.partition(b"=")
        out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def spare_pid(status: dict, n: int) -> int | None:
    """The pid of a warm spare of the job whose coordinator status.json describes (idle, or
    promised to a scheduled move that has not happened yet), or None."""
    from .._proc import session_pids
    try:
        sid = os.getsid(int(status["coordinator"]["pid"]))
    except (OSError, KeyError, TypeError, ValueError):
        return None
    busy = {int(r["pid"]) for r in status.get("routing", []) if r.get("pid") is not None}
    for pid in sorted(session_pids(sid)):
        env = _environ(pid)
        wr = env.get("OMPI_COMM_WORLD_RANK") or env.get("PMI_RANK")
        if (wr is None or not wr.isdigit() or int(wr) <= n or pid in busy
                or not env.get("PMIX_NAMESPACE", "@1").endswith("@1")):
            continue
        return pid
    return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_seed(seed: int, opts: argparse.Namespace, hosts: list[str], kinds: list[str], root: Path) -> dict:
    """Run one seed's scenario; its record (never raises for a failed job)."""
    from ..ft.inject import run_experiment
    sc = draw(seed, opts, hosts, kinds)
    jd = root / f"seed-{seed:04d}"
    if jd.exists():
        shutil.rmtree(jd)
    run_args, program, prog_args = job_command(sc, opts, jd)
    exp = argparse.Namespace(experiment_timeout=opts.timeout * (len(sc.faults) + 2) + 60,
                             verify="serial" if sc.workload == "heat2d" else "none",
                             reference_dir=str(root / "references"))
    rec: dict[str, Any] = {"seed": seed, "scenario": sc.describe(), **asdict(sc), "dir": str(jd)}
    rec["faults"] = [f["spec"] for f in sc.faults]
    t0 = time.monotonic()
    killer = SpareKiller(sc.faults, jd, jd / "chaos", sc.n)
    killer.start()
    try:
        rep = run_experiment(exp, run_args, sc.faults, jd, jd / "chaos", str(program), prog_args, quiet=True)
    except UsageError as exc:         # e.g. the --serial reference could not be made
        rep = {"faults": [], "completed": False, "verified": False, "timed_out": False, "error": str(exc)}
    finally:
        killer.done.set()
        killer.join(5)
    rec["seconds"] = round(time.monotonic() - t0, 1)
    judge(rec, sc, rep, events.read(jd) if jd.exists() else [], _read_json(jd / "result.json"))
    migs = (_read_json(jd / "status.json") or {}).get("migrations", [])
    # what the last run's coordinator says of its moves: neither done, failed nor cancelled
    # at the end of a completed job is a move left hanging (reported, not judged here)
    rec["moves_left_unfinished"] = [f"{m.get('id')}:{m.get('strategy')}:{m.get('state')}" for m in migs
                                    if rec["completed"] and not str(m.get("state", "")).startswith(
                                        ("done", "failed", "cancelled"))]
    if rec["ok"] and not opts.keep_dirs:
        shutil.rmtree(jd / "ckpt", ignore_errors=True)
    return rec


def judge(rec: dict, sc: Scenario, rep: dict, evs: list[dict], res: dict | None) -> None:
    """The seed's invariants from the experiment's report, the event log and the storm's result."""
    rec["completed"] = bool(rep.get("completed"))
    rec["hangs"] = int(bool(rep.get("timed_out"))) + sum(
        1 for e in evs if e["event"] == "job_lost" and e.get("reason") == "timeout")
    # launches whose process died while mpiexec went on, stopped by mpimig run's bound
    # (MPIMIG_LOST_TIMEOUT, mpimig/launch/stuck.py): not hangs, but shown
    rec["stuck"] = sum(1 for e in evs if e["event"] == "job_stuck")
    rec["relaunches"] = sum(1 for e in evs if e["event"] == "relaunch")
    rec["online_recoveries"] = sum(1 for e in evs if e["event"] == "recovered")
    moved = [e for e in evs if e["event"] == "migrated"]
    rec["moves_done"] = len(moved)
    rec["moves_by_strategy"] = {s: sum(1 for e in moved if e.get("strategy") == s) for s in strategies()}
    # the kind as drawn ("ranks" is a "rank" fault with several ranks for inject)
    rec["fault_rows"] = [{**{k: f.get(k) for k in ("id", "spec", "fired", "path", "survived")},
                          "kind": kind_of(f["spec"])} for f in rep.get("faults", [])]
    errors: list[str] = []
    if rep.get("error"):
        errors.append(rep["error"])
    if rec["hangs"]:
        errors.append(f"{rec['hangs']} hang(s): a launch or the seed hit its timeout")
    if not rec["completed"]:
        errors.append("the job did not complete (no completion record after its relaunches)")
    if sc.workload == "heat2d":
        rec["bit_identical"] = rep.get("verified") is True
        if rec["completed"] and not rec["bit_identical"]:
            errors.append("the result is not bit-identical to the --serial reference")
    elif res is not None:
        for key in storm.MSG_KEYS:
            rec[key] = int(res.get(key, 0))
        rec["expected"] = int(res.get("expected", 0))
        rec["notes"] = res.get("notes", [])[:5]
        bad = {k: rec[k] for k in storm.BAD_KEYS if rec[k]}
        if bad or rec["sent"] != rec["expected"] or not res.get("ok"):
            errors.append("message errors: " + ", ".join(f"{k}={v}" for k, v in bad.items())
                          + (f" sent {rec['sent']} of {rec['expected']}" if rec["sent"] != rec["expected"] else ""))
    elif rec["completed"]:
        errors.append("the storm completed without a result file")
    # (a fault inject does not count as survived, e.g. a relaunch that had no epoch and started
    # over, is no broken invariant when the job still completed with the right result: the
    # recoveries table shows it)
    rec["errors"] = errors
    rec["ok"] = not errors


def kind_of(spec: str) -> str:
    """The kind of kill a fault spec was drawn as (``ranks:1+2@point:9`` -> ``ranks``)."""
    return spec.split("@")[0].split(":")[0]


def format_line(rec: dict) -> str:
    if "sent" in rec:
        what = (f"sent {rec['sent']:5d} recv {rec['received']:5d} lost {rec['lost']} dup {rec['duplicated']} "
                f"ooo {rec['out_of_order']} corrupt {rec['corrupted']}")
    elif rec["workload"] == "heat2d":
        what = "bit-identical" if rec.get("bit_identical") else "NOT bit-identical / no result"
    else:
        what = "no result"
    paths = ",".join(f"{f['kind']}:{f['path'] or ('not fired' if not f['fired'] else '?')}"
                     for f in rec["fault_rows"])
    line = (f"seed {rec['seed']:4d}  {'ok  ' if rec['ok'] else 'FAIL'}  {rec['workload']:6s} {what}  "
            f"moves {rec['moves_done']}  kills [{paths}]  {rec['seconds']:.1f} s\n      {rec['scenario']}")
    for e in rec["errors"]:
        line += f"\n      error: {e}"
    if rec.get("moves_left_unfinished"):
        line += f"\n      moves left unfinished: {', '.join(rec['moves_left_unfinished'])}"
    for note in rec.get("notes", [])[:3] if rec["errors"] else []:
        line += f"\n      {note}"
    return line


# --------------------------------------------------------------------------- totals

def _recoveries(recs: list[dict]) -> dict:
    """Faults by kind: injected, recovered online, by relaunch, survived, not fired."""
    out: dict[str, dict[str, int]] = {}
    for r in recs:
        for f in r["fault_rows"]:
            d = out.setdefault(f["kind"], dict.fromkeys(("drawn", "fired", "online", "relaunch", "survived"), 0))
            d["drawn"] += 1
            d["fired"] += int(bool(f["fired"]))
            d["survived"] += int(bool(f["survived"]))
            if f["path"] in ("online", "relaunch"):
                d[f["path"]] += 1
    return dict(sorted(out.items()))


def _extra(recs: list[dict]) -> dict:
    heat = [r for r in recs if r["workload"] == "heat2d"]
    moves: dict[str, int] = {}
    for r in recs:
        for s, c in r["moves_by_strategy"].items():
            moves[s] = moves.get(s, 0) + c
    return {"storm_seeds": sum(1 for r in recs if r["workload"] == "storm"),
            "ballast_seeds": sum(1 for r in recs if r.get("ballast")),
            "ft_seeds": sum(1 for r in recs if r.get("ft")),
            "heat2d_seeds": len(heat), "bit_identical": sum(1 for r in heat if r.get("bit_identical")),
            "migrations_scheduled": sum(len(r["migrations"]) for r in recs),
            "moves_by_strategy": moves, "recoveries": _recoveries(recs),
            "faults_drawn": sum(len(r["fault_rows"]) for r in recs),
            "moves_left_unfinished": sum(len(r.get("moves_left_unfinished", [])) for r in recs),
            "faults_fired": sum(1 for r in recs for f in r["fault_rows"] if f["fired"]),
            "faults_survived": sum(1 for r in recs for f in r["fault_rows"] if f["survived"])}


def _recovery_rows(t: dict) -> list[tuple[str, Any]]:
    return [(f"  {k}", f"{d['fired']} fired of {d['drawn']}: {d['online']} online, {d['relaunch']} relaunch, "
                       f"{d['survived']} survived") for k, d in t["recoveries"].items()]


def _ok(t: dict) -> bool:
    return (t["failures"] == 0 and t["hangs"] == 0 and not any(t[k] for k in storm.BAD_KEYS)
            and t["sent"] == t["received"] and t["bit_identical"] == t["heat2d_seeds"])


#: how ``mpimig chaos`` totals its seeds and what its table shows
CAMPAIGN = campaign.Campaign(
    count_key="seeds", failures_key="failures",
    sums=storm.MSG_KEYS + ("expected", "hangs", "stuck", "relaunches", "online_recoveries", "moves_done"),
    counts=(("completed", lambda r: r["completed"]),),
    extra=_extra, ok=_ok,
    rows=(
        ("seeds run", "seeds"),
        ("  storm / heat2d", lambda t: f"{t['storm_seeds']} / {t['heat2d_seeds']}"),
        ("  with ballast / with --ft", lambda t: f"{t['ballast_seeds']} / {t['ft_seeds']}"),
        ("jobs completed", "completed"),
        ("messages sent", "sent"),
        ("messages received", "received"),
        ("lost", "lost"),
        ("duplicated", "duplicated"),
        ("out of order", "out_of_order"),
        ("corrupted", "corrupted"),
        ("unexpected matches", "unexpected"),
        ("collective errors", "collective_errors"),
        ("results bit-identical", lambda t: f"{t['bit_identical']} of {t['heat2d_seeds']}"),
        ("hangs (timeouts)", "hangs"),
        ("  launches stopped: a process dead, mpiexec on", "stuck"),
        ("migrations scheduled", "migrations_scheduled"),
        ("moves done", lambda t: f"{t['moves_done']} ("
                                 + ", ".join(f"{k} {v}" for k, v in t["moves_by_strategy"].items()) + ")"),
        ("moves left unfinished at the end", "moves_left_unfinished"),
        ("faults drawn / fired / survived",
         lambda t: f"{t['faults_drawn']} / {t['faults_fired']} / {t['faults_survived']}"),
        ("recoveries: online / relaunch", lambda t: f"{t['online_recoveries']} / {t['relaunches']}"),
        ("by kind", lambda t: ""),
        _recovery_rows,
        ("failures", "failures"),
        ("seconds", "seconds"),
    ))


# --------------------------------------------------------------------------- command

def _kinds(opts: argparse.Namespace, hosts: list[str]) -> list[str]:
    kinds = [k.strip() for k in opts.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KILL_KINDS]
    if bad:
        raise UsageError(f"--kinds: unknown {', '.join(bad)}; known: {', '.join(KILL_KINDS)}")
    if "host" in kinds:
        from ..ft.inject import _lab
        if len(hosts) < 2 or _lab() is None:
            print("mpimig chaos: note: no host kills (they need the lab up, mpimig lab up, and 2+ hosts "
                  "in --hosts)", file=sys.stderr, flush=True)
            kinds.remove("host")
    if not kinds:
        raise UsageError("--kinds: no kind of kill left to draw")
    return kinds


def _check(opts: argparse.Namespace) -> None:
    if opts.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    if opts.n < 2:
        raise UsageError("-n must be at least 2 (a storm needs senders and receivers)")
    if opts.steps < 12:
        raise UsageError("--steps must be at least 12 (checkpoints, moves and kills need room)")
    if opts.kills < 1 or opts.migrations < 1:
        raise UsageError("--kills and --migrations must be >= 1")
    if not 0.0 <= opts.ft_share <= 1.0:
        raise UsageError("--ft-share is a fraction between 0 and 1")
    if opts.timeout <= 0:
        raise UsageError("--timeout must be > 0")


def cmd_chaos(opts: argparse.Namespace) -> int:
    _check(opts)
    hosts = [h.split(":")[0] for h in opts.hosts.split(",") if h.strip()] if opts.hosts else [storm.this_host()]
    kinds = _kinds(opts, hosts if opts.hosts else [])
    root = Path(opts.job_root or Path("mpimig-jobs") / "chaos").resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not opts.hosts:      # one machine: Open MPI's TCP on loopback (as mpimig storm does)
        os.environ.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")
    for var, value in bounds_within(opts.timeout).items():
        os.environ.setdefault(var, value)
    seeds = range(opts.seed_base, opts.seed_base + opts.seeds)
    print(f"mpimig chaos: {opts.seeds} seeds from {opts.seed_base}, {opts.n} ranks, {opts.steps} steps; "
          f"kills of {', '.join(kinds)}; moves onto {', '.join(hosts)} with {', '.join(strategies())}; "
          f"jobs in {root}", file=sys.stderr, flush=True)
    done: list[dict] = []

    def one(seed: int) -> dict:
        rec = run_seed(seed, opts, hosts, kinds, root)
        done.append(rec)
        if opts.json and opts.json != "-":     # the totals so far, so a long campaign cut short keeps them
            _write_json(Path(opts.json), _totals(done, kinds, opts, final=False), done)
        return rec

    # SIGTERM (e.g. a time budget running out) ends the campaign like Ctrl-C: the running job is
    # stopped (inject's experiment kills its session) and the totals of the seeds run are printed
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        recs = campaign.run_seeds(seeds, one, format_line, name="mpimig chaos", out=sys.stderr,
                                  stop=(lambda r: not r["ok"]) if opts.stop_on_failure else None)
    finally:
        signal.signal(signal.SIGTERM, old)
    t = _totals(recs, kinds, opts, final=True)
    if opts.json == "-":
        print(json.dumps({"totals": t, "seeds": recs}, indent=1, default=str), flush=True)
    else:
        print(campaign.format_totals(t, CAMPAIGN), flush=True)
        if opts.json:
            _write_json(Path(opts.json), t, recs)
    return 0 if t["ok"] and len(recs) == opts.seeds else 1


def bounds_within(launch_timeout: float) -> dict[str, str]:
    """The protocol's bounds (mpimig.exits.TIMEOUTS) that are longer than half a launch's
    ``--timeout``, shortened to half of it: a wait that outlives its bound then ends the job
    with a message naming the wait (and the launch is relaunched) instead of being cut by
    the launch timeout and counted as a hang. (E.g. the --ft recovery that never completes
    when Open MPI's failure notice does not reach a spawned process, ompi#13325: its 120 s
    bound equalled chaos's 120 s launch timeout.) Variables already set are kept."""
    from ..exits import TIMEOUTS
    half = max(10.0, launch_timeout / 2)
    return {var: f"{half:g}" for var, default, _ in TIMEOUTS.values() if default > half}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _totals(recs: list[dict], kinds: list[str], opts: argparse.Namespace, final: bool) -> dict:
    t = campaign.totals(recs, CAMPAIGN)
    t["command"] = ["mpimig", *sys.argv[1:]]
    t["kinds"] = kinds
    t["seeds_asked"] = opts.seeds
    t["finished"] = final and len(recs) == opts.seeds     # every seed asked for ran
    t["seconds_per_seed"] = round(t["seconds"] / max(1, len(recs)), 1)
    return t


def _write_json(path: Path, t: dict, recs: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"totals": t, "seeds": recs}, indent=1, default=str))
    os.replace(tmp, path)


def register(sub) -> None:
    p = sub.add_parser(
        "chaos", help="random migrations, kills, storms and ballast over many seeds; invariants",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=20, help="how many seeds (default 20)")
    p.add_argument("--seed-base", type=int, default=0, help="first seed (default 0)")
    p.add_argument("-n", "--np", dest="n", type=int, default=4, help="ranks (default 4)")
    p.add_argument("--steps", type=int, default=40, help="checkpoint points per job (default 40)")
    p.add_argument("--msgs", type=int, default=8, help="storm: messages per step per rank (default 8)")
    p.add_argument("--grid", type=int, default=48, help="heat2d: grid size n (default 48)")
    p.add_argument("--work-ms", type=float, default=50.0,
                   help="extra milliseconds per step, so moves and kills land mid-run (default 50)")
    p.add_argument("--migrations", type=int, default=3, help="at most this many moves per seed (default 3)")
    p.add_argument("--kills", type=int, default=2, help="at most this many kills per seed (default 2)")
    p.add_argument("--kinds", default=",".join(KILL_KINDS), metavar="LIST",
                   help="kinds of kill drawn (default: all; host only with the lab)")
    p.add_argument("--ft-share", type=float, default=0.5, metavar="F",
                   help="fraction of seeds run with --ft (online recovery; default 0.5)")
    p.add_argument("--hosts", help="host list for mpimig run (lab hosts h1:2,h2:2); moves are drawn onto "
                                   "them (default: this machine)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds per launch of a job (default 120); a seed gets (kills + 2) x this + 60")
    p.add_argument("--job-root", help="where the job directories go (default mpimig-jobs/chaos)")
    p.add_argument("--keep-dirs", action="store_true", help="keep checkpoints of successful seeds")
    p.add_argument("--stop-on-failure", action="store_true")
    p.add_argument("--json", metavar="FILE", help="write totals and per-seed records here ('-': print them "
                                                  "on stdout instead of the table)")
    p.set_defaults(func=cmd_chaos)
