"""``mpimig bench migrate --strategies ...``: the seed's migration algorithms side by side.

For every strategy x state size x dirty fraction, one job of
``mpimig/bench/migrate_app.py`` (4 ranks, halo exchange with both ring
neighbours, a checkpoint point every step) moves rank 1 to this machine with
``--migrate STEP:1:HOST:STRATEGY``. Rank 1 holds one float64 array of the
size (the other ranks 1 MiB); ``--dirty F`` makes the program change that
fraction of the array every step. With ``--spares 1`` (default) the target is
a warm spare (started with the job: no spawn, and the same shared-memory
transport as the baseline).

Per combination, from the job's status.json and the program's step times:
downtime (freeze of the migrating rank: safe point entered -> state restored
in the new process), total migration time (pre-copy: rounds + freeze;
post-copy: freeze + residual dependency; others: the freeze), bytes moved
(pre-copy: every round + the final copy; file-server: bytes written to the
shared file), rounds, residual dependency (post-copy: until the last chunk
arrived), when the old process was free (from the freeze), the moved rank's
slowdown after resuming (its step time above its median, 5 steps after the
move: demand fetches), and the other ranks' stall in the safe point.

Baselines in the same run, per size: plain Send/Recv of the same bytes between
the two ranks of one mpiexec (touched and fresh receive buffers); the bytes
written to a file in the directory the file-server strategy writes to, fsync'd,
dropped from the page cache and read back; a memcpy of the state
(:mod:`mpimig.bench.baselines`). The goals are issue 15's table, each judged
against its baseline (:mod:`mpimig.bench.migrate_goals`).

Before each job (and each baseline) the memory and disk it needs are checked
against what is available now (:func:`mpimig.bench.baselines.room_for`); a
point that does not fit is not run: its row says why, and the strategy stops
at the sizes it reached.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .._plots import import_pyplot
from ..errors import UsageError
from ..launch.placement import parse_hosts
from ..migration.protocol import STRATEGIES, check_strategy
from . import baselines
from .checkpoint import fmt_size, parse_size
from ._common import APP, MOVING, RANKS, job_records, median, others_wait, plan_steps, run_raw
from .migrate_goals import evaluate, format_goals
from .. import pycmd

PLOT_NEEDS = "mpimig bench migrate --strategies (it draws its results)"


def parse_strategies(text: str) -> list[str]:
    if text.strip() == "all":
        return list(STRATEGIES)
    out = [s.strip() for s in text.split(",") if s.strip()]
    for s in out:
        err = check_strategy(s)
        if err:
            raise UsageError(f"--strategies: {err} (or 'all')")
    if not out:
        raise UsageError("--strategies needs at least one strategy (or 'all')")
    return out


def parse_dirty(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part[:-1]) / 100.0 if part.endswith("%") else float(part)
        except ValueError:
            raise UsageError(f"--dirty: bad fraction {part!r} (e.g. 0, 1%, 0.1)") from None
        if not 0.0 <= v <= 1.0:
            raise UsageError(f"--dirty: {part!r} is not between 0 and 100%")
        out.append(v)
    if not out:
        raise UsageError("--dirty needs at least one fraction")
    return out


def parse_wtrack(text: str) -> list[str | None]:
    """--wtrack: MPIMIG_WTRACK values for pre-copy's runs ([None]: the environment's)."""
    out: list[str | None] = [m.strip() for m in (text or "").split(",") if m.strip()]
    for m in out:
        if m not in ("on", "off"):
            raise UsageError(f"--wtrack: {m!r} is not a mode; known: on, off")
    return out or [None]


def row_label(r: dict) -> str:
    """The strategy, with pre-copy's write-tracking mode (uffd, shadow, mixed) when known."""
    mode = r.get("wtrack") or r.get("wtrack_requested")      # what ran, else what was asked (a failed run)
    return f"{r['strategy']}/{mode}" if mode else r["strategy"]


def mover_slowdown(result: dict, moved: int, after: int = 5) -> float | None:
    """Seconds above the moved rank's median step (before the move) in the
    ``after`` steps it ran after resuming."""
    ranks = {r["rank"]: r for r in result.get("ranks", [])}
    mover = ranks.get(moved)
    if not mover or not mover.get("resumed_at"):
        return None
    s = mover["resumed_at"][0]
    t = mover["times"]
    before = [x for x in t[:max(1, s - 1)] if x]
    if not before:
        return None
    base = statistics.median(before)
    return sum(max(0.0, x - base) for x in t[s:s + after])


def run_one(strategy: str, size: int, dirty: float, at: int, steps: int, args, host: str,
            work: Path, tag: str, wtrack: str | None = None) -> dict:
    job = work / f"job-{tag}"
    cmd = [*pycmd.module("mpimig"), "run", "-n", str(RANKS), "--job-dir", str(job),
           "--restart", "never", "--timeout", str(args.timeout),
           "--migrate", f"{at}:{MOVING}:{host}:{strategy}"]
    if getattr(args, "hosts", None):
        cmd += ["--hosts", args.hosts]
    if args.spares:
        cmd += ["--spares", "1"]
    cmd += [str(APP), "--bytes", str(size), "--steps", str(steps), "--work-ms", str(args.work_ms),
            "--dirty", repr(dirty), "--big-rank", str(MOVING)]
    rec: dict[str, Any] = {"strategy": strategy, "size": size, "dirty": dirty, "at_point": at, "steps": steps}
    env = dict(os.environ)
    if getattr(args, "hosts", None):
        # over lab hosts (which share this machine's cores) with the lab's settings, as `bench balance` and
        # `simulate --validate` run: processes waiting in MPI nap instead of spinning. Spinning, the switch's
        # Create_group/Split took 0.09-0.36 s of every move (8 processes on 2 cores; docs/protocol.md, "The
        # switch's cost")
        from ..lab.slow import job_env
        env = job_env(env)
    if wtrack:
        env["MPIMIG_WTRACK"] = wtrack
        rec["wtrack_requested"] = wtrack
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 60, env=env)
    except subprocess.TimeoutExpired:
        shutil.rmtree(job, ignore_errors=True)
        rec["state"] = f"failed: mpimig run did not return in {args.timeout + 60:.0f} s"
        return rec
    records = job_records(job, proc, rec)
    if records is None:
        return rec
    status, complete = records
    migs = status.get("migrations") or []
    m: dict[str, Any] = migs[0] if migs else {"state": "missing", "timings": {}, "strategy_stats": {}}
    t, s = m.get("timings", {}), m.get("strategy_stats", {}) or {}
    rec["state"] = m.get("state", "?")
    rec["from"], rec["to"] = m.get("from"), m.get("to")
    rec["downtime"] = t.get("downtime")
    rec["spawn"] = t.get("spawn")
    rec["stats"] = s
    rec["timings"] = t
    down = rec["downtime"] or 0.0
    if strategy == "pre-copy":
        rec["bytes_moved"] = s.get("bytes_total")
        rec["wtrack"] = s.get("wtrack")
        rec["rounds"] = s.get("rounds", 0) + 1
        rec["total"] = s.get("precopy_s", 0.0) + down
        rec["residual"] = 0.0
        rec["source_free"] = down
    elif strategy == "post-copy":
        rec["bytes_moved"] = t.get("bytes")
        rec["rounds"] = 1
        rec["residual"] = t.get("residual", s.get("residual"))
        rec["total"] = down + (rec["residual"] or 0.0)
        rec["source_free"] = rec["total"]
    elif strategy == "file-server":
        rec["bytes_moved"] = s.get("file_bytes")
        rec["rounds"] = 1
        rec["residual"] = 0.0
        rec["total"] = down
        rec["source_free"] = s.get("source_freed_s")
    else:
        rec["bytes_moved"] = t.get("bytes")
        rec["rounds"] = 1
        rec["residual"] = 0.0
        rec["total"] = down
        rec["source_free"] = down
    stalls = [float(v) for v in (m.get("stalls") or {}).values()]
    rec["stall_max"] = max(stalls) if stalls else None
    res = complete.get("result") or {}
    rec["slowdown"] = mover_slowdown(res, MOVING)
    w = others_wait(res, MOVING)
    rec["others_wait_max"] = w["others_max_s"] if w else None
    shutil.rmtree(job, ignore_errors=True)
    return rec


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _mb(x) -> str:
    return "-" if x is None else f"{x / (1 << 20):.1f}"


def format_table(results: dict) -> list[str]:
    head = (f"{'strategy':<16} {'size':>8} {'dirty':>6} {'downtime':>9} {'total':>9} {'moved':>9} "
            f"{'rounds':>6} {'residual':>9} {'src free':>9} {'slowdown':>9} {'stall':>8} {'others':>8}")
    unit = (f"{'':<16} {'':>8} {'/step':>6} {'ms':>9} {'ms':>9} {'MiB':>9} {'':>6} {'ms':>9} {'ms':>9} "
            f"{'ms':>9} {'max ms':>8} {'wait ms':>8}")
    lines = [head, unit]
    for r in results["rows"]:
        if r.get("state") != "done":
            lines.append(f"{row_label(r):<16} {fmt_size(r['size']):>8} {r['dirty'] * 100:>5.1f}% "
                         f"{r.get('state')}")
            continue
        lines.append(
            f"{row_label(r):<16} {fmt_size(r['size']):>8} {r['dirty'] * 100:>5.1f}% {_ms(r['downtime']):>9} "
            f"{_ms(r['total']):>9} {_mb(r['bytes_moved']):>9} {r['rounds']:>6} {_ms(r['residual']):>9} "
            f"{_ms(r['source_free']):>9} {_ms(r['slowdown']):>9} {_ms(r['stall_max']):>8} "
            f"{_ms(r['others_wait_max']):>8}")
    lines.append("")
    lines.append("baselines, same run: plain Send/Recv between the 2 ranks of one mpiexec; the bytes "
                 "written + fsync'd + read back cold in the file-server's directory; memcpy")
    for raw in results["raw"]:
        lines.append(f"  {fmt_size(raw['bytes']):>8}: {raw['warm_gbps']:.2f} GB/s (touched buffer), "
                     f"{raw['cold_gbps']:.2f} GB/s (fresh buffer) -> bytes/bandwidth "
                     f"{raw['bytes'] / raw['warm_gbps'] / 1e6:.1f} ms / {raw['bytes'] / raw['cold_gbps'] / 1e6:.1f} ms")
    for d in results.get("disk") or []:
        lines.append(f"  {fmt_size(d['bytes']):>8}: disk write+fsync {d['write_s'] * 1e3:.0f} ms "
                     f"({d['write_gbps']:.2f} GB/s), {'cold' if d['dropped'] else 'cached (no fadvise)'} read "
                     f"{d['read_s'] * 1e3:.0f} ms ({d['read_gbps']:.2f} GB/s) -> {d['seconds'] * 1e3:.0f} ms")
    for m in results.get("memcpy") or []:
        lines.append(f"  {fmt_size(m['bytes']):>8}: memcpy {m['gbps']:.2f} GB/s -> {m['seconds'] * 1e3:.1f} ms")
    for why in results.get("baseline_skipped") or []:
        lines.append(f"  {why}")
    lines.append("")
    lines.append("goals (issue 15):")
    lines.extend(format_goals(results["goals"]))
    lines.append("")
    lines.append("downtime: the moving rank frozen; total: pre-copy rounds + freeze, post-copy freeze + "
                 "residual; moved: bytes sent (pre-copy: all rounds + final; file-server: file size); "
                 "src free: old process no longer needed, from the freeze; slowdown: moved rank's step "
                 "time above its median in 5 steps after resuming; stall: others in the safe point; "
                 "others wait: their step time above median around the move")
    return lines


def _baseline_lines(results: dict) -> list[tuple[str, list[tuple[int, float]]]]:
    """(label, [(size, seconds)]) of each baseline measured: drawn dashed next to the downtimes."""
    raw = sorted(results.get("raw") or [], key=lambda r: r["bytes"])
    out = [("bytes / Send bandwidth (touched)", [(r["bytes"], r["bytes"] / (r["warm_gbps"] * 1e9)) for r in raw]),
           ("bytes / Send bandwidth (fresh)", [(r["bytes"], r["bytes"] / (r["cold_gbps"] * 1e9)) for r in raw]),
           ("disk write+fsync+cold read", sorted((d["bytes"], d["seconds"]) for d in results.get("disk") or [])),
           ("memcpy", sorted((m["bytes"], m["seconds"]) for m in results.get("memcpy") or []))]
    return [(label, pts) for label, pts in out if pts]


def plot(results: dict, path: Path) -> None:
    plt = import_pyplot(PLOT_NEEDS)
    rows = [r for r in results["rows"] if r.get("state") == "done"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 6))
    panels = (("downtime", "downtime (freeze), ms", 1e3), ("bytes_moved", "bytes moved, MiB", 1 / (1 << 20)),
              ("source_free", "old process needed for, ms", 1e3))
    styles = ["-", ":", "-.", (0, (1, 3))]
    dirties = sorted({r["dirty"] for r in rows})
    for ax, (key, label, scale) in zip(axes, panels):
        for j, strat in enumerate(sorted({row_label(r) for r in rows})):
            for i, d in enumerate(dirties):
                pts = sorted((r["size"], r[key]) for r in rows
                             if row_label(r) == strat and r["dirty"] == d and r.get(key) is not None)
                if pts:
                    ax.plot([p[0] / (1 << 20) for p in pts], [p[1] * scale for p in pts],
                            linestyle=styles[i % len(styles)], marker="o", color=f"C{j}",
                            label=f"{strat}, {d * 100:g}% dirty")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("state of the moving rank, MiB")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    for k, (label, pts) in enumerate(_baseline_lines(results)):     # the baselines, dashed
        axes[0].plot([p[0] / (1 << 20) for p in pts], [p[1] * 1e3 for p in pts], linestyle="--",
                     color=("0.0", "0.45", "C7", "C8")[k % 4], linewidth=1.2, label=f"baseline: {label}")
    axes[0].set_title("downtime vs state size (dashed: baselines, same run)", fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle("mpimig bench migrate --strategies: downtime vs state size, strategies and baselines in one run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _baselines(size: int, work: Path, args, results: dict, out) -> None:
    """The size's baselines (each only if it fits now) into ``results``."""
    why = baselines.room_for("raw", size, work)
    if why:
        results["baseline_skipped"].append(f"{fmt_size(size)}: Send/Recv baseline not run: {why}")
        out(f"  baseline {fmt_size(size)}: Send/Recv not run: {why}")
    else:
        raw = run_raw(size, 3 if size >= (256 << 20) else 5, work, args.timeout)
        results["raw"].append(raw)
        out(f"  baseline {fmt_size(size)}: Send/Recv {raw['warm_gbps']:.2f} GB/s touched, "
            f"{raw['cold_gbps']:.2f} GB/s fresh buffer")
    fs_dir = work / "migrations"         # where file-server's plans write (job dirs are in work)
    why = baselines.room_for("disk", size, work)
    if why:
        results["baseline_skipped"].append(f"{fmt_size(size)}: disk baseline not run: {why}")
        out(f"  baseline {fmt_size(size)}: disk not run: {why}")
    else:
        d = baselines.disk_roundtrip(size, fs_dir, repeat=1 if size >= (256 << 20) else 3)
        results["disk"].append(d)
        out(f"  baseline {fmt_size(size)}: disk write+fsync {d['write_gbps']:.2f} GB/s, "
            f"{'cold' if d['dropped'] else 'cached'} read {d['read_gbps']:.2f} GB/s ({d['seconds'] * 1e3:.0f} ms)")
    m = baselines.memcpy(size)
    results["memcpy"].append(m)
    out(f"  baseline {fmt_size(size)}: memcpy {m['gbps']:.2f} GB/s ({m['seconds'] * 1e3:.1f} ms)")


def _report(k: int, total: int, r: dict, t0: float, out) -> None:
    el = time.monotonic() - t0
    eta = el / k * (total - k)
    size, dirty = r["size"], r["dirty"]
    if r.get("state") == "done":
        out(f"  [{k}/{total}] {row_label(r)} {fmt_size(size)} {dirty * 100:g}%: downtime "
            f"{_ms(r['downtime'])} ms, moved {_mb(r['bytes_moved'])} MiB, total "
            f"{_ms(r['total'])} ms  ({el:.0f} s, ~{eta:.0f} s left)")
    else:
        out(f"  [{k}/{total}] {r['strategy']} {fmt_size(size)} {dirty * 100:g}%: {r.get('state')}"
            + (f"\n    {r['log'][-1500:]}" if r.get("log") else ""))


def run(args, out=print) -> dict:
    strategies = parse_strategies(args.strategies)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes:
        raise UsageError("--sizes needs at least one size")
    dirties = parse_dirty(args.dirty)
    modes = parse_wtrack(getattr(args, "wtrack", ""))
    if args.repeat is None:
        args.repeat = 1
    if args.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    hosts = getattr(args, "hosts", None) or ""
    host = args.host or socket.gethostname()
    if hosts and host not in {name for name, _ in parse_hosts(hosts)}:
        raise UsageError(f"--host {host} is not in --hosts {hosts}: name the target host of the move "
                         "(e.g. --hosts h1:4,h2:1 --host h2)")
    at, steps = plan_steps(args.before, args.after, args.work_ms)
    base = Path(args.dir) if args.dir else None
    if base:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mpimig-bench-strategies-", dir=base))
    combos = [(s, z, d, m) for z in sizes for d in dirties for s in strategies
              for m in (modes if s == "pre-copy" else [None])]
    total = len(combos) * args.repeat
    out(f"mpimig bench migrate: strategies {', '.join(strategies)}; sizes "
        f"{', '.join(fmt_size(z) for z in sizes)}; dirty {', '.join(f'{d * 100:g}%' for d in dirties)} per step; "
        f"rank {MOVING} of {RANKS} -> {host} at step {at} of {steps}"
        f"{' (a warm spare)' if args.spares else ''}; {total} jobs + baselines")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    results: dict[str, Any] = {
        "host": host, "hosts": hosts,
        "ranks": RANKS, "moving_rank": MOVING, "at_point": at, "steps": steps,
        "work_ms": args.work_ms, "repeat": args.repeat, "spares": bool(args.spares),
        "strategies": strategies, "sizes": sizes, "dirty": dirties, "loadavg_start": load,
        "cores": os.cpu_count(), "chunk": int(os.environ.get("MPIMIG_CHUNK", 1 << 20)),
        "rows": [], "raw": [], "disk": [], "memcpy": [], "baseline_skipped": []}
    stopped: dict[str, str] = {}         # strategy -> why it stopped (a size that did not fit)
    t0 = time.monotonic()
    k = 0
    try:
        for size in sizes:
            _baselines(size, work, args, results, out)
            for strat, _, dirty, mode in (c for c in combos if c[1] == size):
                runs = []
                for i in range(args.repeat):
                    k += 1
                    why = (f"{strat} stopped at a smaller size ({stopped[strat]})" if strat in stopped
                           else baselines.room_for(strat, size, work))
                    if why:
                        stopped.setdefault(strat, f"{fmt_size(size)} did not fit: {why}")
                        r = {"strategy": strat, "size": size, "dirty": dirty, "state": f"skipped: {why}"}
                    else:
                        r = run_one(strat, size, dirty, at, steps, args, host, work,
                                    f"{strat}-{size}-{dirty}-{mode}-{i}", wtrack=mode)
                    runs.append(r)
                    _report(k, total, r, t0, out)
                results["rows"].append(_combine(runs))
                if getattr(args, "json", None):      # so far: a sweep cut short still leaves its rows
                    Path(args.json).write_text(json.dumps(dict(results, partial=True), indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["stopped"] = stopped
    results["cross_host"] = cross_host(results)
    results["goals"] = evaluate(results)
    results["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return results


def cross_host(results: dict) -> bool:
    """Whether the moves went between two hosts: every finished one's ``from`` is not its ``to``
    (read from the jobs' status, not predicted from the host list: the coordinator and the spares
    take slots of it too)."""
    runs = [r for row in results.get("rows", []) for r in row.get("runs", [row]) if r.get("state") == "done"]
    return bool(runs) and all(r.get("from") and r.get("from") != r.get("to") for r in runs)


def _combine(runs: list[dict]) -> dict:
    """Medians over repeats (the first run's other fields)."""
    done = [r for r in runs if r.get("state") == "done"]
    if not done:
        return runs[0]
    row = dict(done[0])
    for key in ("downtime", "total", "bytes_moved", "residual", "source_free", "slowdown", "stall_max",
                "others_wait_max"):
        row[key] = median([r.get(key) for r in done])
    row["done"], row["of"] = len(done), len(runs)
    row["runs"] = runs
    return row


def load(path: Path) -> dict:
    """A JSON this command wrote (also one cut short: ``partial``), its goals evaluated anew."""
    try:
        res = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--from-json: cannot read {path}: {exc}") from None
    if not isinstance(res, dict) or not isinstance(res.get("rows"), list) or "raw" not in res:
        raise UsageError(f"--from-json: {path} is not the JSON of `mpimig bench migrate --strategies`")
    res["goals"] = evaluate(res)
    return res


def main(args) -> int:
    import_pyplot(PLOT_NEEDS)      # before the jobs, not after an hour of them
    src = getattr(args, "from_json", None)
    res = load(Path(src)) if src else run(args)
    print("")
    if res.get("partial"):
        print(f"(a run cut short: the {len(res['rows'])} rows it finished)")
    for line in format_table(res):
        print(line)
    js = Path(args.json) if args.json else Path(src) if src else Path("migrate-strategies.json")
    if not src or args.json:
        js.write_text(json.dumps(res, indent=1))
        print(f"results written to {js}")
    png = Path(args.png) if args.png else js.with_suffix(".png")
    plot(res, png)
    print(f"plot written to {png}")
    # a point skipped because it did not fit in memory or disk is said, not a failure
    return 0 if all(r.get("state") == "done" or str(r.get("state")).startswith("skipped:")
                    for r in res["rows"]) else 1
