"""The report of ``mpimig inject``: each injected fault matched with the loss,
the recovery and the resumption after it in the job's event log; the printed
table, the PNG timeline, and the totals of ``--seeds`` campaigns (shared with
``mpimig storm`` through :mod:`mpimig.verify.campaign`).

Reads only what a job left behind (its events and progress samples): it starts
and kills nothing. May import the top-level modules and :mod:`mpimig.verify`.
"""
from __future__ import annotations

from pathlib import Path

from .._plots import import_pyplot
from ..verify import campaign


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
        fid = e.get("id")
        if fid is not None:       # an injected event without a fault id matches no fault
            by_id.setdefault(fid, []).append(e)
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
            # detection: the first process that saw the failure: the earlier of the
            # recovery's detected_at (the census's first) and the first ``failure``
            # event (the coordinator may log its own before the census takes its time)
            fail = first("failure", ti)
            seen = [t for t in (rec.get("detected_at"),
                                fail["t"] if fail is not None and fail["t"] <= rec["t"] else None) if t]
            row["detect_s"] = round(min(seen) - ti, 3) if seen else None
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
    plt = import_pyplot("the timeline plot")
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
    result = ("bit-identical" if report["verified"] else "not verified" if report["verified"] is None
              else "DIFFERENT")
    ax.set_title(f"{report['injected']} fault(s), {report['survived']} survived; result {result} ({ok})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ seeds

def fault_totals(reports: list[dict]) -> dict:
    """The faults of ``--seeds`` jobs: injected, survived (per kind) and their times."""
    rows = [r for rep in reports for r in rep["faults"] if r["fired"]]
    by_kind: dict[str, dict[str, int]] = {}
    for r in rows:
        k = by_kind.setdefault(r["kind"], {"injected": 0, "survived": 0})
        k["injected"] += 1
        k["survived"] += int(bool(r.get("survived")))

    def stat(key: str) -> dict | None:
        return campaign.stat([r[key] for r in rows if isinstance(r.get(key), (int, float))])

    return {"faults_injected": len(rows), "faults_survived": sum(1 for r in rows if r.get("survived")),
            "by_kind": by_kind,
            "detect_s": stat("detect_s"), "recover_s": stat("recover_s"), "resume_s": stat("resume_s"),
            "work_lost_points": {"total": sum(r.get("work_lost_points") or 0 for r in rows),
                                 **(stat("work_lost_points") or {})}}


def _kind_rows(t: dict) -> list[tuple[str, str]]:
    return [(f"  {k}", f"{v['survived']}/{v['injected']} survived") for k, v in sorted(t["by_kind"].items())]


def _time_row(key: str) -> campaign.Row:
    def text(t: dict) -> str:
        s = t[key]
        return f"mean {s['mean']}, max {s['max']} (n={s['n']})" if s else "-"
    return (f"{key[:-2]} time (s)", text)


def _work_lost(t: dict) -> str:
    wl = t["work_lost_points"]
    return f"total {wl['total']}" + (f", mean {wl['mean']}, max {wl['max']}" if "mean" in wl else "")


#: how ``mpimig inject --seeds`` totals its jobs and what its table shows
CAMPAIGN = campaign.Campaign(
    count_key="jobs", seconds_key="wall_seconds",
    sums=("not_fired", "relaunches", "online_recoveries"),
    counts=(("jobs_completed", lambda rep: rep["completed"]), ("jobs_verified", lambda rep: rep["verified"])),
    extra=fault_totals,
    ok=lambda t: not t["failed_seeds"] and t["faults_injected"] == t["faults_survived"] and t["faults_injected"] > 0,
    ok_text="OK: every fault survived, every result bit-identical",
    rows=(("jobs run", "jobs"), ("faults injected", "faults_injected"), ("faults survived", "faults_survived"),
          _kind_rows,
          ("faults that never fired", "not_fired"), ("jobs completed", "jobs_completed"),
          ("results bit-identical", "jobs_verified"), ("relaunches", "relaunches"),
          ("online recoveries", "online_recoveries"),
          _time_row("detect_s"), _time_row("recover_s"), _time_row("resume_s"),
          ("work lost (points)", _work_lost), ("seconds", "seconds")))


def totals(reports: list[dict]) -> dict:
    return campaign.totals(reports, CAMPAIGN)


def format_totals(t: dict) -> str:
    return campaign.format_totals(t, CAMPAIGN)


FAULT_COLORS = {"rank": "tab:blue", "host": "tab:red", "coordinator": "tab:green", "ckpt-write": "tab:purple",
                "ckpt-async-pending": "tab:pink", "migration-source": "tab:orange", "migration-target": "tab:brown"}


def totals_png(reports: list[dict], path: Path) -> None:
    """Time to resume per fault, per seed (x: not survived)."""
    points = [campaign.Point(rep["seed"], r["resume_s"], r["kind"], bool(r.get("survived")))
              for rep in reports for r in rep["faults"] if r.get("resume_s") is not None]
    campaign.seeds_png(points, path, ylabel="kill -> resumed computation (s)",
                       title="mpimig inject: time to resume per fault (x: not survived)", colors=FAULT_COLORS)


def seed_line(rep: dict) -> str:
    """The progress line of one ``--seeds`` job (and where to look when it failed)."""
    parts = []
    for r in rep["faults"]:
        parts.append(f"{r['spec']} -> " + (
            f"{r.get('path')} resumed {r['resume_s']:.2f} s lost {r.get('work_lost_points')} pts"
            if r.get("resume_s") is not None else ("not fired" if not r["fired"] else "NOT RECOVERED")))
    v = {True: "bit-identical", False: "DIFFERENT", None: "unverified"}[rep["verified"]]
    line = (f"seed {rep['seed']:4d}  {'ok  ' if rep['ok'] else 'FAIL'}  {'; '.join(parts)}  result {v}  "
            f"{rep['wall_seconds']:.1f} s")
    if not rep["ok"]:
        line += f"\n      report {rep['report_dir']}/report.json, output {rep['report_dir']}/run.err"
    return line
