"""Scenarios: TOML files that describe a cluster, its jobs, failures, events and what to compare.

Every key is checked: an unknown key, a wrong type or a value out of range is a
:class:`ScenarioError` that names the key (``jobs.state_mb``) and the file. The
shipped scenarios live in ``mpimig/sim/scenarios/`` (``mpimig simulate --list``);
docs/simulator.md describes every key. A ``[sweep]`` table runs the scenario once
per combination of its values (``"jobs.state_mb" = [16, 1024]``).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import random
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .failures import LIFETIMES, FailureParams
from .model import Cluster, Host, Job, Rank
from .strategies import NAMES as STRATEGY_NAMES
from .strategies import StrategyParams

if sys.version_info >= (3, 11):
    import tomllib
else:                                    # pragma: no cover - Python 3.9/3.10
    import tomli as tomllib

SCENARIO_DIR = Path(__file__).with_name("scenarios")
MiB = 1 << 20


class ScenarioError(UsageError):
    """A scenario file is wrong; the message names the file and the key."""


# key -> (type, default, check or None, help). Types: float, int, bool, str, list.
SCHEMA: dict[str, dict[str, tuple]] = {
    "scenario": {
        "name": (str, "", None, "a short name"),
        "description": (str, "", None, "what it shows"),
        "horizon_s": (float, 86400.0, "pos", "stop then even if jobs are unfinished"),
        "policies": (list, ["none", "greedy"], None, "policy specs (mpimig policy list)"),
        "strategies": (list, ["auto"], None, "migration strategies; auto = the policy's choice"),
        "balance_every_s": (float, 60.0, "pos", "a decision round per job this often"),
        "decide_above_imbalance": (float, 0.0, "nonneg",
                                   "skip a job's round when max/mean compute time is below (0: never skip)"),
        "seed": (int, 1, None, "the default seed"),
    },
    "cluster": {
        "hosts": (int, 4, "pos", "number of hosts (h1 .. hN)"),
        "cores": (int, 2, "pos", "cores per host"),
        "speed": (float, 1.0, "pos", "CPU share per core (1 = a full core)"),
        "mem_gb": (float, 64.0, "pos", "memory per host, GiB"),
        "net_gbps": (float, 8.0, "pos", "network link per host, Gbit/s"),
        "spares_per_host": (int, 0, "nonneg", "warm spare processes per host"),
        "slow_hosts": (list, [], None, "hosts slowed from the start, e.g. ['h3']"),
        "slow_speed": (float, 0.5, "pos", "their speed"),
    },
    "jobs": {
        "count": (int, 1, "pos", "jobs"),
        "ranks": (int, 4, "pos", "ranks per job"),
        "hosts_per_job": (int, 2, "pos", "hosts its ranks start on"),
        "extra_hosts": (int, 0, "nonneg", "more hosts in its allocation (room to move to)"),
        "points": (int, 1000, "pos", "safe points (steps) to do"),
        "work_s": (float, 0.1, "pos", "CPU seconds per point per rank"),
        "work_spread": (float, 0.0, "frac", "ranks' work uniform in work_s * (1 +- spread)"),
        "state_mb": (float, 64.0, "nonneg", "registered state per rank, MiB"),
        "dirty_mb_s": (float, 0.0, "nonneg", "state dirtied per second per rank, MiB/s"),
        "weight": (float, 1.0, "pos", "priority weight of its ranks"),
        "ckpt_every": (int, 50, "pos", "a checkpoint every this many points"),
        "disk_bw_mb_s": (float, 1280.0, "pos", "checkpoint write bandwidth per rank, MB/s"),
        "comm": (str, "ring", ("none", "ring", "pairs"), "communication graph"),
        "comm_kb": (float, 64.0, "nonneg", "KiB sent to each peer per point"),
        "stagger_s": (float, 0.0, "nonneg", "job i starts at i * stagger_s"),
    },
    "drift": {
        "amplitude": (float, 0.0, "nonneg", "a hot region's extra work (1 = twice the work)"),
        "period_s": (float, 3600.0, "pos", "time for the hot region to cross all ranks"),
        "width": (float, 0.1, "pos", "its width, as a fraction of the ranks"),
    },
    "failures": {
        "host_lifetime": (str, "exponential", LIFETIMES, "lifetime distribution"),
        "host_mttf_h": (float, 0.0, "nonneg", "mean time to failure per host, hours (0: none)"),
        "weibull_shape": (float, 0.7, "pos", "Weibull shape k"),
        "repair_h": (float, 1.0, "nonneg", "mean repair time, hours"),
        "rank_mtbf_h": (float, 0.0, "nonneg", "mean time between process crashes per rank, hours (0: none)"),
        "online": (bool, True, None, "online recovery (spares, buddy copies) of a dead rank"),
        "online_s": (float, 0.097, "nonneg", "kill -> resumed online, without the restore"),
        "relaunch_s": (float, 1.6, "nonneg", "kill -> resumed by relaunch, without reading the epoch"),
    },
    "costs": {
        "bench_json": (str, "", None, "mpimig bench migrate --json output to calibrate from"),
        "spawn_s": (float, 0.30, "nonneg", "spawn of a new process"),
        "freeze_s": (float, 0.025, "nonneg", "fixed stop of every move"),
        "storage_gbps": (float, 2.4, "pos", "the file-server's storage node, Gbit/s each way (pipelined)"),
        "precopy_rounds": (int, 8, "pos", "pre-copy's rounds at most"),
    },
    "balancer": {          # mpimig/balance/balancer.py's rules, as the runtime's coordinator sets them
        "margin": (float, 0.2, "nonneg", "a move's predicted gain must exceed (1 + margin) x its cost"),
        "cooldown_s": (float, 10.0, "nonneg", "no move of a rank again (or back) within this long"),
        "max_in_flight": (int, 1, "pos", "migrations at once per job"),
        "min_points": (int, 3, "nonneg", "no move before every rank has passed this many points"),
        "min_gain": (float, 0.05, "nonneg", "a move must cut the step time by this fraction"),
    },
    "lab": {               # only for mpimig simulate --validate (mpimig/sim/validate.py): the real run
        "app": (str, "drift", ("drift", "heat2d"), "the program (mpimig.apps), run with --steps jobs.points"),
        "app_args": (list, [], None, "its arguments besides --steps and --out"),
        "slow_factor": (float, 0.5, "pos", "mpimig lab slow FACTOR of cluster.slow_hosts"),
        "spares": (int, 3, "nonneg", "warm spares, on the last host"),
        "spares_per_host": (int, 0, "nonneg", "warm spares on every host (mpimig run --spares-per-host): moves "
                            "to any host then, each a spare of its target's"),
        "metrics_seconds": (float, 0.5, "pos", "mpimig run --metrics-seconds"),
        "balance_seconds": (float, 1.0, "pos", "mpimig run --balance-seconds"),
        "calib_points": (int, 60, "pos", "the calibration run's points"),
        "valid_runs": (int, 1, "pos", "validation runs: 1, or 2 one after the other (between the calibration runs), "
                       "the real figures pooled over both"),
        "calib_runs": (int, 1, "pos", "calibration runs: 1, or 2, one before and one after the validation run, "
                       "the simulator calibrated from their mean"),
        "calib_move": (str, "20:2:h3", None, "its operator move POINT:RANK:HOST (off a slowed host)"),
        "calib_kill": (str, "45:5", None, "its killed rank POINT:RANK"),
        "calib_more_moves": (list, [], None, "more moves POINT:RANK:HOST after calib_kill (downtime: the median)"),
        "calib_more_kills": (list, [], None, "more killed ranks POINT:RANK after calib_kill (recovery: the median)"),
        "slow_period_ms": (float, 100.0, "pos", "the CFS period of the slowed host's quota (mpimig lab slow)"),
        "bound": (float, 0.15, "pos", "the goal: |simulated - real| / real per metric"),
        "timeout_s": (float, 300.0, "pos", "per real run"),
    },
    "sweep": {},           # "section.key" = [values]
}
EVENT_KEYS: dict[str, tuple] = {
    "at_s": (float, None, "nonneg", "when (seconds; or at_point)"),
    "at_point": (int, -1, None, "when job's progress first reaches this point (instead of at_s)"),
    "slow": (float, 0.0, "pos", "set the hosts' speed"),
    "hosts": (list, [], None, "host names"),
    "kill_rank": (int, -1, None, "kill this rank (of job)"),
    "kill_host": (bool, False, None, "kill the hosts"),
    "drain_fraction": (float, 0.0, "frac", "drain this fraction of the hosts (chosen at random among busy ones)"),
    "drain": (bool, False, None, "drain the hosts"),
    "duration_s": (float, 0.0, "nonneg", "end of the drain after this long (0: never)"),
    "job": (int, 0, "nonneg", "the job of kill_rank / move_rank"),
    "move_rank": (int, -1, None, "an operator moves this rank to hosts[0]"),
}


@dataclasses.dataclass
class Event:
    at_s: float          # when, or -1 with at_point
    kind: str            # slow | kill-rank | kill-host | drain | move
    hosts: list = dataclasses.field(default_factory=list)
    value: float = 0.0
    job: int = 0
    rank: int = -1
    fraction: float = 0.0
    duration_s: float = 0.0
    at_point: int = -1   # >= 0: when job ``job`` first reaches this point (as mpimig run --migrate STEP:...)


@dataclasses.dataclass
class Drift:
    amplitude: float = 0.0
    period_s: float = 3600.0
    width: float = 0.1


@dataclasses.dataclass
class Config:
    """One scenario with one sweep point applied, ready to build."""
    path: str
    values: dict[str, dict[str, Any]]
    events: list[Event]
    sweep_point: dict[str, Any]

    def get(self, key: str) -> Any:
        sec, k = key.split(".")
        return self.values[sec][k]

    @property
    def name(self) -> str:
        return self.values["scenario"]["name"] or Path(self.path).stem

    @property
    def horizon_s(self) -> float:
        return self.get("scenario.horizon_s")

    @property
    def balance_every_s(self) -> float:
        return self.get("scenario.balance_every_s")

    @property
    def decide_above_imbalance(self) -> float:
        return self.get("scenario.decide_above_imbalance")

    @property
    def balancer_args(self) -> dict[str, Any]:
        return dict(self.values["balancer"])

    @property
    def drift(self) -> Drift:
        return Drift(**self.values["drift"])

    @property
    def failures(self) -> FailureParams:
        f = self.values["failures"]
        return FailureParams(host_lifetime=f["host_lifetime"], host_mttf_s=f["host_mttf_h"] * 3600,
                             weibull_shape=f["weibull_shape"], repair_s=f["repair_h"] * 3600,
                             rank_mtbf_s=f["rank_mtbf_h"] * 3600, online=f["online"], online_s=f["online_s"],
                             relaunch_s=f["relaunch_s"], spawn_s=self.get("costs.spawn_s"))

    @property
    def strategy_params(self) -> StrategyParams:
        c = self.values["costs"]
        p = StrategyParams.from_bench_json(c["bench_json"]) if c["bench_json"] else StrategyParams()
        p.spawn_s = c["spawn_s"]
        if not c["bench_json"]:
            p.freeze_s = c["freeze_s"]
            p.storage_write_bw = p.storage_read_bw = c["storage_gbps"] * 1e9 / 8
        p.precopy_max_rounds = c["precopy_rounds"]
        return p

    def cost_model(self):
        """The policies' cost model (mpimig/balance/cost.py): from the same bench JSON, else its defaults."""
        from ..balance.cost import CostModel
        c = self.values["costs"]
        return CostModel.from_bench_json(c["bench_json"]) if c["bench_json"] else CostModel.default()


def _check(where: str, key: str, spec: tuple, value: Any) -> Any:
    typ, _default, check, _help = spec
    name = f"{where}.{key}" if where else key
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ScenarioError(f"{name}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    if check == "pos" and not value > 0:
        raise ScenarioError(f"{name}: must be > 0, got {value!r}")
    if check == "nonneg" and value < 0:
        raise ScenarioError(f"{name}: must be >= 0, got {value!r}")
    if check == "frac" and not 0 <= value <= 1:
        raise ScenarioError(f"{name}: must be between 0 and 1, got {value!r}")
    if isinstance(check, tuple) and value not in check:
        raise ScenarioError(f"{name}: {value!r} is not one of {', '.join(check)}")
    return value


def _values(raw: dict) -> dict[str, dict[str, Any]]:
    unknown = sorted(set(raw) - set(SCHEMA) - {"events"})
    if unknown:
        raise ScenarioError(f"unknown section [{unknown[0]}] (known: {', '.join(SCHEMA)}, [[events]])")
    out: dict[str, dict[str, Any]] = {}
    for sec, keys in SCHEMA.items():
        given = raw.get(sec, {})
        if not isinstance(given, dict):
            raise ScenarioError(f"{sec}: expected a table [{sec}], got {type(given).__name__}")
        if sec == "sweep":
            out[sec] = dict(given)
            continue
        bad = sorted(set(given) - set(keys))
        if bad:
            raise ScenarioError(f"{sec}.{bad[0]}: unknown key (known in [{sec}]: {', '.join(keys)})")
        out[sec] = {k: _check(sec, k, spec, given[k]) if k in given else copy.copy(spec[1])
                    for k, spec in keys.items()}
    return out


def _events(raw: list, values: dict) -> list[Event]:
    if not isinstance(raw, list):
        raise ScenarioError("events: expected [[events]] tables")
    out = []
    for i, e in enumerate(raw):
        where = f"events[{i}]"
        if not isinstance(e, dict):
            raise ScenarioError(f"{where}: expected a table")
        bad = sorted(set(e) - set(EVENT_KEYS))
        if bad:
            raise ScenarioError(f"{where}.{bad[0]}: unknown key (known: {', '.join(EVENT_KEYS)})")
        if ("at_s" in e) == ("at_point" in e):
            raise ScenarioError(f"{where}.at_s: give exactly one of at_s, at_point (when the event happens)")
        v: dict[str, Any] = {k: _check(where, k, spec, e[k]) if k in e else copy.copy(spec[1])
                             for k, spec in EVENT_KEYS.items()}
        if "at_point" in e and not 0 <= v["at_point"] < values["jobs"]["points"]:
            raise ScenarioError(f"{where}.at_point: {v['at_point']} is not a point of the job "
                                f"(0 .. {values['jobs']['points'] - 1})")
        kinds = [k for k in ("slow", "kill_rank", "kill_host", "drain", "drain_fraction", "move_rank")
                 if k in e and e[k] is not False and not (type(e[k]) is int and e[k] == -1)]   # rank 0 is not False
        if len(kinds) != 1:
            raise ScenarioError(f"{where}: give exactly one of slow, kill_rank, kill_host, drain, drain_fraction, "
                                f"move_rank (got {', '.join(kinds) or 'none'})")
        kind = kinds[0]
        n_hosts = values["cluster"]["hosts"]
        for h in v["hosts"]:
            if not (isinstance(h, str) and h.startswith("h") and h[1:].isdigit() and 1 <= int(h[1:]) <= n_hosts):
                raise ScenarioError(f"{where}.hosts: {h!r} is not a host of the cluster (h1 .. h{n_hosts})")
        if kind in ("slow", "kill_host", "drain", "move_rank") and not v["hosts"]:
            raise ScenarioError(f"{where}.hosts: {kind} needs the hosts it applies to")
        if kind in ("kill_rank", "move_rank"):
            if v["job"] >= values["jobs"]["count"]:
                raise ScenarioError(f"{where}.job: {v['job']} is not a job (0 .. {values['jobs']['count'] - 1})")
            if not 0 <= v[kind] < values["jobs"]["ranks"]:
                raise ScenarioError(f"{where}.{kind}: {v[kind]} is not a rank (0 .. {values['jobs']['ranks'] - 1})")
        out.append(Event(
            at_s=-1.0 if v["at_s"] is None else v["at_s"], at_point=v["at_point"], hosts=list(v["hosts"]),
            value=v["slow"], job=v["job"], duration_s=v["duration_s"],
            kind={"slow": "slow", "kill_rank": "kill-rank", "kill_host": "kill-host", "drain": "drain",
                  "drain_fraction": "drain", "move_rank": "move"}[kind],
            rank=v["kill_rank"] if kind == "kill_rank" else v["move_rank"], fraction=v["drain_fraction"]))
    return out


def _check_names(values: dict) -> None:
    from ..balance.policies import parse
    pols = values["scenario"]["policies"]
    if not pols:
        raise ScenarioError("scenario.policies: empty")
    for p in pols:
        if not isinstance(p, str):
            raise ScenarioError(f"scenario.policies: {p!r} is not a policy spec string")
        try:
            parse(p)
        except Exception as exc:     # the registry's own error says what is wrong with the spec
            raise ScenarioError(f"scenario.policies: {p!r}: {exc}") from None
    strategies = values["scenario"]["strategies"]
    for s in strategies:
        if s != "auto" and s not in STRATEGY_NAMES:
            raise ScenarioError(f"scenario.strategies: {s!r} is not one of auto, {', '.join(STRATEGY_NAMES)}")
    if not strategies:
        raise ScenarioError("scenario.strategies: empty")
    j, c = values["jobs"], values["cluster"]
    need = j["count"] * (j["hosts_per_job"] + j["extra_hosts"])
    if need > c["hosts"]:
        raise ScenarioError(f"cluster.hosts: {c['hosts']} hosts, but jobs.count x (jobs.hosts_per_job + "
                            f"jobs.extra_hosts) = {need}")
    for h in c["slow_hosts"]:
        if not (isinstance(h, str) and h[1:].isdigit() and 1 <= int(h[1:]) <= c["hosts"]):
            raise ScenarioError(f"cluster.slow_hosts: {h!r} is not a host of the cluster (h1 .. h{c['hosts']})")


def load(path: str) -> list[Config]:
    """The scenario at ``path`` (or a shipped one by name), one Config per sweep point.

    Raises:
        ScenarioError: the file cannot be read or parsed, or a key is wrong (the message names it).
    """
    p = resolve(path)
    try:
        raw = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from None
    try:
        return configs(raw, str(p))
    except ScenarioError as exc:
        raise ScenarioError(f"{p}: {exc}") from None


def configs(raw: dict, path: str = "<scenario>") -> list[Config]:
    """Check ``raw`` (a parsed scenario) and expand its sweep."""
    values = _values(raw)
    sweep = values.pop("sweep")
    axes = []
    for key, vals in sweep.items():
        sec, _, k = key.partition(".")
        if sec not in SCHEMA or sec == "sweep" or k not in SCHEMA[sec]:
            raise ScenarioError(f"sweep.{key}: not a scenario key (write section.key, e.g. jobs.state_mb)")
        if not isinstance(vals, list) or not vals:
            raise ScenarioError(f"sweep.{key}: expected a non-empty list of values")
        axes.append([(sec, k, _check(f"sweep.{key}", "", SCHEMA[sec][k], v)) for v in vals])
    out = []
    for combo in itertools.product(*axes) if axes else [()]:
        v = copy.deepcopy(values)
        for sec, k, val in combo:
            v[sec][k] = val
        _check_names(v)
        out.append(Config(path=path, values=v, events=_events(raw.get("events", []), v),
                          sweep_point={f"{s}.{k}": val for s, k, val in combo}))
    return out


def resolve(path: str) -> Path:
    p = Path(path)
    if p.exists():
        return p
    shipped = SCENARIO_DIR / (path if path.endswith(".toml") else path + ".toml")
    if shipped.exists():
        return shipped
    raise ScenarioError(f"{path}: no such file, and not a shipped scenario ({', '.join(shipped_names())})")


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def build_cluster(cfg: Config, rng: random.Random) -> Cluster:
    """Hosts h1..hN and the jobs, each on a block of hosts plus its extra hosts."""
    c, j = cfg.values["cluster"], cfg.values["jobs"]
    slow = set(c["slow_hosts"])
    hosts = [Host(name=f"h{i}", cores=c["cores"], speed=c["slow_speed"] if f"h{i}" in slow else c["speed"],
                  mem=int(c["mem_gb"] * (1 << 30)), net_bw=c["net_gbps"] * 1e9 / 8, spares=c["spares_per_host"])
             for i in range(1, c["hosts"] + 1)]
    cl = Cluster(hosts)
    names = [h.name for h in hosts]
    per = j["hosts_per_job"] + j["extra_hosts"]
    state = int(j["state_mb"] * MiB)
    dirty = j["dirty_mb_s"] * MiB
    comm = j["comm_kb"] * 1024
    for jid in range(j["count"]):
        alloc = names[jid * per:(jid + 1) * per]
        start = alloc[:j["hosts_per_job"]]
        n = j["ranks"]
        ranks = []
        for i in range(n):
            w = j["work_s"] * (1 + j["work_spread"] * rng.uniform(-1, 1))
            peers: dict[int, float] = {}
            if j["comm"] == "ring" and n > 1:
                peers = {(i - 1) % n: comm, (i + 1) % n: comm}
            elif j["comm"] == "pairs" and n > 1:
                peers = {i ^ 1: comm} if (i ^ 1) < n else {}
            ranks.append(Rank(rank=i, host="", work=w, base_work=w, state_bytes=state, dirty_rate=dirty,
                              weight=j["weight"], peers=peers))
        t0 = jid * j["stagger_s"]
        ckpt_s = state / (j["disk_bw_mb_s"] * 1e6) + 0.01
        job = Job(id=jid, ranks=ranks, total=j["points"], ckpt_every=j["ckpt_every"], ckpt_s=ckpt_s,
                  alloc=list(alloc), weight=j["weight"], started=t0, t_last=t0)
        if t0 > 0:
            job.pause(0.0, t0)
        cl.jobs[jid] = job
        for name in alloc:
            cl.hosts[name].owner = jid
        for i, r in enumerate(ranks):            # blocks of consecutive ranks per host
            cl.place(job, r, start[i * len(start) // n])
        comm_t = max(cl.comm_times(job), default=0.0)
        job.ideal_step_s = max(r.base_work for r in ranks) + comm_t + ckpt_s / job.ckpt_every
    return cl


def describe(key: str | None = None) -> str:
    """Every key with its default and meaning (docs/simulator.md is generated from the same table)."""
    lines = []
    for sec, keys in SCHEMA.items():
        if key and sec != key:
            continue
        lines.append(f"[{sec}]")
        for k, (typ, default, _c, help_) in keys.items():
            lines.append(f"  {k} = {default!r}  ({typ.__name__}) {help_}")
    return "\n".join(lines)
