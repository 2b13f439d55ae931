"""The real side of ``mpimig simulate --validate`` (:mod:`mpimig.sim.validate`): the scenario's
plan on the lab (hosts, ranks, the slowed host, spares), its calibration and validation runs
(``mpimig inject`` on the lab, with their moves and kills) and what is read from a run's files.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .. import pycmd

WARMUP_POINTS = 3          # a rank's first points include its start-up: not calibrated from
SETTLE_POINTS = 3          # points after a move before its host's speeds count again


class ValidationError(UsageError):
    """The scenario cannot be validated as written, or a real run did not give what is needed."""


def plan(cfg) -> dict:
    """What the real runs do, from the scenario: hosts spec, moves, kill, the calibration's events."""
    c, j, lab = cfg.values["cluster"], cfg.values["jobs"], cfg.values["lab"]
    hosts = [f"h{i}" for i in range(1, c["hosts"] + 1)]
    if j["count"] != 1 or j["hosts_per_job"] != c["hosts"] or j["extra_hosts"]:
        raise ValidationError("a validation scenario has one job on every host (jobs.count = 1, "
                              "jobs.hosts_per_job = cluster.hosts, jobs.extra_hosts = 0)")
    if j["ranks"] % c["hosts"]:
        raise ValidationError(f"jobs.ranks {j['ranks']} must be a multiple of cluster.hosts {c['hosts']}")
    if len(c["slow_hosts"]) != 1 or c["slow_hosts"][0] in (hosts[0], hosts[-1]):
        raise ValidationError("a validation scenario slows exactly one host, not the first (the coordinator's) "
                              f"nor the last (the spares'): cluster.slow_hosts = {c['slow_hosts']}")
    per = j["ranks"] // c["hosts"]
    slots = {h: per for h in hosts}
    slots[hosts[0]] += 1
    slots[hosts[-1]] += lab["spares"]
    k = lab["spares_per_host"]
    if lab["valid_runs"] not in (1, 2):
        raise ValidationError(f"lab.valid_runs {lab['valid_runs']}: 1, or 2 (one after the other)")
    if lab["calib_runs"] not in (1, 2):
        raise ValidationError(f"lab.calib_runs {lab['calib_runs']}: 1, or 2 (one before and one after the "
                              "validation run)")
    moves, kills = scenario_events(cfg, hosts, per, k)
    if not kills or not moves:
        raise ValidationError("a validation scenario has at least one killed rank and at least one move "
                              f"(found {len(kills)} kills, {len(moves)} moves)")
    check_spares(moves, kills, hosts, lab, "", per)
    cal_move, cal_kill = parse_calib(lab["calib_move"], lab["calib_kill"], lab["calib_points"], j["ranks"])
    slow = c["slow_hosts"][0]
    if rank_host(cal_move[1], per, hosts) != slow or cal_move[2] != hosts[-1]:
        raise ValidationError(f"lab.calib_move {lab['calib_move']!r}: the calibration moves a rank of the slowed host "
                              f"{slow} to {hosts[-1]}")
    if not cal_move[0] + 2 * cfg.values["jobs"]["ckpt_every"] <= cal_kill[0]:
        raise ValidationError("lab.calib_kill: at least two checkpoint intervals after lab.calib_move (the "
                              "calibration measures the speeds in between)")
    more_moves, more_kills = parse_more(lab, cal_move[0] + 2 * j["ckpt_every"], cal_kill[0], j["ranks"])
    on = {r: rank_host(r, per, hosts) for r in range(j["ranks"])}
    for p, r, h in sorted([cal_move, *more_moves]):
        move_target(f"lab.calib_more_moves '{p}:{r}:{h}'", r, h, on, hosts, k)
    check_spares([cal_move, *more_moves], [cal_kill, *more_kills], hosts, lab, "the calibration's ", per)
    for r in (*(k[1] for k in kills), cal_kill[1], *(k[1] for k in more_kills)):
        if rank_host(r, per, hosts) != hosts[-1]:
            raise ValidationError(f"killed rank {r}: kill a rank of {hosts[-1]} (its replacement, a spare there, "
                                  "runs on the same host)")
    return {"hosts": hosts, "per_host": per, "slow": slow, "spec": ",".join(f"{h}:{slots[h]}" for h in hosts),
            "moves": moves, "kill": kills[0], "kills": kills, "calib_move": cal_move, "calib_kill": cal_kill,
            "calib_moves": [cal_move, *more_moves], "calib_kills": [cal_kill, *more_kills],
            "policy": cfg.values["scenario"]["policies"][0]}


def check_spares(moves: list, kills: list, hosts: list[str], lab: dict, whose: str, per: int) -> None:
    """Every move and recovery finds a warm spare on its host, counted event by event in point
    order as the runtime's coordinator counts them: the last host starts with ``lab.spares`` +
    ``lab.spares_per_host`` (the recoveries take theirs there: the killed ranks are the last
    host's), every other host with ``lab.spares_per_host``; a move takes one of its target's, a
    recovery one of the last host's; a moved rank's old process stays as its host's spare always
    with ``lab.spares_per_host``, and otherwise while that host has fewer than it started with
    (a handover on the spares' host refills it: coordinator_steps._recycles)."""
    k, last = lab["spares_per_host"], hosts[-1]
    start = {h: k + (lab["spares"] if h == last else 0) for h in hosts}
    have, on = dict(start), {r: rank_host(r, per, hosts) for r in range(per * len(hosts))}
    events = sorted([(p, 0, r, to) for p, r, to in moves] + [(p, 1, r, last) for p, r in kills])
    for p, kill, r, to in events:
        if have[to] == 0:
            what = (f"{whose or 'the '}kill of rank {r} at point {p}" if kill else
                    f"{whose or 'the '}move of rank {r} to {to} at point {p}")
            spares = f"lab.spares {lab['spares']}" + (f" + lab.spares_per_host {k}" if k else "")
            raise ValidationError(f"{spares}: no warm spare left on {to} for {what}")
        have[to] -= 1
        if not kill:
            src, on[r] = on[r], to
            if k or have[src] < start[src]:
                have[src] += 1


def move_target(what: str, rank: int, to: str, on: dict, hosts: list[str], k: int) -> None:
    """A move goes to the spares' host (``hosts[-1]``; from a rank there, a handover to a spare on its own
    host), or with ``lab.spares_per_host`` to any host (``on``: where each rank is, updated)."""
    if to not in hosts or (to != hosts[-1] and not k):
        raise ValidationError(f"{what}: moves go to the spares' host {hosts[-1]} (a spawn onto "
                              "another lab host is unreliable with Open MPI: PLATFORM.md; lab.spares_per_host "
                              "puts spares on every host)")
    on[rank] = to


def scenario_events(cfg, hosts: list[str], per: int, k: int) -> tuple[list, list]:
    """The scenario's ``[[events]]`` as the real run's moves (point, rank, host) and kills (point, rank)."""
    moves, kills = [], []
    on = {r: rank_host(r, per, hosts) for r in range(cfg.values["jobs"]["ranks"])}
    for i, ev in enumerate(cfg.events):
        if ev.at_point < 0:
            raise ValidationError(f"events[{i}]: a validation scenario's events are at_point (the real run's "
                                  "--migrate STEP and --kill rank:R@point:P)")
        if ev.kind == "move":
            move_target(f"events[{i}]", ev.rank, ev.hosts[0], on, hosts, k)
            moves.append((ev.at_point, ev.rank, ev.hosts[0]))
        elif ev.kind == "kill-rank":
            kills.append((ev.at_point, ev.rank))
        else:
            raise ValidationError(f"events[{i}]: a validation scenario has moves and killed ranks only, not {ev.kind}")
    return moves, kills


def parse_calib(move: str, kill: str, points: int, ranks: int) -> tuple[tuple[int, int, str], tuple[int, int]]:
    try:
        mp, mr, mh = move.split(":")
        kp, kr = kill.split(":")
        m = (int(mp), int(mr), mh)
        k = (int(kp), int(kr))
    except ValueError:
        raise ValidationError(f"lab.calib_move {move!r} / lab.calib_kill {kill!r}: expected POINT:RANK:HOST and "
                              "POINT:RANK") from None
    for p, r in ((m[0], m[1]), k):
        if not (WARMUP_POINTS + 2 <= p < points and 0 <= r < ranks):
            raise ValidationError(f"lab.calib_move / calib_kill: point {p} or rank {r} out of range "
                                  f"(points {WARMUP_POINTS + 2}..{points - 1}, ranks 0..{ranks - 1})")
    return m, k


def parse_more(lab: dict, speeds_until: int, kill: int, ranks: int) -> tuple[list, list]:
    """``[lab] calib_more_moves`` / ``calib_more_kills``: more moves and kills in the calibration run for
    the medians of the downtime and of the recovery time. The moves come after ``speeds_until`` (the
    speeds after ``calib_move`` are measured before them) and before ``calib_kill`` (a recovery cancels
    the migrations still waiting); the kills come after ``calib_kill``."""
    moves, kills = [], []
    for what, items, n in (("calib_more_moves", lab["calib_more_moves"], 3), ("calib_more_kills",
                                                                            lab["calib_more_kills"], 2)):
        lo, hi = (speeds_until, kill) if n == 3 else (kill + 1, lab["calib_points"])
        for item in items:
            parts = str(item).split(":")
            try:
                if len(parts) != n:
                    raise ValueError
                p, r = int(parts[0]), int(parts[1])
            except ValueError:
                raise ValidationError(f"lab.{what} {item!r}: expected {'POINT:RANK:HOST' if n == 3 else 'POINT:RANK'}"
                                      ) from None
            if not (lo <= p < hi and 0 <= r < ranks):
                raise ValidationError(f"lab.{what} {item!r}: point in {lo}..{hi - 1}, rank 0..{ranks - 1}")
            if n == 3:
                moves.append((p, r, parts[2]))
            else:
                kills.append((p, r))
    return moves, kills


def rank_host(rank: int, per: int, hosts: list[str]) -> str:
    """Where rank ``rank`` starts: blocks of ``per`` consecutive ranks per host (as the simulator builds)."""
    return hosts[rank // per]


def app_args(cfg, points: int) -> list[str]:
    return [str(a) for a in cfg.values["lab"]["app_args"]] + ["--steps", str(points)]


def real_run(name: str, cfg, pl: dict, root: Path, points: int, moves: list, kills: list, policy: str,
             say=print) -> dict:
    """One real run on the lab through ``mpimig inject``; what it measured (see the module docstring)."""
    from .. import apps, events
    from ..bench.balance import job_span
    lab = cfg.values["lab"]
    job = root / name
    report = job / "inject"
    shutil.rmtree(job, ignore_errors=True)
    cmd = [*pycmd.module("mpimig"), "inject", *sum((["--kill", f"rank:{r}@point:{p}"] for p, r in kills), []),
           "--report", str(report), "--reference-dir", str(root / "ref"),
           "--experiment-timeout", str(lab["timeout_s"]),
           "-n", str(cfg.values["jobs"]["ranks"]), "--hosts", pl["spec"], "--spares", str(lab["spares"]), "--ft",
           *(["--spares-per-host", str(lab["spares_per_host"])] if lab["spares_per_host"] else []),
           "--ckpt-every", str(cfg.values["jobs"]["ckpt_every"]), "--policy", policy,
           "--metrics-seconds", str(lab["metrics_seconds"]), "--balance-seconds", str(lab["balance_seconds"]),
           *sum((["--migrate", f"{p}:{r}:{h}:stop-and-copy"] for p, r, h in moves), []),
           "--job-dir", str(job), str(apps.path(lab["app"])), *app_args(cfg, points), "--out", "{job}/out.npy"]
    # lab.slow.job_env: the lab's settings; mpimig run connects the job at start-up (launcher.preconnect_env: the
    # switch's collectives were the first traffic between spares and ranks; docs/simulator.md, "Runs s12")
    from ..lab.slow import job_env
    env = job_env(os.environ)
    say(f"validate: {name} run: {points} points, moves {moves}, kills (point, rank) {kills}, "
        f"policy {policy} (load avg {os.getloadavg()[0]:.1f})")
    t0 = time.time()
    job.mkdir(parents=True, exist_ok=True)
    with open(job.parent / f"{name}.out", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            samples = sample_ranks(proc, job, 0.2)
            proc.wait(timeout=lab["timeout_s"] + 120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    rec: dict[str, Any] = {"name": name, "command": cmd, "job_dir": str(job), "command_s": time.time() - t0,
                           "loadavg": os.getloadavg()[0], "points": points, "samples": samples}
    try:
        rep = json.loads((report / "report.json").read_text())
    except (OSError, ValueError) as exc:
        tail = (job.parent / f"{name}.out").read_text()[-2000:]
        raise ValidationError(f"the {name} run left no report ({exc}); its output ends:\n{tail}") from None
    evs = events.read(job)
    rec["ok"] = bool(rep.get("ok"))
    rec["verified"] = rep.get("verified")
    # recovery time: the kill -> the ``recovered`` event (``mpimig inject``'s recover_s); the median of the kills
    faults = rep.get("faults") or []
    rec["recoveries"] = [{k: f.get(k) for k in ("spec", "path", "detect_s", "recover_s", "resume_s", "failed_point",
                                                "restored_point", "restore", "t_shrink", "t_replace", "t_restore")}
                         for f in faults]
    recs = [f["recover_s"] for f in rec["recoveries"] if f.get("path") == "online" and f.get("recover_s") is not None]
    rec["recoveries_s"] = recs
    rec["recovery_s"] = statistics.median(recs) if len(recs) == len(kills) else None
    rec["recovery"] = rec["recoveries"][0] if rec["recoveries"] else {}
    rec["recovery_parts"] = recovery_parts(evs)
    rec["time_s"] = job_span(job)
    rec["moves"] = [{"t": e["t"], "rank": e.get("rank"), "to": e.get("to"), "downtime_s": e.get("downtime")}
                    for e in evs if e["event"] == "migrated"]
    rec["epochs"] = [(e["point"], e["t"]) for e in evs if e["event"] == "epoch" and e.get("run_id")
                     and isinstance(e.get("point"), int)]
    rec["started_t"] = next((e["t"] for e in evs if e["event"] == "started"), None)
    rec["recovered_t"] = next((e["t"] for e in evs if e["event"] == "recovered"), None)
    rec["move_steps"] = move_steps(job)
    if not rec["ok"] or rec["time_s"] is None:
        raise ValidationError(f"the {name} run did not complete, survive its fault and match its --serial reference "
                              f"(see {report / 'report.json'} and {job.parent / f'{name}.out'})")
    if len(rec["moves"]) != len(moves) or rec["recovery_s"] is None:
        raise ValidationError(f"the {name} run made {len(rec['moves'])} of {len(moves)} moves and recovered "
                              f"{len(recs)} of {len(kills)} killed ranks online ({job})")
    return rec


def recovery_parts(evs: list[dict]) -> list[dict]:
    """Each online recovery of a run split at its events (docs/simulator.md, "Recovery time"): from
    the kill (the ``injected`` event, just before the SIGKILL) to the first ``failure`` event of a
    member of the job (a rank, the coordinator or a spare: the runtime's notice reached it), from there
    to the last member's (every member takes part in the shrink: the last is one that was computing
    when the notice came, and saw it only at its next MPI call), and from there to the ``recovered``
    event (the shrink, the new communicators, the restore: the *repair*). Seconds; kills whose
    recovery did not follow online are left out."""
    out = []
    for inj in sorted((e for e in evs if e["event"] == "injected"), key=lambda e: e["t"]):
        t0 = inj["t"]
        rec = next((e for e in evs if e["event"] == "recovered" and e["t"] >= t0), None)
        if rec is None:
            continue
        fails = sorted(e["t"] for e in evs if e["event"] == "failure" and t0 <= e["t"] <= rec["t"])
        if not fails:
            continue
        out.append({"point": inj.get("point"), "rank": inj.get("rank"), "notice_s": fails[0] - t0,
                    "all_in_s": fails[-1] - t0, "repair_s": rec["t"] - fails[-1], "recover_s": rec["t"] - t0,
                    "members": len(fails)})
    return out


def move_steps(job: Path) -> list[dict]:
    """Each move's timings from the coordinator's last status.json (its ``switch_steps``: where the
    milliseconds of the switch went, per participant): which step of a move varies between runs."""
    try:
        st = json.loads((job / "status.json").read_text())
    except (OSError, ValueError):
        return []
    return [{"rank": m.get("rank"), "to": m.get("to"), "timings": m.get("timings") or {}}
            for m in st.get("migrations") or []]


def sample_ranks(proc: subprocess.Popen, job: Path, every: float) -> list[dict]:
    """Every rank's latest metric report (host, points passed, compute and communication per point)
    from the coordinator's status.json, read every ``every`` seconds while the job runs."""
    out: list[dict] = []
    seen: set = set()
    while proc.poll() is None:
        try:
            st = json.loads((job / "status.json").read_text())
        except (OSError, ValueError):
            st = None
        for r in ((st or {}).get("balance") or {}).get("ranks", []):
            key = (r.get("rank"), r.get("host"), r.get("points"))
            if r.get("points") and key not in seen and r.get("compute_s") is not None:
                seen.add(key)
                out.append({"rank": r["rank"], "host": r["host"], "points": r["points"],
                            "compute_s": r["compute_s"], "comm_s": r.get("comm_s", 0.0),
                            "state_bytes": r.get("state_bytes", 0)})
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=every)
    return out
