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

``{job}`` in the program's arguments becomes the job directory. With
``--verify serial`` (the default when the program has ``--out FILE``) the
program is run once more with ``--serial`` (apps/heat2d.py has it) and the
two ``.npy`` results must be equal bit for bit.

Without ``--ft`` (online recovery), a killed rank or coordinator makes Open
MPI end the whole job, and ``--relaunch`` brings it back from the last
committed epoch; a lost host ends the job even with ``--ft``. inject sets
``--relaunch`` to the number of faults + 1 when it is not given.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import events
from ..errors import UsageError
from .hooks import read_progress

KINDS = ("rank", "host", "coordinator", "ckpt-write", "migration-source", "migration-target")
RANDOM_KINDS = ("rank", "ranks", "host", "coordinator", "ckpt-write")
IN_PROCESS = ("ckpt-write", "migration-source", "migration-target")


# ----------------------------------------------------------------------- faults

def parse_fault(spec: str, fid: int) -> dict:
    """``WHAT@WHEN`` -> a fault dict (see the module docstring)."""
    what, _, when = spec.partition("@")
    kind, _, target = what.partition(":")
    f: dict = {"id": fid, "spec": spec}
    if kind in ("rank", "ranks"):
        try:
            f["ranks"] = [int(x) for x in target.replace(",", "+").split("+") if x != ""]
        except ValueError:
            raise UsageError(f"--kill {spec}: rank must be a number (e.g. rank:1@point:20)") from None
        if not f["ranks"]:
            raise UsageError(f"--kill {spec}: which rank? (e.g. rank:1@point:20)")
        f["kind"] = "rank"
        f["target"] = "+".join(map(str, f["ranks"]))
    elif kind == "host":
        if not target:
            raise UsageError(f"--kill {spec}: which host? (e.g. host:h2@point:20)")
        f["kind"], f["target"] = "host", target
    elif kind == "coordinator":
        f["kind"], f["target"] = "coordinator", "coordinator"
    elif kind == "ckpt-write":
        f["kind"], f["ranks"] = "ckpt-write", [int(target or 0)]
        f["target"] = str(f["ranks"][0])
    elif kind in ("migration-source", "migration-target"):
        f["kind"], f["target"] = kind, kind.split("-")[1]
    else:
        raise UsageError(f"--kill {spec}: unknown fault {kind!r}; one of rank, ranks, host, coordinator, "
                         "ckpt-write, migration-source, migration-target")
    wkind, _, wval = when.partition(":")
    if kind in ("migration-source", "migration-target"):
        if when:
            raise UsageError(f"--kill {spec}: a migration fault happens at the migration (no @WHEN)")
        return f
    if kind == "ckpt-write":
        if wkind not in ("", "epoch"):
            raise UsageError(f"--kill {spec}: a checkpoint-write fault takes @epoch:E")
        f["epoch"] = int(wval or 2)
        f["when"] = f"epoch {f['epoch']}"
        return f
    try:
        if wkind in ("point", "step"):
            f["point"] = int(wval)
            f["when"] = f"point {f['point']}"
        elif wkind == "time":
            f["time"] = float(wval)
            f["when"] = f"{f['time']:g} s"
        else:
            raise ValueError
    except ValueError:
        raise UsageError(f"--kill {spec}: say when: @point:P (or @step:P) or @time:S") from None
    return f


def random_schedule(seed: int, k: int, kinds: list[str], n: int, span: int, ckpt_every: int,
                    hosts: list[str]) -> list[dict]:
    """K faults drawn from ``kinds`` at distinct random points (seeded)."""
    rnd = random.Random(f"mpimig-inject-{seed}")
    lo = max(2, ckpt_every + 1)
    hi = max(lo + k, int(span * 0.75))
    points = sorted(rnd.sample(range(lo, hi), k))
    out = []
    used_host = False
    for i, p in enumerate(points):
        kind = rnd.choice([x for x in kinds if not (x == "host" and (used_host or len(hosts) < 2))] or ["rank"])
        if kind == "rank":
            spec = f"rank:{rnd.randrange(n)}@point:{p}"
        elif kind == "ranks":
            rs = sorted(rnd.sample(range(n), min(n, 2)))
            spec = f"ranks:{'+'.join(map(str, rs))}@point:{p}"
        elif kind == "host":
            used_host = True
            spec = f"host:{rnd.choice(hosts)}@point:{p}"
        elif kind == "coordinator":
            spec = f"coordinator@point:{p}"
        elif kind == "ckpt-write":
            spec = f"ckpt-write:{rnd.randrange(n)}@epoch:{max(1, p // max(1, ckpt_every))}"
        else:
            raise UsageError(f"--kinds: {kind!r} cannot be drawn at random; use {', '.join(RANDOM_KINDS)}")
        out.append(parse_fault(spec, i + 1))
    return out


# ------------------------------------------------------------------- the job

def _opt_value(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _replace_opt(args: list[str], name: str, value: str) -> list[str]:
    out = list(args)
    for i, a in enumerate(out):
        if a == name and i + 1 < len(out):
            out[i + 1] = value
            return out
        if a.startswith(name + "="):
            out[i] = f"{name}={value}"
            return out
    return out + [name, value]


def reference(program: str, prog_args: list[str], cache_dir: Path) -> Path:
    """The ``--serial`` result of ``program`` with the same arguments (cached)."""
    key = "_".join(a.replace("/", "_") for a in prog_args if "{job}" not in a)[:150]
    path = cache_dir / f"reference-{Path(program).stem}-{abs(hash(tuple(prog_args))) % 10**8}.npy"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    args = _replace_opt([a for a in prog_args], "--out", str(path))
    res = subprocess.run([sys.executable, program, "--serial", *args], capture_output=True, text=True, timeout=600)
    if res.returncode != 0 or not path.exists():
        raise UsageError(f"--verify serial: {program} --serial failed ({key}): {res.stderr[-500:]}")
    return path


def same_bits(a: Path, b: Path) -> bool:
    import numpy as np
    x, y = np.load(a), np.load(b)
    return x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()


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


def _lab():
    try:
        from .. import lab
        return lab.current()
    except Exception:  # noqa: BLE001 - no lab on this machine
        return None


def run_experiment(args, run_args: list[str], faults: list[dict], job_dir: Path, report_dir: Path,
                   program: str, prog_args: list[str], quiet: bool = False) -> dict:
    """Start the job, inject ``faults``, wait for the end, verify; return the report."""
    for p in (job_dir / "events.jsonl", job_dir / "complete.json", job_dir / "status.json"):
        if p.exists():
            p.unlink()
    if report_dir.exists():
        shutil.rmtree(report_dir)
    report_dir.mkdir(parents=True)
    job_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["MPIMIG_INJECT"] = json.dumps([f for f in faults if f["kind"] in IN_PROCESS
                                       or (f["kind"] == "rank" and "point" in f)])
    env["MPIMIG_INJECT_DIR"] = str(report_dir)
    cmd = [sys.executable, "-m", "mpimig", "run", *run_args]
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, flush=True))
    say(f"mpimig inject: {len(faults)} fault(s): {', '.join(f['spec'] for f in faults) or 'none'}")
    say(f"mpimig inject: job {job_dir}; run output in {report_dir}/run.err")
    out = open(report_dir / "run.out", "w")
    err = open(report_dir / "run.err", "w")
    t_launch = time.time()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
    status = _Status(job_dir)
    samples: list[list] = []
    tail = [0, b""]          # events.jsonl: bytes read, partial last line
    run_id = None
    t_started = None
    fired: dict[int, dict] = {}
    killed_hosts: list[str] = []
    deadline = time.monotonic() + args.experiment_timeout
    last_print = 0.0
    timed_out = False
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                timed_out = True
                break
            new, tail = _read_new(job_dir / events.EVENTS_FILE, tail)
            for ev in new:
                if ev["event"] == "launch":
                    run_id = ev["run_id"]
                if ev["event"] == "started" and t_started is None:
                    t_started = ev["t"]
                if ev["event"] in ("injected", "job_lost", "relaunch", "started", "failure", "recovered",
                                   "finished"):
                    say("  " + describe_event(ev, t_launch))
            pr = read_progress(report_dir)
            if pr and (not samples or samples[-1][:3] != [pr[1], pr[0], pr[2]]):
                samples.append([pr[1], pr[0], pr[2]])
            for f in faults:
                if f["id"] in fired or f["kind"] in IN_PROCESS or (f["kind"] == "rank" and "point" in f):
                    continue
                due = (("point" in f and pr is not None and pr[0] >= f["point"] and pr[2] == run_id)
                       or ("time" in f and t_started is not None and time.time() - t_started >= f["time"]))
                if due:
                    # the time of the fault is taken before the kill: the launcher may log
                    # the job's loss before this event is written
                    t_fire = time.time()
                    rec = _fire(f, status, run_id, pr)
                    if rec is not None:
                        fired[f["id"]] = rec
                        if f["kind"] == "host":
                            killed_hosts.append(f["target"])
                        events.emit(job_dir, "injected", run_id or "", id=f["id"], kind=f["kind"],
                                    target=f["target"], by="injector", t=t_fire, **rec)
            if not quiet and time.monotonic() - last_print > 2.0:
                last_print = time.monotonic()
                if pr is None:
                    pt = "starting"
                elif time.time() - pr[1] > 2.0:
                    pt = f"point {pr[0]}, epoch {pr[3]}: no new point for {time.time() - pr[1]:.0f} s"
                else:
                    pt = f"point {pr[0]}, epoch {pr[3]}"
                say(f"  {time.time() - t_launch:6.1f} s  {pt}")
            time.sleep(0.01)      # polling the job's files against the deadline
    finally:
        if proc.poll() is None:
            from .._proc import kill_session
            kill_session(proc.pid)
        proc.wait()
        out.close()
        err.close()
        lab = _lab()
        for h in killed_hosts:
            if lab is not None:
                from ..lab.hosts import revive
                try:
                    revive(lab, h)
                except Exception as exc:  # noqa: BLE001 - report, do not hide the experiment
                    say(f"mpimig inject: could not revive {h}: {exc}")
    t_end = time.time()
    evs = events.read(job_dir)
    rec = None
    try:
        rec = json.loads((job_dir / "complete.json").read_text())
    except (OSError, ValueError):
        pass
    completed = bool(rec and rec.get("status") == "ok" and proc.returncode == 0)
    verified = None
    ref_path = None
    out_path = _opt_value(prog_args, "--out")
    if args.verify == "serial" and out_path and completed:
        ref_path = reference(program, [a for a in prog_args], Path(args.reference_dir or report_dir.parent))
        verified = Path(out_path).exists() and same_bits(Path(out_path), ref_path)
    elif args.verify == "serial" and out_path:
        verified = False
    report = analyse(evs, faults, samples, t_launch, t_end, completed, verified)
    report.update({"command": cmd, "job_dir": str(job_dir), "report_dir": str(report_dir),
                   "result": out_path, "reference": str(ref_path) if ref_path else None,
                   "timed_out": timed_out, "returncode": proc.returncode})
    (report_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    try:
        timeline_png(report, evs, samples, t_launch, report_dir / "timeline.png")
        report["png"] = str(report_dir / "timeline.png")
    except Exception as exc:  # noqa: BLE001 - the JSON report stands without the picture
        report["png_error"] = f"{type(exc).__name__}: {exc}"
    (report_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _read_new(path: Path, tail: list):
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
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out, [tail[0] + len(data), lines[-1]]


def _fire(f: dict, status: _Status, run_id: str | None, pr) -> dict | None:
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


# ------------------------------------------------------------------ analysis

def restore_of(rec: dict) -> str:
    """Where a recovery restored state from: the kinds other than a survivor's own
    memory copy (e.g. "buddy", "buddy+disk"), else "memory"."""
    kinds = rec.get("restore_kinds")
    if kinds is None:
        kinds = rec.get("restore") or []
        kinds = kinds if isinstance(kinds, list) else [kinds]
    other = sorted({k for k in kinds if k not in ("memory", "none")})
    return "+".join(other) if other else ("memory" if "memory" in kinds else "none")


def describe_event(ev: dict, t0: float) -> str:
    t = ev["t"] - t0
    e = ev["event"]
    if e == "injected":
        return (f"{t:6.1f} s  INJECTED fault {ev.get('id')}: {ev.get('kind')} {ev.get('target')} "
                f"(pids {ev.get('pids')}, point {ev.get('point')})")
    if e == "job_lost":
        return f"{t:6.1f} s  job lost: {ev.get('reason')}"
    if e == "relaunch":
        return f"{t:6.1f} s  relaunch {ev.get('attempt')} from epoch {ev.get('epoch')}" + (
            f", lost hosts {', '.join(ev['lost_hosts'])}" if ev.get("lost_hosts") else "")
    if e == "started":
        return f"{t:6.1f} s  started ({ev.get('role')}) at point {ev.get('point')}, epoch {ev.get('epoch')}"
    if e == "failure":
        return f"{t:6.1f} s  failure seen by {ev.get('by')} at point {ev.get('point')}: {ev.get('error')}"
    if e == "recovered":
        restore = restore_of(ev)
        who = f"ranks {ev.get('failed')}" if ev.get("failed") else ""
        who += (" and " if who else "") + "the coordinator" if ev.get("coordinator_failed") else ""
        return (f"{t:6.1f} s  recovered online ({who or 'nothing lost'}): back at point {ev.get('point')}, "
                f"epoch {ev.get('epoch')}, restore from {restore}, replaced by {ev.get('replaced_by')}")
    if e == "finished":
        return f"{t:6.1f} s  finished: {ev.get('points')} points, epoch {ev.get('epoch')}"
    return f"{t:6.1f} s  {e}"


def analyse(evs: list[dict], faults: list[dict], samples: list[list], t0: float, t1: float,
            completed: bool, verified: bool | None) -> dict:
    """Match each injected fault with the loss, the recovery and the resumption after it."""
    def first(name, after, pred=lambda e: True):
        return next((e for e in evs if e["event"] == name and e["t"] >= after and pred(e)), None)

    rows = []
    injected = sorted((e for e in evs if e["event"] == "injected"), key=lambda e: e["t"])
    by_id: dict[int, list[dict]] = {}
    for e in injected:
        by_id.setdefault(e.get("id"), []).append(e)
    for f in faults:
        inj = by_id.get(f["id"], [])
        row = {"id": f["id"], "spec": f["spec"], "kind": f["kind"], "target": f["target"],
               "fired": bool(inj)}
        if not inj:
            row["survived"] = None
            rows.append(row)
            continue
        ti = min(e["t"] for e in inj)
        run = inj[0]["run_id"]
        row.update({"t_inject": round(ti - t0, 3), "pids": sum((e.get("pids") or [] for e in inj), []),
                    "run_id": run, "tmp_dir_seen": inj[0].get("tmp_dir_seen")})
        lost = first("job_lost", ti)
        rec = first("recovered", ti)
        if rec is not None and (lost is None or rec["t"] < lost["t"]):
            row["path"] = "online"
            # detection: the first process that saw the failure (the recovery's
            # detected_at, else the first ``failure`` event)
            fail = first("failure", ti)
            if rec.get("detected_at"):
                row["detect_s"] = round(rec["detected_at"] - ti, 3)
            else:
                row["detect_s"] = round(fail["t"] - ti, 3) if fail is not None and fail["t"] <= rec["t"] else None
            row["recover_s"] = round(rec["t"] - ti, 3)
            row["restored_point"] = rec.get("point")
            row["epoch"] = rec.get("epoch")
            row["restore"] = restore_of(rec)
            row["failed_point"] = rec.get("failed_point")
            t_rec = rec["t"]
            for k in ("t_detect", "t_shrink", "t_replace", "t_restore"):
                if k in rec:
                    row[k] = rec[k]
        elif lost is not None:
            row["path"] = "relaunch"
            row["detect_s"] = round(lost["t"] - ti, 3)
            row["reason"] = lost.get("reason")
            rl = first("relaunch", lost["t"])
            st = first("started", lost["t"], lambda e: e.get("role") == "restarted") if rl else None
            row["epoch"] = rl.get("epoch") if rl else None
            row["lost_hosts"] = rl.get("lost_hosts") if rl else None
            if st is not None:
                row["recover_s"] = round(st["t"] - ti, 3)
                row["restored_point"] = st.get("point")
                row["restore"] = "disk"
                t_rec = st["t"]
            else:
                t_rec = None
            pts = [s[1] for s in samples if s[2] == run and s[0] <= lost["t"]]
            pts += [e["point"] for e in evs if e["event"] in ("epoch", "injected") and e["run_id"] == run
                    and isinstance(e.get("point"), int) and e["t"] <= lost["t"]]
            row["failed_point"] = max(pts) if pts else None
        else:
            row["path"] = None
            t_rec = None
        if t_rec is not None:
            res = first("resumed", t_rec - 0.001)
            if res is not None:
                row["resume_s"] = round(res["t"] - ti, 3)
        if row.get("failed_point") is not None and row.get("restored_point") is not None:
            row["work_lost_points"] = max(0, row["failed_point"] - row["restored_point"])
        row["survived"] = bool(row.get("resume_s") is not None and completed and verified is not False)
        rows.append(row)
    n_inj = sum(1 for r in rows if r["fired"])
    return {"faults": rows, "injected": n_inj, "survived": sum(1 for r in rows if r.get("survived")),
            "not_fired": sum(1 for r in rows if not r["fired"]),
            "relaunches": sum(1 for e in evs if e["event"] == "relaunch"),
            "online_recoveries": sum(1 for e in evs if e["event"] == "recovered"),
            "completed": completed, "verified": verified, "wall_seconds": round(t1 - t0, 2),
            "ok": completed and verified is not False and all(r.get("survived") for r in rows if r["fired"])}


def format_table(report: dict) -> str:
    head = ("id", "fault", "path", "point", "->", "detect s", "recover s", "resume s", "lost pts", "survived")
    rows = [head]
    for r in report["faults"]:
        fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        rows.append((str(r["id"]), r["spec"], r.get("path") or ("not fired" if not r["fired"] else "?"),
                     fmt(r.get("failed_point")), fmt(r.get("restored_point")), fmt(r.get("detect_s")),
                     fmt(r.get("recover_s")), fmt(r.get("resume_s")), fmt(r.get("work_lost_points")),
                     {True: "yes", False: "NO", None: "-"}[r.get("survived")]))
    w = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    v = {True: "bit-identical to the reference", False: "DIFFERENT from the reference",
         None: "not verified"}[report["verified"]]
    lines.append(f"faults injected {report['injected']}, survived {report['survived']}; job "
                 f"{'completed' if report['completed'] else 'DID NOT COMPLETE'}, result {v}; "
                 f"{report['relaunches']} relaunch(es), {report['online_recoveries']} online recovery(ies); "
                 f"{report['wall_seconds']} s")
    return "\n".join(lines)


def timeline_png(report: dict, evs: list[dict], samples: list[list], t0: float, path: Path) -> None:
    """Checkpoint point over time (per run), epochs, faults and recoveries."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    runs: dict[str, list[list]] = {}
    for s in samples:
        runs.setdefault(s[2], []).append(s)
    for i, (rid, ss) in enumerate(runs.items()):
        ax.plot([s[0] - t0 for s in ss], [s[1] for s in ss], "-", lw=1.5, label=f"run {i + 1} ({rid})")
    ep = [e for e in evs if e["event"] == "epoch"]
    if ep:
        ax.plot([e["t"] - t0 for e in ep], [e["point"] for e in ep], "k.", ms=4, label="committed epoch")
    for r in report["faults"]:
        if not r["fired"]:
            continue
        x = r["t_inject"]
        ax.axvline(x, color="red", lw=1)
        label = r["kind"] if r["target"] == r["kind"] else f"{r['kind']} {r['target']}"
        ax.text(x, ax.get_ylim()[1] * 0.97, f" {label}", color="red", fontsize=7,
                rotation=90, va="top")
        if r.get("resume_s") is not None:
            ax.axvspan(x, x + r["resume_s"], color="red", alpha=0.12)
    for e in evs:
        if e["event"] in ("job_lost", "relaunch"):
            ax.axvline(e["t"] - t0, color="orange", lw=0.8, ls="--")
        if e["event"] == "recovered":
            ax.axvline(e["t"] - t0, color="green", lw=0.8, ls="--")
    ax.set_xlabel("seconds since launch")
    ax.set_ylabel("checkpoint point (rank 0)")
    ok = "survived" if report["ok"] else "NOT survived"
    ax.set_title(f"{report['injected']} fault(s), {report['survived']} survived; result "
                 f"{'bit-identical' if report['verified'] else 'not verified' if report['verified'] is None else 'DIFFERENT'}"
                 f" ({ok})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ seeds

def totals(reports: list[dict]) -> dict:
    rows = [r for rep in reports for r in rep["faults"] if r["fired"]]
    by_kind: dict[str, dict[str, int]] = {}
    for r in rows:
        k = by_kind.setdefault(r["kind"], {"injected": 0, "survived": 0})
        k["injected"] += 1
        k["survived"] += int(bool(r.get("survived")))

    def stat(key):
        xs = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return {"n": len(xs), "mean": round(sum(xs) / len(xs), 3), "max": round(max(xs), 3)} if xs else None

    t = {"jobs": len(reports), "faults_injected": len(rows),
         "faults_survived": sum(1 for r in rows if r.get("survived")),
         "not_fired": sum(rep["not_fired"] for rep in reports),
         "by_kind": by_kind, "jobs_completed": sum(1 for rep in reports if rep["completed"]),
         "jobs_verified": sum(1 for rep in reports if rep["verified"]),
         "relaunches": sum(rep["relaunches"] for rep in reports),
         "online_recoveries": sum(rep["online_recoveries"] for rep in reports),
         "detect_s": stat("detect_s"), "recover_s": stat("recover_s"), "resume_s": stat("resume_s"),
         "work_lost_points": {"total": sum(r.get("work_lost_points") or 0 for r in rows),
                              **(stat("work_lost_points") or {})},
         "failed_seeds": [rep["seed"] for rep in reports if not rep["ok"]],
         "seconds": round(sum(rep["wall_seconds"] for rep in reports), 1)}
    t["ok"] = not t["failed_seeds"] and t["faults_injected"] == t["faults_survived"] and t["faults_injected"] > 0
    return t


def format_totals(t: dict) -> str:
    rows = [("jobs run", t["jobs"]), ("faults injected", t["faults_injected"]),
            ("faults survived", t["faults_survived"])]
    for k, v in sorted(t["by_kind"].items()):
        rows.append((f"  {k}", f"{v['survived']}/{v['injected']} survived"))
    rows += [("faults that never fired", t["not_fired"]), ("jobs completed", t["jobs_completed"]),
             ("results bit-identical", t["jobs_verified"]), ("relaunches", t["relaunches"]),
             ("online recoveries", t["online_recoveries"])]
    for k in ("detect_s", "recover_s", "resume_s"):
        s = t[k]
        rows.append((f"{k[:-2]} time (s)", f"mean {s['mean']}, max {s['max']} (n={s['n']})" if s else "-"))
    wl = t["work_lost_points"]
    rows.append(("work lost (points)", f"total {wl['total']}" + (f", mean {wl['mean']}, max {wl['max']}"
                                                                  if "mean" in wl else "")))
    rows.append(("seconds", t["seconds"]))
    w = max(len(a) for a, _ in rows)
    out = ["totals:"] + [f"  {a:<{w}}  {b}" for a, b in rows]
    if t["failed_seeds"]:
        out.append(f"  failed seeds: {', '.join(map(str, t['failed_seeds']))}")
    out.append("RESULT: " + ("OK: every fault survived, every result bit-identical" if t["ok"] else "FAILED"))
    return "\n".join(out)


def totals_png(reports: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = {"rank": "tab:blue", "host": "tab:red", "coordinator": "tab:green", "ckpt-write": "tab:purple",
              "migration-source": "tab:orange", "migration-target": "tab:brown"}
    seen = set()
    for rep in reports:
        for r in rep["faults"]:
            if r.get("resume_s") is None:
                continue
            lab = r["kind"] if r["kind"] not in seen else None
            seen.add(r["kind"])
            ax.scatter(rep["seed"], r["resume_s"], color=colors.get(r["kind"], "k"), label=lab,
                       marker="o" if r.get("survived") else "x")
    ax.set_xlabel("seed")
    ax.set_ylabel("kill -> resumed computation (s)")
    ax.set_title("mpimig inject: time to resume per fault (x: not survived)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ command

def _span(prog_args: list[str], given: int | None) -> int:
    if given:
        return given
    v = _opt_value(prog_args, "--steps")
    if v is None or not v.isdigit():
        raise UsageError("a random schedule needs to know how many checkpoint points the job runs: "
                         "give --span P (the program has no --steps)")
    return int(v)


def cmd_inject(args) -> int:
    from ..launch.launcher import run_argv
    actions = args._run_actions
    if args.seeds and args.kill:
        raise UsageError("--seeds draws random faults: do not combine it with --kill")
    if args.n < 1:
        raise UsageError("-n must be at least 1")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in RANDOM_KINDS]
    if bad:
        raise UsageError(f"--kinds: unknown {', '.join(bad)}; use {', '.join(RANDOM_KINDS)}")
    hosts = [h.split(":")[0] for h in (args.hosts or "").split(",") if h.strip()]
    if "host" in kinds and (args.seeds or args.seed is not None) and (len(hosts) < 2 or _lab() is None):
        if args.kinds_given:
            raise UsageError("--kinds host needs the lab (mpimig lab up) and at least 2 hosts in --hosts")
        kinds = [k for k in kinds if k != "host"]
    program = str(Path(args.program).resolve()) if args.program.endswith(".py") else args.program
    args.coordinator = True             # status.json: the pids of ranks and coordinator
    base_job = Path(args.job_dir or Path("mpimig-jobs") / f"inject-{Path(args.program).stem}").resolve()
    if args.verify == "auto":
        args.verify = "serial" if _opt_value(args.args, "--out") else "none"

    def one(seed: int | None, faults: list[dict], job_dir: Path, report_dir: Path, quiet: bool) -> dict:
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
        rep = run_experiment(args, run_argv(ns, actions), faults, job_dir, report_dir, program, prog_args,
                             quiet=quiet)
        rep["seed"] = seed
        rep["schedule"] = [f["spec"] for f in faults]
        (report_dir / "report.json").write_text(json.dumps(rep, indent=1, default=str))
        return rep

    if not args.seeds:
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
            if f["kind"].startswith("migration") and not args.migrate:
                raise UsageError(f"--kill {f['spec']}: the job has no migration: add --migrate STEP:RANK:HOST")
        report_dir = Path(args.report).resolve() if args.report else base_job / "inject"
        rep = one(args.seed, faults, base_job, report_dir, quiet=False)
        print(format_table(rep), flush=True)
        print(f"mpimig inject: report {report_dir / 'report.json'}"
              + (f", timeline {rep['png']}" if rep.get("png") else f" (no PNG: {rep.get('png_error')})"))
        return 0 if rep["ok"] else 1

    root = Path(args.report).resolve() if args.report else base_job
    root.mkdir(parents=True, exist_ok=True)
    span = _span(args.args, args.span)
    print(f"mpimig inject: {args.seeds} seeds from {args.first_seed}, {args.random} fault(s) per job of "
          f"{', '.join(kinds)}; {args.n} ranks{' on ' + args.hosts if args.hosts else ''}; "
          f"{'online recovery (--ft)' if args.ft else 'relaunch'}; reports in {root}", flush=True)
    reports = []
    try:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            faults = random_schedule(seed, args.random, kinds, args.n, span, args.ckpt_every, hosts)
            job_dir = root / f"seed-{seed}"
            rep = one(seed, faults, job_dir, job_dir / "inject", quiet=True)
            reports.append(rep)
            parts = []
            for r in rep["faults"]:
                parts.append(f"{r['spec']} -> " + (
                    f"{r.get('path')} resumed {r['resume_s']:.2f} s lost {r.get('work_lost_points')} pts"
                    if r.get("resume_s") is not None else ("not fired" if not r["fired"] else "NOT RECOVERED")))
            v = {True: "bit-identical", False: "DIFFERENT", None: "unverified"}[rep["verified"]]
            print(f"seed {seed:4d}  {'ok  ' if rep['ok'] else 'FAIL'}  {'; '.join(parts)}  result {v}  "
                  f"{rep['wall_seconds']:.1f} s", flush=True)
            if not rep["ok"]:
                print(f"      report {rep['report_dir']}/report.json, output {rep['report_dir']}/run.err", flush=True)
    except KeyboardInterrupt:
        print("mpimig inject: interrupted", file=sys.stderr)
    t = totals(reports)
    t["command"] = sys.argv
    t["seeds_run"] = [r["seed"] for r in reports]
    path = Path(args.json).resolve() if args.json else root / "inject-totals.json"
    path.write_text(json.dumps({"totals": t, "jobs": reports}, indent=1, default=str))
    try:
        totals_png(reports, root / "inject-totals.png")
        png = root / "inject-totals.png"
    except Exception as exc:  # noqa: BLE001
        png = f"(no PNG: {exc})"
    print(format_totals(t), flush=True)
    print(f"mpimig inject: totals {path}, plot {png}", flush=True)
    return 0 if t["ok"] and len(reports) == args.seeds else 1


def register(sub) -> None:
    from ..launch.launcher import add_run_arguments
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
                   help="serial: compare the program's --out with its --serial run, bit for bit "
                        "(auto: serial when the program has --out)")
    g.add_argument("--reference-dir", help="where --serial references are kept (default: next to the reports)")
    g.add_argument("--report", metavar="DIR", help="report directory (default JOB_DIR/inject; with --seeds "
                                                   "the root of one job directory per seed)")
    g.add_argument("--json", help="with --seeds: the totals JSON (default ROOT/inject-totals.json)")
    g.add_argument("--experiment-timeout", type=float, default=900.0, metavar="S",
                   help="give up on a job after S seconds (900); each launch gets half unless --timeout")
    actions = add_run_arguments(p)
    p.set_defaults(func=_dispatch, _run_actions=actions)


def _dispatch(args) -> int:
    args.kinds_given = args.kinds is not None
    if args.kinds is None:
        args.kinds = "rank,ranks,coordinator,ckpt-write,host"
    return cmd_inject(args)
