"""``mpimig simulate SCENARIO.toml``: every policy x strategy (x sweep point) of a scenario, seeded.

Prints one table (docs/simulator.md explains the columns), a progress bar on
stderr, and with ``--out DIR`` writes results.json and PNG plots there.

``mpimig simulate --validate [SCENARIO]`` (default the shipped ``lab-validate``)
runs a small scenario for real on the lab (root; brought up with its hosts if
none is up) and in the simulator, calibrated from a separate calibration run on
the lab, and prints per metric (time to solution, per-move downtime, recovery
time) the real and simulated figures, the relative error and whether it is
within the scenario's bound (``[lab] bound``, 15%); exit status 1 if one is not.
``--json`` prints everything as JSON, ``--out DIR`` writes DIR/validation.json
(docs/simulator.md, "Validation against the lab"; mpimig/sim/validate.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError


class Progress:
    """A one-line progress bar on stderr (runs done and the current run's simulated time)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.label = ""
        self._last = 0.0

    def start(self, label: str) -> None:
        self.label = label
        self.update(0.0)

    def update(self, frac: float) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.2 and frac < 1.0):
            return
        self._last = now
        whole = (self.done + frac) / max(1, self.total)
        n = int(30 * whole)
        self.stream.write(f"\rsimulate [{'#' * n}{'.' * (30 - n)}] {self.done}/{self.total} {self.label[:50]:50s}")
        self.stream.flush()

    def finish_one(self) -> None:
        self.done += 1
        self._last = 0.0
        self.update(0.0)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def run_scenario(path: str, seed: int | None = None, progress: Progress | None = None,
                 policies: list[str] | None = None, strategies: list[str] | None = None,
                 ) -> tuple[list[dict], list[tuple[dict, Any]], list]:
    """Run every policy x strategy x sweep point of the scenario; (rows, (row, outcome) pairs, configs)."""
    from .engine import Simulation
    from .report import summarize
    from .scenario import load
    from .strategies import NAMES
    cfgs = load(path)
    for name in strategies or []:
        if name != "auto" and name not in NAMES:
            raise UsageError(f"--strategy {name!r}: not one of auto, {', '.join(NAMES)}")
    rows: list[dict] = []
    pairs: list[tuple[dict, Any]] = []
    runs = []
    for cfg in cfgs:
        sc = cfg.values["scenario"]
        for pol in policies or sc["policies"]:
            for strat in strategies or sc["strategies"]:
                runs.append((cfg, pol, strat))
    if progress is not None:
        progress.total = len(runs)
    for cfg, pol, strat in runs:
        sd = cfg.values["scenario"]["seed"] if seed is None else seed
        if progress is not None:
            progress.start(f"{pol} {strat} {' '.join(f'{k}={v}' for k, v in cfg.sweep_point.items())}")
        sim = Simulation(cfg, pol, strat, sd)
        t0 = time.perf_counter()
        o = sim.run(progress.update if progress is not None else None)
        o.extra["wall_s"] = time.perf_counter() - t0
        o.extra["events"] = next(sim.env._eid)     # SimPy numbers its events: how many were scheduled
        row = summarize(o, cfg.sweep_point)
        rows.append(row)
        pairs.append((row, o))
        if progress is not None:
            progress.finish_one()
    return rows, pairs, cfgs


def main(args) -> int:
    if args.validate:
        from .validate import main as validate_main
        return validate_main(args)
    if args.work_dir or args.calibration:
        raise UsageError("--work-dir and --calibration go with --validate")
    from .report import plots, table, write_json
    from .scenario import SCENARIO_DIR, load, shipped_names
    if args.list:
        for name in shipped_names():
            cfg = load(str(SCENARIO_DIR / f"{name}.toml"))[0]
            print(f"{name:16s} {cfg.values['scenario']['description']}")
        return 0
    if not args.scenario:
        raise UsageError("give a SCENARIO (a .toml file, or a shipped name: mpimig simulate --list)")
    prog = Progress(0, enabled=not args.quiet)
    try:
        rows, pairs, cfgs = run_scenario(args.scenario, args.seed, prog,
                                         args.policy or None, args.strategy or None)
    finally:
        prog.close()
    sweep_keys = list(cfgs[0].sweep_point)
    name = cfgs[0].name
    if args.json:
        print(json.dumps({"scenario": name, "rows": rows}, indent=1))
    else:
        print(f"scenario {name} (seed {rows[0]['seed']}): {cfgs[0].values['scenario']['description']}")
        print(table(rows, sweep_keys))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(rows, out / "results.json", {"scenario": name, "path": cfgs[0].path})
        (out / "table.txt").write_text(table(rows, sweep_keys) + "\n")
        files = plots(pairs, out, name)
        print(f"results, table and {len(files)} plots in {out}", file=sys.stderr)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="simulate policies and migration strategies on a cluster (discrete events)",
        description=__doc__.split("\n\n", 1)[1] if "\n\n" in (__doc__ or "") else None)
    p.add_argument("scenario", nargs="?", metavar="SCENARIO",
                   help="a scenario TOML file, or the name of a shipped one (--list)")
    p.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")
    p.add_argument("--seed", type=int, help="random seed (default: the scenario's)")
    p.add_argument("--out", metavar="DIR", help="write results.json, table.txt and PNG plots here")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.add_argument("--policy", action="append", metavar="SPEC",
                   help="run this policy instead of the scenario's (repeatable)")
    p.add_argument("--strategy", action="append", metavar="NAME",
                   help="run this strategy instead of the scenario's (repeatable; auto = the policy's choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    v = p.add_argument_group("validation against the lab (root)")
    v.add_argument("--validate", action="store_true",
                   help="run SCENARIO (default lab-validate) for real on the lab and in the simulator calibrated "
                        "from a separate calibration run; print real vs simulated per metric, exit 1 if one is "
                        "outside the scenario's bound")
    v.add_argument("--work-dir", metavar="DIR", help="with --validate: keep the real runs' job directories here")
    v.add_argument("--calibration", metavar="FILE",
                   help="with --validate: take the calibration run from this validation.json instead of running it")
    p.set_defaults(func=main)
    return p
