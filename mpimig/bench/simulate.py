"""``mpimig bench simulate``: how fast the simulator runs a large cluster, and how that grows.

The target (issue 13): 10,000 hosts, 100,000 ranks, one simulated day with
failures, in at most 60 s of wall time on this 2-core machine. The full size
runs once; then three series, each at a few sizes, give how wall time grows:

- **size**: hosts and ranks together (the number of jobs), from 1/16 to 1/2 of the full size;
- **ranks**: ranks per job at a fixed number of jobs and hosts (more ranks per host);
- **events**: the failure rate (host lifetimes and process crashes) at a fixed size.

For each series, the exponent ``a`` of time ~ x^a is fitted by least squares on
log-log (CPU time of the process: on a shared machine wall time also measures the
neighbours); a PNG shows the three series. The ratio printed is the full run's wall
time against the 60 s budget (<= 1 meets it). The jobs are BSP jobs of
``--ranks-per-job`` ranks on their own block of hosts, with a drifting load,
a slowed host per 100, Weibull host lifetimes and process crashes, decided on
by ``--policy`` every ``--balance-every`` seconds (docs/simulator.md, "Scale").
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any


def scale_raw(hosts: int, ranks: int, per_job: int, hours: float, policy: str, every: float,
              mttf_h: float, crash_h: float, seed: int, **_: Any) -> dict:
    """The scenario (as parsed TOML) of a cluster of ``hosts`` running ``ranks`` ranks."""
    jobs = max(1, ranks // per_job)
    hosts_per_job = max(1, hosts // jobs - 1)
    cores = math.ceil(per_job / hosts_per_job) + 2
    return {
        "scenario": {"name": f"scale-{hosts}x{ranks}", "horizon_s": hours * 3600, "policies": [policy],
                     "strategies": ["auto"], "balance_every_s": every, "seed": seed},
        "cluster": {"hosts": hosts, "cores": cores, "net_gbps": 25, "spares_per_host": 1,
                    "slow_hosts": [f"h{i}" for i in range(50, hosts + 1, 100)], "slow_speed": 0.5},
        "jobs": {"count": jobs, "ranks": per_job, "hosts_per_job": hosts_per_job, "extra_hosts": 1,
                 "points": 10 ** 9, "work_s": 1.0, "work_spread": 0.1, "state_mb": 1024, "dirty_mb_s": 50,
                 "ckpt_every": 600, "comm": "ring", "comm_kb": 256},
        "drift": {"amplitude": 0.5, "period_s": 6 * 3600, "width": 0.1},
        "failures": {"host_lifetime": "weibull", "weibull_shape": 0.7, "host_mttf_h": mttf_h, "repair_h": 4,
                     "rank_mtbf_h": crash_h, "online": True},
    }


def run_one(raw: dict, seed: int) -> dict[str, Any]:
    from ..sim.engine import Simulation
    from ..sim.report import summarize
    from ..sim.scenario import configs
    cfg = configs(raw, raw["scenario"]["name"])[0]
    t0 = time.perf_counter()
    c0 = time.process_time()
    sim = Simulation(cfg, cfg.values["scenario"]["policies"][0], "auto", seed)
    built = time.perf_counter() - t0
    o = sim.run()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    row = summarize(o, {})
    jobs = cfg.values["jobs"]
    return {"hosts": cfg.values["cluster"]["hosts"], "ranks": jobs["count"] * jobs["ranks"], "jobs": jobs["count"],
            "wall_s": wall, "cpu_s": cpu, "build_s": built, "events": next(sim.env._eid),
            "decisions": o.decisions, "moves": row["moves"], "failures": row["failures"],
            "sim_s": o.end_t, "lost_core_h": row["work_lost_core_h"]}


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """a of y ~ x^a, least squares on logs."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx if sxx else float("nan")


def _line(r: dict) -> str:
    return (f"  {r['hosts']:6d} hosts {r['ranks']:7d} ranks {r['jobs']:5d} jobs: {r['wall_s']:6.2f} s wall "
            f"{r['cpu_s']:6.2f} s CPU "
            f"(build {r['build_s']:.2f} s), {r['events']} events, {r['decisions']} decisions, {r['moves']} moves, "
            f"{r['failures']} failures, {r['sim_s'] / 3600:.1f} h simulated")


def main(args) -> int:
    common: dict[str, Any] = dict(per_job=args.ranks_per_job, hours=args.hours, policy=args.policy,
                                  every=args.balance_every, mttf_h=args.host_mttf_h, crash_h=args.rank_mtbf_h,
                                  seed=args.seed)
    res: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "series": {}}
    print(f"full size: {args.hosts} hosts, {args.ranks} ranks, {args.hours:g} h, policy {args.policy}", flush=True)
    full = run_one(scale_raw(args.hosts, args.ranks, **common), args.seed)
    print(_line(full), flush=True)
    res["full"] = full
    fracs = [1 / 16, 1 / 8, 1 / 4, 1 / 2]
    if not args.no_series:
        size = []
        for f in fracs:
            r = run_one(scale_raw(int(args.hosts * f), int(args.ranks * f), **common), args.seed)
            print("size" + _line(r)[4:], flush=True)
            size.append(r)
        size.append(full)
        ranks_s = []
        h = int(args.hosts * fracs[1])
        for k in (1, 2, 4, 8):
            c = dict(common, per_job=args.ranks_per_job * k // 4)
            r = run_one(scale_raw(h, int(args.ranks * fracs[1]) * k // 4, **c), args.seed)
            print("rank" + _line(r)[4:], flush=True)
            ranks_s.append(r)
        ev = []
        for f_ev in (0.25, 1.0, 4.0, 16.0):
            c = dict(common, mttf_h=args.host_mttf_h / f_ev, crash_h=args.rank_mtbf_h / f_ev)
            r = run_one(scale_raw(h, int(args.ranks * fracs[1]), **c), args.seed)
            print("evnt" + _line(r)[4:], flush=True)
            ev.append(r)
        res["series"] = {"size": size, "ranks": ranks_s, "events": ev}
        res["exponents"] = {       # of CPU time: wall time on a shared machine measures the neighbours too
            "size (hosts and ranks)": fit_exponent([r["ranks"] for r in size], [r["cpu_s"] for r in size]),
            "ranks per host": fit_exponent([r["ranks"] for r in ranks_s], [r["cpu_s"] for r in ranks_s]),
            "events": fit_exponent([r["events"] for r in ev], [r["cpu_s"] for r in ev]),
        }
        for k, a in res["exponents"].items():
            print(f"CPU time ~ {k}^{a:.2f}")
    ratio = full["wall_s"] / 60.0
    res["ratio_vs_60s"] = ratio
    res["cpu_ratio_vs_60s"] = full["cpu_s"] / 60.0
    print(f"full size: {full['wall_s']:.1f} s wall, {full['cpu_s']:.1f} s CPU for {full['sim_s'] / 3600:.1f} "
          f"simulated hours = {ratio:.2f}x the 60 s budget ({'met' if ratio <= 1 else 'NOT met'}; "
          f"CPU {full['cpu_s'] / 60:.2f}x: on a loaded machine CPU time is what the simulator itself costs)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"results written to {args.json}")
    if args.plot and res["series"]:
        _plot(res, Path(args.plot))
        print(f"plot written to {args.plot}")
    return 0


def _plot(res: dict, path: Path) -> None:
    from .._plots import import_pyplot
    plt = import_pyplot("mpimig bench simulate --plot")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (name, key, xlabel) in zip(axes, [("size", "ranks", "ranks (hosts x same)"),
                                              ("ranks", "ranks", "ranks, fixed hosts"),
                                              ("events", "events", "events")]):
        rows = res["series"][name]
        xs = [r[key] for r in rows]
        ys = [r["cpu_s"] for r in rows]
        ax.loglog(xs, ys, "o-")
        a = next(v for k, v in res["exponents"].items() if k.startswith(name.rstrip("s")) or k.startswith(name))
        ax.set_title(f"{name}: CPU ~ x^{a:.2f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("CPU time (s)")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def register(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "simulate", help="the simulator at scale: 10,000 hosts, 100,000 ranks, a day, vs 60 s; growth exponents",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=10000, help="hosts at full size (default 10000)")
    p.add_argument("--ranks", type=int, default=100000, help="ranks at full size (default 100000)")
    p.add_argument("--ranks-per-job", type=int, default=250, help="ranks per BSP job (default 250)")
    p.add_argument("--hours", type=float, default=24.0, help="simulated hours (default 24)")
    p.add_argument("--policy", default="refine", help="policy spec (default refine)")
    p.add_argument("--balance-every", type=float, default=14400.0,
                   help="seconds between a job's decision rounds (default 14400: 4 h; 3600 costs ~6x the CPU)")
    p.add_argument("--host-mttf-h", type=float, default=2000.0,
                   help="mean time to failure of a host, hours (default 2000: ~120 host failures a day)")
    p.add_argument("--rank-mtbf-h", type=float, default=200000.0,
                   help="mean time between crashes of a rank's process, hours (default 200000: ~12 a day)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-series", action="store_true", help="only the full size, no growth series")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--plot", metavar="PNG", help="draw wall time vs size, ranks and events (log-log) to PNG")
    p.set_defaults(func=main)
    return p
