"""``mpimig bench balance``: does the balancer pay? Each policy against ``none`` on the lab.

Runs on the multi-host lab (``mpimig lab``, root; brought up with 3 hosts if
none is up, and taken down again at the end if this command brought it up).

Scenario *slowed*: one of three hosts is slowed (``mpimig lab slow HOST 0.5``:
half of its fair share of the machine's cores). Each app (``drift``: a hot
region drifting across the ranks; ``heat2d`` with ``--cpu-work``: even work)
runs 6 ranks, 2 per host, under every policy, the policies alternating in one
run (the order rotates each ``--repeat`` round). Scenario *balanced*: no host
slowed; each policy must know when not to move (goal: none slower than
``none`` by more than 3%).

Layout: ``--hosts A:3,SLOW:2,B:4 -n 6 --spares 2``: the coordinator and ranks
0-1 on A, ranks 2-3 on the slowed host, ranks 4-5 and two warm spares on B
(Open MPI spawns onto another lab host are unreliable, PLATFORM.md: moves go
to warm spares; elsewhere the runtime spawns). Every run uses ``--policy``
(``none`` meters and never moves), so the metering cost is the same for all.

Per run, from the job's own records: time to solution (``events.jsonl``: from
the ranks' ``started`` to the job's ``finished``; also the whole command's wall
time, launch included, as ``command_s`` in the JSON), moves made (completed
migrations with origin ``policy``), bytes moved and total downtime (sum over
the moves of ``status.json``'s ``timings``), and whether the result is bit
for bit the app's ``--serial`` reference (printed for every run; a run that
differs or fails counts as failed). While a job runs, ``status.json`` is read
every ``--sample`` seconds for the load per host (the balancer's ``load_s``:
seconds of compute per safe point of the ranks on the host), drawn in the PNG
with the moves marked.

Uneven state (``--drift-ballast RANK:MIB[,...]``, drift only): the named ranks
register that much extra state (drift's ``--ballast``: a byte pattern of the
rank, never computed on, checked byte for byte at the end of the run), so a
policy's bytes moved depend on which ranks it moves, not only on how many: the
setting in which multi-factor's space term can show. Without it every rank's
state is its block of the field (``8 x drift-n / 6`` bytes) and bytes moved are
moves x state for every policy.

Ratios: speedup = median time of ``none`` / median time of the policy, in the
same scenario and app. Goals (issue 12): the best policy >= 1.3x with one of
three hosts at half speed; multi-factor at least as fast as greedy and refine
and fewer bytes moved; on the balanced run no policy below 0.97x.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import apps
from ..errors import UsageError
from .. import pycmd

POLICIES = ["none", "greedy", "refine", "comm-aware", "multi-factor"]
APPS = ["drift", "heat2d"]
RANKS_PER_HOST = 2
SPARES = 2


# -- what each app runs -------------------------------------------------------------------
def app_args(app: str, args: argparse.Namespace) -> list[str]:
    """The program's arguments (without --out): sized by --steps and --work."""
    w = args.work
    if app == "drift":
        return ["--n", str(args.drift_n), "--steps", str(args.steps), "--hot-cost", str(round(args.drift_hot * w)),
                "--cold-cost", str(round(args.drift_cold * w)),
                *(["--ballast", args.drift_ballast] if getattr(args, "drift_ballast", "") else []),
                *(["--hot-start", repr(args.drift_hot_start)] if getattr(args, "drift_hot_start", 0.0) else []),
                *(["--drift", repr(args.drift_speed)] if getattr(args, "drift_speed", None) is not None else [])]
    if app == "heat2d":
        return ["--n", str(args.heat_n), "--steps", str(args.steps), "--cpu-work", str(round(60 * w))]
    raise UsageError(f"unknown app {app!r}: choose from {', '.join(APPS)}")


def reference(app: str, args: argparse.Namespace, root: Path) -> bytes:
    """The app's --serial result (bytes of the .npy), computed once per app."""
    import numpy as np
    out = root / f"ref-{app}.npy"
    if not out.exists():
        cmd = [*pycmd.module(f"mpimig.apps.{app}"), "--serial", *app_args(app, args), "--out", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if not out.exists():
            raise UsageError(f"the serial reference of {app} failed: {res.stderr[-1500:]}")
    return np.load(out).tobytes()


def layout(hosts: list[str], slow: str) -> str:
    """``A:3,SLOW:2,B:4``: coordinator + 2 ranks on A, 2 ranks on SLOW, 2 ranks + spares on B."""
    a, b = [h for h in hosts if h != slow][:2]
    return f"{a}:{RANKS_PER_HOST + 1},{slow}:{RANKS_PER_HOST},{b}:{RANKS_PER_HOST + SPARES}"


# -- one job --------------------------------------------------------------------------------
# Open MPI 5.0.11's PRRTE loses a job now and then when a move spawns a process onto a lab
# host (PLATFORM.md, "Spawn onto another host"; openpmix/prrte#1243). Such runs are run again
# (--retries) and counted in the table's "lost" column.
PRRTE_LOSS = ("lost communication with a remote daemon", "PMIX ERROR", "PMIX_ERR_")


def lost_to_prrte(rec: dict) -> bool:
    """The job was lost with PRRTE's signature, or while a move was starting a process (a spawn)."""
    if "time_s" in rec:
        return False
    spawning = any(m.get("state") == "creation" or "could not start a process" in str(m.get("state"))
                   for m in rec.get("migrations_at_loss", []))
    return spawning or any(sig in rec.get("error", "") for sig in PRRTE_LOSS)


def run_job(app: str, policy: str, scenario: str, i: int, args: argparse.Namespace, hosts_spec: str,
            root: Path, ref: bytes, attempt: int = 0) -> dict:
    """One ``mpimig run`` of ``app`` under ``policy``; its record (see the module docstring)."""
    import numpy as np
    job = root / f"{scenario}-{app}-{policy}-{i}-{attempt}"
    out = job / "out.npy"
    n = RANKS_PER_HOST * 3
    cmd = [*pycmd.module("mpimig"), "run", "-n", str(n), "--hosts", hosts_spec, "--spares", str(SPARES),
           "--policy", policy_spec(policy, args), "--metrics-seconds", str(args.metrics_seconds),
           "--balance-seconds", str(args.balance_seconds), "--restart", "never",
           *(["--cost-json", str(Path(args.cost_json).resolve())] if args.cost_json else []),
           "--timeout", str(args.timeout), "--job-dir", str(job), str(apps.path(app)),
           *app_args(app, args), "--out", str(out)]
    from ..lab.slow import job_env
    env = job_env(os.environ)
    rec: dict[str, Any] = {"scenario": scenario, "app": app, "policy": policy, "i": i, "hosts": hosts_spec,
                           "job_dir": str(job), "load": [], "ok": False}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        rec["load"] = sample_loads(proc, job, args.sample, t0)
        stdout, stderr = proc.communicate(timeout=args.timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    rec["command_s"] = time.time() - t0
    rec["loadavg"] = os.getloadavg()[0]
    try:
        complete = json.loads((job / "complete.json").read_text())
        status = json.loads((job / "status.json").read_text())
    except (OSError, ValueError) as exc:
        rec["error"] = f"job did not complete ({exc.__class__.__name__}): {(stdout + stderr)[-1500:]}"
        with contextlib.suppress(OSError, ValueError):
            rec["migrations_at_loss"] = [
                {"rank": m["rank"], "to": m["to"], "state": m["state"]}
                for m in json.loads((job / "status.json").read_text()).get("migrations", [])]
        return rec
    span = job_span(job)
    if span is None:
        rec["error"] = f"no 'started'/'finished' events in {job / 'events.jsonl'}"
        return rec
    rec["time_s"] = span
    rec["bit_identical"] = out.exists() and np.load(out).tobytes() == ref
    done = [m for m in status.get("migrations", []) if m.get("state") == "done"]
    rec["moves"] = sum(1 for m in done if m.get("origin") == "policy")
    rec["moves_all"] = len(done)
    rec["bytes"] = sum(int(m["timings"].get("bytes", 0)) for m in done)
    rec["downtime_s"] = sum(float(m["timings"].get("downtime") or 0.0) for m in done)
    rec["move_list"] = [{"rank": m["rank"], "from": m.get("from"), "to": m["to"], "origin": m.get("origin"),
                         "strategy": m.get("strategy"), "downtime": m["timings"].get("downtime"),
                         "bytes": m["timings"].get("bytes")} for m in done]
    rec["move_times"] = move_times(job, t0)
    rec["speed"] = measured_speed(rec["load"])
    rec["ok"] = complete.get("status") == "ok" and rec["bit_identical"]
    if not args.keep:
        shutil.rmtree(job, ignore_errors=True)
    return rec


def policy_spec(policy: str, args: argparse.Namespace) -> str:
    extra = (args.policy_args or {}).get(policy)
    return f"{policy}:{extra}" if extra else policy


def sample_loads(proc: subprocess.Popen, job: Path, every: float, t0: float) -> list[dict]:
    """Load per host (seconds of compute per point, the balancer's ``load_s``) while the job runs."""
    samples = []
    while proc.poll() is None:
        try:
            st = json.loads((job / "status.json").read_text())
        except (OSError, ValueError):
            st = None
        bal = (st or {}).get("balance") or {}
        if bal.get("hosts"):
            samples.append({"t": time.time() - t0,
                            "hosts": {h: x.get("load_s", 0.0) for h, x in bal["hosts"].items()},
                            "ranks": {h: x.get("ranks", 0) for h, x in bal["hosts"].items()},
                            "speed": {h: x.get("speed", 1.0) for h, x in bal["hosts"].items()},
                            # how far the ranks are, as the balancer last heard (a snapshot that does not move
                            # while the job runs shows reports not arriving)
                            "points": {str(r["rank"]): r.get("points", 0) for r in bal.get("ranks", [])},
                            "report_age_s": {str(r["rank"]): r.get("report_age_s") for r in bal.get("ranks", [])},
                            "rounds": bal.get("rounds")})
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=every)
    return samples


def job_span(job: Path) -> float | None:
    """Seconds from the job's first ``started`` event to its ``finished`` event (events.jsonl).

    Not ``complete.json``'s ``wall_seconds``: that is the clock of the process that writes
    it (rank 0's), which restarts when rank 0 is moved."""
    started = finished = None
    try:
        lines = (job / "events.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "started" and started is None:
            started = ev["t"]
        elif ev.get("event") == "finished":
            finished = ev["t"]
    return finished - started if started is not None and finished is not None else None


def measured_speed(samples: list[dict]) -> dict[str, float]:
    """Median CPU share per rank on each host over the run (the balancer's ``speed``): shows
    whether the slowed host really was slower (on a loaded machine a quota may not bind)."""
    hosts = {h for smp in samples for h in smp.get("speed", {})}
    return {h: statistics.median([smp["speed"][h] for smp in samples if h in smp.get("speed", {})])
            for h in sorted(hosts)}


def move_times(job: Path, t0: float) -> list[dict]:
    """Completed migrations from ``events.jsonl``: seconds since the command started, rank, host."""
    out: list[dict] = []
    try:
        lines = (job / "events.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "migrated":
            out.append({"t": ev["t"] - t0, "rank": ev.get("rank"), "to": ev.get("to")})
    return out


# -- the runs -------------------------------------------------------------------------------
def rotate(items: list[str], k: int) -> list[str]:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def run_scenario(scenario: str, lab, args: argparse.Namespace, root: Path, app_list: list[str]) -> list[dict]:
    from ..lab import slow as lab_slow
    slow_host = args.slow_host or lab.hosts[1]
    spec = layout(lab.hosts[:3], slow_host)
    rows = []
    if scenario == "slowed":
        info = lab_slow.slow(lab, slow_host, args.factor)
        print(lab_slow.describe(slow_host, info, lab), flush=True)
    try:
        refs = {app: reference(app, args, root) for app in app_list}
        for i in range(args.repeat):
            for policy in rotate(args.policies, i):
                for app in app_list:
                    for attempt in range(args.retries + 1):
                        r = run_job(app, policy, scenario, i, args, spec, root, refs[app], attempt)
                        r["lost"] = attempt
                        if not lost_to_prrte(r) or attempt == args.retries:
                            break
                        print(f"  {scenario:<8} {app:<6} {policy:<12} #{i}: lost to PRRTE's spawn crash "
                              "(openpmix/prrte#1243); running it again", flush=True)
                    rows.append(r)
                    print("  " + one_line(r), flush=True)
    finally:
        if scenario == "slowed":
            lab_slow.slow(lab, slow_host, 1.0)
    return rows


def one_line(r: dict) -> str:
    head = f"{r['scenario']:<8} {r['app']:<6} {r['policy']:<12} #{r['i']}"
    if "time_s" not in r:
        return f"{head}: FAILED {r.get('error', '')[:300]}"
    speed = " ".join(f"{h}={v:.2f}" for h, v in r.get("speed", {}).items())
    return (f"{head}: {r['time_s']:7.2f} s, {r['moves']} moves, {r['bytes'] / 2**20:.2f} MiB, "
            f"downtime {r['downtime_s']:.2f} s, result "
            f"{'bit-identical' if r['bit_identical'] else 'DIFFERS from the reference'} (load avg {r['loadavg']:.1f}; "
            f"CPU share per rank {speed or '-'})")


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (scenario, app, policy): medians and the speedup over none."""
    out = []
    keys = sorted({(r["scenario"], r["app"]) for r in rows}, key=lambda k: (k[0] != "slowed", k[1]))
    for scen, app in keys:
        mine = [r for r in rows if r["scenario"] == scen and r["app"] == app]
        base = _median([r["time_s"] for r in mine if r["policy"] == "none" and r["ok"]])
        for pol in dict.fromkeys(r["policy"] for r in mine):
            rs = [r for r in mine if r["policy"] == pol]
            good = [r for r in rs if r["ok"]]
            t = _median([r["time_s"] for r in good])
            out.append({"scenario": scen, "app": app, "policy": pol, "runs": len(rs), "ok": len(good),
                        "lost": sum(r.get("lost", 0) for r in rs),
                        "time_s": t, "speedup": (base / t) if base and t else None,
                        "moves": _median([r["moves"] for r in good]),
                        "bytes": _median([r["bytes"] for r in good]),
                        "downtime_s": _median([r["downtime_s"] for r in good]),
                        # of the runs that produced a result (a failed run has none to compare)
                        "bit_identical": (all(r.get("bit_identical") for r in rs if "time_s" in r)
                                          if any("time_s" in r for r in rs) else None)})
    return out


def _median(xs: list) -> Any:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table(summary: list[dict]) -> str:
    lines = [f"{'scenario':<9} {'app':<7} {'policy':<13} {'ok':>5} {'lost':>4} {'time s':>8} {'vs none':>8} "
             f"{'moves':>6} {'MiB moved':>10} {'downtime s':>11} bit-identical"]
    for s in summary:
        def f(v, fmt, width):
            return format(v, fmt) if v is not None else "-".rjust(width)
        mib = None if s["bytes"] is None else s["bytes"] / 2**20
        lines.append(f"{s['scenario']:<9} {s['app']:<7} {s['policy']:<13} {s['ok']:>2}/{s['runs']:<2} {s['lost']:>4} "
                     f"{f(s['time_s'], '8.2f', 8)} {f(s['speedup'], '7.2f', 7)}x {f(s['moves'], '6g', 6)} "
                     f"{f(mib, '10.2f', 10)} {f(s['downtime_s'], '11.2f', 11)} "
                     f"{'-' if s['bit_identical'] is None else 'yes' if s['bit_identical'] else 'NO'}")
    return "\n".join(lines)


def goals(summary: list[dict]) -> list[str]:
    """The issue's goals, each judged on this run's figures."""
    out = []
    for app in dict.fromkeys(s["app"] for s in summary):
        slowed = {s["policy"]: s for s in summary if s["scenario"] == "slowed" and s["app"] == app}
        balanced = {s["policy"]: s for s in summary if s["scenario"] == "balanced" and s["app"] == app}
        others = {p: s for p, s in slowed.items() if p != "none" and s["speedup"]}
        if others:
            best = max(others.values(), key=lambda s: s["speedup"])
            line = (f"{app}, one host slowed: best {best['policy']} {best['speedup']:.2f}x vs none "
                    f"(goal >= 1.3x): {'met' if best['speedup'] >= 1.3 else 'NOT met'}")
            # the balanced run is the same job without the quota: no placement of the slowed one beats
            # it, so a slowed run that does measured the machine's spread, not the policy (run 11b)
            floor = balanced.get("none", {}).get("time_s")
            if floor and best["time_s"] < floor:
                line += (f", NOT credible: {best['time_s']:.2f} s is faster than the balanced run's none "
                         f"({floor:.2f} s), which no placement can beat (the machine's spread)")
            out.append(line)
        mf = slowed.get("multi-factor")
        if mf and mf["time_s"]:
            for rival in ("greedy", "refine"):
                r = slowed.get(rival)
                if r and r["time_s"]:
                    fast = mf["time_s"] <= r["time_s"]
                    fewer = (mf["bytes"] or 0) < (r["bytes"] or 0)
                    out.append(f"{app}: multi-factor vs {rival}: time {mf['time_s']:.2f} vs {r['time_s']:.2f} s "
                               f"({'as fast or faster' if fast else 'SLOWER'}), bytes {mf['bytes'] or 0} vs "
                               f"{r['bytes'] or 0} ({'fewer' if fewer else 'NOT fewer'})")
        for p, s in balanced.items():
            if p != "none" and s["speedup"]:
                out.append(f"{app}, balanced: {p} {s['speedup']:.3f}x vs none (goal >= 0.97x): "
                           f"{'met' if s['speedup'] >= 0.97 else 'NOT met'}")
    return out


# -- the plot -------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path) -> None:
    """Load per host over time for every run of the slowed scenario (one panel each), moves marked."""
    from .._plots import import_pyplot
    plt = import_pyplot("mpimig bench balance --png")
    runs = [r for r in rows if r["scenario"] == "slowed" and r.get("load")] or [r for r in rows if r.get("load")]
    runs.sort(key=lambda r: "time_s" not in r)       # a completed run of each (app, policy) if there is one
    if not runs:
        return
    cols = len(dict.fromkeys(r["policy"] for r in runs))
    apps_ = list(dict.fromkeys(r["app"] for r in runs))
    fig, axes = plt.subplots(len(apps_), cols, figsize=(3.6 * cols, 2.8 * len(apps_)), squeeze=False,
                             sharex="row")
    seen: set = set()
    for r in runs:
        key = (r["app"], r["policy"])
        if key in seen:            # the first repeat of each (app, policy)
            continue
        seen.add(key)
        ax = axes[apps_.index(r["app"])][list(dict.fromkeys(x["policy"] for x in runs)).index(r["policy"])]
        hosts = sorted({h for s in r["load"] for h in s["hosts"]})
        for h in hosts:
            ax.plot([s["t"] for s in r["load"]], [s["hosts"].get(h, 0.0) for s in r["load"]], label=h)
        # the first point of each rank includes its start-up: keep that spike from flattening the rest
        values = sorted(v for s in r["load"] for v in s["hosts"].values())
        if values:
            ax.set_ylim(0, 1.5 * values[int(0.95 * (len(values) - 1))] or None)
        for m in r.get("move_times", []):
            ax.axvline(m["t"], color="k", lw=0.8, ls="--")
            ax.annotate(f"r{m['rank']}\u2192{m['to']}", (m["t"], ax.get_ylim()[1]), fontsize=6, rotation=90,
                        va="top", ha="right")
        took = f"{r['time_s']:.1f} s" if "time_s" in r else "did not complete"
        ax.set_title(f"{r['app']} / {r['policy']}: {took}", fontsize=8)
        ax.set_xlabel("s since launch", fontsize=7)
        ax.set_ylabel("load (compute s per point)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the command ----------------------------------------------------------------------------
def parse_policy_args(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, kv = item.partition(":")
        if not sep or not kv:
            raise UsageError(f"--policy-arg {item!r}: expected NAME:k=v[,k=v]")
        out[name] = kv
    return out


def check_args(args) -> list[str]:
    """Normalise the policies (none first), check the factor; the apps of the slowed scenario."""
    args.policy_args = parse_policy_args(args.policy_arg)
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if "none" not in args.policies:
        args.policies.insert(0, "none")
    app_list = [a.strip() for a in args.apps.split(",") if a.strip()]
    for a in app_list + [a for a in args.balanced_apps.split(",") if a]:
        if a not in APPS:
            raise UsageError(f"unknown app {a!r} (choose from {', '.join(APPS)})")
    if not 0 < args.factor < 1:
        raise UsageError("--factor must be in (0, 1)")
    return app_list


def get_lab(args):
    """The lab that is up, or one brought up now (3 hosts); and whether this command brought it up."""
    from .. import lab as mlab
    problem = mlab.capability_problem()
    if problem:
        raise UsageError(f"mpimig bench balance runs on the lab: {problem}")
    lab = mlab.current()
    brought_up = lab is None
    if lab is None:
        print("bringing the lab up (3 hosts); it goes down again at the end", flush=True)
        lab = mlab.up(3)
    problem = None
    if len(lab.hosts) < 3:
        problem = f"mpimig bench balance needs 3 lab hosts; the lab has {len(lab.hosts)}"
    elif args.slow_host and args.slow_host not in lab.hosts[:3]:
        problem = f"--slow-host {args.slow_host}: not one of {', '.join(lab.hosts[:3])}"
    if problem:
        if brought_up:
            mlab.down()
        raise UsageError(problem)
    return lab, brought_up


#: the lock a test session's lab fixtures hold for the whole session (tests/lab_fixtures.py SESSION_LOCK)
TEST_SESSION_LOCK = Path("/run/mpimig-lab.tests.lock")


@contextlib.contextmanager
def no_test_session(wait_s: float = 900.0, lock: Path = TEST_SESSION_LOCK):
    """Hold the test sessions' lab lock while the benchmark runs: a test session brings its own lab
    up and takes it down at its end, so a benchmark that used it would lose its hosts mid-run (the
    run 8b balanced command did). Waits up to ``wait_s`` for a test session to end."""
    from ..lab._sys import locked
    with locked(lock, wait_s, nap=2.0, waiting=f"waiting for the test session that holds {lock} (it uses the lab)",
                too_long=lambda: UsageError(f"a test session has held {lock} (its lab) for {wait_s:.0f} s; try later")):
        yield


def cmd_balance(args) -> int:
    app_list = check_args(args)
    with no_test_session():
        return _cmd_balance(args, app_list)


def _cmd_balance(args, app_list: list[str]) -> int:
    from .. import lab as mlab
    lab, brought_up = get_lab(args)
    root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mpimig-bench-balance-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        print(f"bench balance: apps {', '.join(app_list)}; policies {', '.join(args.policies)}; "
              f"{args.steps} steps, work x{args.work}; {args.repeat} round(s); load avg {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores", flush=True)
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:
            print(f"note: the machine is loaded (load avg {load:.1f} on {cores} cores): every process gets about "
                  f"{cores / load:.2f} core, so a quota of {args.factor} x the fair share may not bind; the CPU "
                  "share per rank printed for each run shows whether the slowed host was slower (lower --factor)",
                  flush=True)
        rows += run_scenario("slowed", lab, args, root, app_list)
        if not args.no_balanced:
            rows += run_scenario("balanced", lab, args, root, [a for a in args.balanced_apps.split(",") if a])
    finally:
        if brought_up:
            mlab.down()
        if not args.keep and not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    summary = summarise(rows)
    print()
    print(table(summary))
    for g in goals(summary):
        print(g)
    bad = [r for r in rows if not r["ok"]]
    done = [r for r in rows if "time_s" in r]
    print(f"results bit-identical to the --serial reference in {sum(1 for r in done if r['bit_identical'])} "
          f"of {len(done)} completed runs; {len(rows) - len(done)} of {len(rows)} runs did not complete "
          f"(after {sum(r.get('lost', 0) for r in rows)} rerun(s) of runs lost to the spawn crash)")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": rows, "goals": goals(summary),
                                               "argv": sys.argv}, indent=1))
        print(f"JSON: {args.json}")
    if args.png:
        plot(rows, Path(args.png))
        print(f"PNG: {args.png}")
    return 0 if not bad else 1


def register(bench_sub) -> None:
    p = bench_sub.add_parser("balance", help="each policy against none on the lab, one host slowed",
                             description=__doc__.split("\n\n")[0] + " See the module docstring: "
                             "mpimig/bench/balance.py.")
    p.add_argument("--apps", default=",".join(APPS), help=f"apps of the slowed scenario (default {','.join(APPS)})")
    p.add_argument("--balanced-apps", default="heat2d", help="apps of the balanced scenario (default heat2d)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"policies, none always included (default {','.join(POLICIES)})")
    p.add_argument("--cost-json", metavar="FILE", default="",
                   help="seed every run's cost model (mpimig run --cost-json): `mpimig bench migrate --json` "
                        "or an earlier `mpimig bench balance --json` (its moves' downtimes)")
    p.add_argument("--policy-arg", action="append", metavar="NAME:k=v[,k=v]",
                   help="parameters for one policy (repeatable), e.g. multi-factor:w_space=2")
    p.add_argument("--slow-host", help="the host to slow (default the lab's second host)")
    p.add_argument("--factor", type=float, default=0.5, help="its CPU factor (default 0.5: half speed)")
    p.add_argument("--steps", type=int, default=150, help="steps per run (default 150)")
    p.add_argument("--work", type=float, default=1.0,
                   help="scales the CPU work per step (drift --hot-cost/--cold-cost, heat2d --cpu-work)")
    p.add_argument("--drift-n", type=int, default=120000, help="drift's cells (default 120000)")
    p.add_argument("--drift-hot", type=int, default=40,
                   help="drift's --hot-cost before --work (default 40; runs 1-4 used 60 with --drift-cold 15)")
    p.add_argument("--drift-cold", type=int, default=20,
                   help="drift's --cold-cost before --work (default 20: the hot region costs 2x per cell)")
    p.add_argument("--drift-hot-start", type=float, default=0.0, metavar="FRAC",
                   help="drift's --hot-start: where its hot region starts, as a fraction of the domain (default 0)")
    p.add_argument("--drift-speed", type=float, default=None, metavar="CELLS",
                   help="drift's --drift: cells its hot region moves per step, to the left when negative "
                        "(default: once across the domain per run)")
    p.add_argument("--drift-ballast", default="", metavar="RANK:MIB[,...]",
                   help="drift's --ballast: extra registered state on these ranks, never computed on, so that "
                        "ranks' state sizes differ and bytes moved depend on which rank moves (default none)")
    p.add_argument("--heat-n", type=int, default=384, help="heat2d's grid side (default 384)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all policies (default 1)")
    p.add_argument("--no-balanced", action="store_true", help="skip the balanced scenario")
    p.add_argument("--metrics-seconds", type=float, default=0.5, help="the ranks' report interval (default 0.5)")
    p.add_argument("--balance-seconds", type=float, default=1.0, help="the balancer's interval (default 1)")
    p.add_argument("--sample", type=float, default=0.5, help="read status.json this often for the plot")
    p.add_argument("--timeout", type=float, default=600, help="per run (default 600 s)")
    p.add_argument("--retries", type=int, default=2,
                   help="run a job lost to PRRTE's spawn crash again, at most this often (default 2)")
    p.add_argument("--work-dir", help="keep the job directories here")
    p.add_argument("--keep", action="store_true", help="keep the job directories")
    p.add_argument("--json", metavar="FILE", help="write the runs and the summary as JSON")
    p.add_argument("--png", metavar="FILE", help="draw load per host over time with the moves marked")
    p.set_defaults(func=cmd_balance)
