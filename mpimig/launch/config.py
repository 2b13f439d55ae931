"""Job configuration handed from ``mpimig run`` to the ranks through the environment.

Plain ``mpiexec -n 4 python app.py`` works too: with no ``MPIMIG_*`` variables
the job runs without checkpoints, unless the program sets them itself.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Union

from ..errors import UsageError
from ..migration.protocol import check_strategy

RESTART_MODES = ("auto", "always", "never")

# (checkpoint point, rank, host) or (point, rank, host, strategy)
ScheduleEntry = Union[tuple[int, int, str], tuple[int, int, str, str]]


def parse_schedule(items) -> list[ScheduleEntry]:
    """Parse ``STEP:RANK:HOST[:STRATEGY]`` migration schedule entries."""
    out: list[ScheduleEntry] = []
    for item in items or []:
        for part in str(item).replace(",", " ").split():
            bits = part.split(":")
            if len(bits) not in (3, 4) or not bits[0].isdigit() or not bits[1].isdigit() or not bits[2]:
                raise UsageError(f"bad migration schedule entry {part!r}: expected STEP:RANK:HOST[:STRATEGY]")
            point, rank, host = int(bits[0]), int(bits[1]), bits[2]
            if len(bits) == 3:
                out.append((point, rank, host))
                continue
            err = check_strategy(bits[3])
            if err:
                raise UsageError(f"bad migration schedule entry {part!r}: {err}")
            out.append((point, rank, host, bits[3]))
    return out


@dataclasses.dataclass
class Config:
    job_dir: Path | None = None
    ckpt_dir: Path | None = None
    ckpt_every: int = 0            # checkpoint every N checkpoint points (0: off)
    ckpt_seconds: float = 0.0      # or every S seconds (rank 0's clock, agreed by all)
    keep: int = 2                  # committed epochs kept
    ckpt_async: bool = False       # snapshot at the point, write/vote/commit later (mpimig.ckpt_async)
    ckpt_incremental: int = 0      # incremental epochs, a full one every K (0: off; mpimig.checkpoint.incremental)
    restart: str = "auto"          # auto | always | never
    run_id: str = ""
    schedule: list = dataclasses.field(default_factory=list)   # [(point, rank, host[, strategy])]
    coordinator: bool = False
    spares: int = 0                # warm spare processes started with the job
    spares_per_host: int | None = None   # warm spares started on EVERY host (None: the default, docs/spawn.md)
    spare_world: tuple = ()        # world ranks that are warm spares (empty: the last `spares` ones)
    ft: bool = False               # online recovery (ULFM): implies a coordinator
    buddy: bool = True             # with ft: in-memory own + buddy copies at each checkpoint
    policy: str = ""               # NAME[:k=v,...] (mpimig.balance.policies): implies a coordinator and metering
    metrics_seconds: float = 1.0   # with a policy: each rank reports its metrics this often
    balance_seconds: float = 2.0   # with a policy: the coordinator decides this often
    cost_json: str = ""            # with a policy: `mpimig bench migrate --json` output seeding the cost model

    @classmethod
    def from_env(cls, env=None) -> Config:
        env = os.environ if env is None else env
        job_dir = env.get("MPIMIG_JOB_DIR")
        ckpt_dir = env.get("MPIMIG_CKPT_DIR") or (str(Path(job_dir) / "ckpt") if job_dir else None)
        restart = env.get("MPIMIG_RESTART", "auto")
        if restart not in RESTART_MODES:
            raise UsageError(f"MPIMIG_RESTART={restart!r}: expected one of {', '.join(RESTART_MODES)}")
        sched = parse_schedule([env.get("MPIMIG_MIGRATE", "")])
        cfg = cls(
            job_dir=Path(job_dir) if job_dir else None,
            ckpt_dir=Path(ckpt_dir) if ckpt_dir else None,
            ckpt_every=int(env.get("MPIMIG_CKPT_EVERY", "0") or 0),
            ckpt_seconds=float(env.get("MPIMIG_CKPT_SECONDS", "0") or 0),
            keep=int(env.get("MPIMIG_KEEP", "2") or 2),
            ckpt_async=env.get("MPIMIG_CKPT_ASYNC", "0") == "1",
            ckpt_incremental=_count(env, "MPIMIG_CKPT_INCREMENTAL"),
            restart=restart,
            run_id=env.get("MPIMIG_RUN_ID", ""),
            schedule=sched,
            coordinator=env.get("MPIMIG_COORDINATOR", "0") == "1" or bool(sched)
            or int(env.get("MPIMIG_SPARES", "0") or 0) > 0,
            spares=int(env.get("MPIMIG_SPARES", "0") or 0),
            spare_world=tuple(int(x) for x in env.get("MPIMIG_SPARE_WORLD", "").split(",") if x.strip()),
            ft=env.get("MPIMIG_FT", "0") == "1",
            buddy=env.get("MPIMIG_BUDDY", "1") != "0",
            policy=env.get("MPIMIG_POLICY", ""),
            metrics_seconds=_seconds(env, "MPIMIG_METRICS_SECONDS", 1.0),
            balance_seconds=_seconds(env, "MPIMIG_BALANCE_SECONDS", 2.0),
            cost_json=env.get("MPIMIG_COST_JSON", ""),
        )
        if cfg.ft or cfg.policy:
            cfg.coordinator = True
        return cfg

    def to_env(self) -> dict:
        env = {}
        if self.job_dir:
            env["MPIMIG_JOB_DIR"] = str(self.job_dir)
        if self.ckpt_dir:
            env["MPIMIG_CKPT_DIR"] = str(self.ckpt_dir)
        env["MPIMIG_CKPT_EVERY"] = str(self.ckpt_every)
        env["MPIMIG_CKPT_SECONDS"] = str(self.ckpt_seconds)
        env["MPIMIG_KEEP"] = str(self.keep)
        env["MPIMIG_CKPT_ASYNC"] = "1" if self.ckpt_async else "0"
        env["MPIMIG_CKPT_INCREMENTAL"] = str(self.ckpt_incremental)
        env["MPIMIG_RESTART"] = self.restart
        env["MPIMIG_RUN_ID"] = self.run_id
        if self.schedule:
            env["MPIMIG_MIGRATE"] = " ".join(":".join(map(str, s)) for s in self.schedule)
        env["MPIMIG_COORDINATOR"] = "1" if self.coordinator else "0"
        env["MPIMIG_SPARES"] = str(self.spares)
        if self.spare_world:
            env["MPIMIG_SPARE_WORLD"] = ",".join(map(str, self.spare_world))
        env["MPIMIG_FT"] = "1" if self.ft else "0"
        env["MPIMIG_BUDDY"] = "1" if self.buddy else "0"
        if self.policy:
            env["MPIMIG_POLICY"] = self.policy
            env["MPIMIG_METRICS_SECONDS"] = str(self.metrics_seconds)
            env["MPIMIG_BALANCE_SECONDS"] = str(self.balance_seconds)
            if self.cost_json:
                env["MPIMIG_COST_JSON"] = self.cost_json
        return env


def _seconds(env, name: str, default: float) -> float:
    """A positive number of seconds from the environment, or a UsageError naming the variable."""
    text = env.get(name, "")
    if not text:
        return default
    try:
        val = float(text)
    except ValueError:
        raise UsageError(f"{name}={text!r}: expected a number of seconds") from None
    if not val > 0:
        raise UsageError(f"{name}={text!r}: must be > 0")
    return val


def _count(env, name: str) -> int:
    """A count >= 0 from the environment (empty: 0), or a UsageError naming the variable."""
    text = env.get(name, "").strip()
    if not text:
        return 0
    if not text.isdigit():
        raise UsageError(f"{name}={text!r}: expected a whole number >= 0")
    return int(text)
