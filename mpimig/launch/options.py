"""The options of ``mpimig run`` and their checks.

:func:`add_run_arguments` declares the options (also taken by ``mpimig inject``),
:func:`run_argv` gives them back as arguments, and :func:`job_config` checks them
and turns them into the job's :class:`~mpimig.launch.config.Config` (a
:class:`~mpimig.errors.UsageError` in one line for a bad value), with
:func:`check_schedule`, :func:`check_policy` and :func:`check_incremental`. Nothing
here starts a process (:mod:`mpimig.launch.launcher` does).
"""
from __future__ import annotations

import argparse
import os
import socket
import uuid
from pathlib import Path

from ..errors import MpimigError, UsageError
from .config import RESTART_MODES, Config, parse_schedule


def host_names(spec: str | None) -> list[str]:
    """Host names of a ``h1:2,h2:2`` spec."""
    return [h.split(":")[0] for h in (spec or "").split(",") if h.strip()]


def job_config(args) -> Config:
    """The job configuration ``mpimig run`` hands to the ranks, from its options."""
    if args.n < 1:
        raise UsageError("-n must be at least 1")
    if args.ckpt_every < 0:
        raise UsageError(f"--ckpt-every {args.ckpt_every}: N must be >= 1 (or 0: off)")
    if not args.ckpt_seconds >= 0:
        raise UsageError(f"--ckpt-seconds {args.ckpt_seconds:g}: S must be > 0 (or 0: off)")
    if getattr(args, "timeout", None) is not None and not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout:g}: must be > 0 seconds")
    job_dir = Path(args.job_dir or Path("mpimig-jobs") / Path(args.program).stem).resolve()
    cfg = Config(
        job_dir=job_dir,
        ckpt_dir=Path(args.ckpt_dir).resolve() if args.ckpt_dir else job_dir / "ckpt",
        ckpt_every=args.ckpt_every,
        ckpt_seconds=args.ckpt_seconds,
        keep=args.keep,
        ckpt_async=args.ckpt_async,
        ckpt_incremental=args.ckpt_incremental,
        restart=args.restart,
        run_id=uuid.uuid4().hex[:12],
        schedule=parse_schedule(args.migrate),
    )
    if args.spares < 0:
        raise UsageError("--spares must be >= 0")
    cfg.spares = args.spares
    if args.spares_per_host is not None and args.spares_per_host < 0:
        raise UsageError("--spares-per-host must be >= 0")
    cfg.spares_per_host = args.spares_per_host
    cfg.ft = args.ft
    cfg.buddy = not args.no_buddy
    cfg.policy = check_policy(args.policy or os.environ.get("MPIMIG_POLICY", ""))
    for name in ("metrics_seconds", "balance_seconds"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0")
        setattr(cfg, name, getattr(args, name))
    if args.cost_json:
        from ..balance.cost import CostModel
        CostModel.from_bench_json(args.cost_json)        # a UsageError naming the file if it is not one
        cfg.cost_json = str(Path(args.cost_json).resolve())
    cfg.coordinator = (bool(cfg.schedule) or args.coordinator or args.spares > 0 or bool(args.spares_per_host)
                       or args.ft or bool(cfg.policy))
    if cfg.keep < 1:
        raise UsageError("--keep must be at least 1")
    if cfg.ckpt_async and cfg.ft:
        raise UsageError("--ckpt-async does not combine with --ft (online recovery keeps its in-memory copies "
                         "of the epoch being written): leave one out")
    check_incremental(cfg)
    return cfg


def check_incremental(cfg: Config) -> None:
    """``--ckpt-incremental K``: a whole number, and not with what it cannot serve."""
    if cfg.ckpt_incremental < 0:
        raise UsageError(f"--ckpt-incremental {cfg.ckpt_incremental}: K must be >= 1 (or 0: off)")
    if cfg.ckpt_incremental and cfg.ckpt_async:
        raise UsageError("--ckpt-incremental does not combine with --ckpt-async (the background write takes a "
                         "copy of the whole state, which is what an incremental epoch avoids): leave one out")


def check_policy(spec: str) -> str:
    """``--policy NAME[:k=v,...]`` checked against the registry (a UsageError in one line), or ""."""
    spec = spec.strip()
    if not spec:
        return ""
    from ..balance import policies
    try:
        policies.parse(spec)
    except (ValueError, KeyError, TypeError, MpimigError) as exc:
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        raise UsageError(f"--policy {spec}: {' '.join(msg.split())}") from None
    return spec


def check_schedule(cfg: Config, n: int, hosts: str | None) -> None:
    """Every ``--migrate`` entry names an existing rank and one of the job's hosts: one in
    ``--hosts``, or without it this host (where the whole job runs), and a name that resolves."""
    allowed = host_names(hosts)
    here = socket.gethostname()
    for entry in cfg.schedule:
        spec = f"--migrate {':'.join(map(str, entry))}"
        host = entry[2]
        if entry[1] >= n:
            raise UsageError(f"{spec}: rank {entry[1]} does not exist (the job has ranks 0..{n - 1})")
        if allowed and host not in allowed:
            raise UsageError(f"{spec}: host {host} is not in --hosts ({', '.join(allowed)})")
        if not allowed and host != here:
            raise UsageError(f"{spec}: host {host} is not one of the job's hosts: without --hosts the "
                             f"job runs on this host only ({here})")
        try:
            socket.getaddrinfo(host, None)
        except OSError as exc:
            raise UsageError(f"{spec}: host {host} does not resolve ({exc.strerror or exc})") from None


def add_run_arguments(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options of ``mpimig run`` (also taken by ``mpimig inject``); returns
    the actions added, for :func:`run_argv`. Parsers that take them need
    ``allow_abbrev=False``: the program's own options (--n 64) must never match ours."""
    before = len(p._actions)
    p.add_argument("-n", "--np", dest="n", type=int, required=True, help="number of ranks")
    p.add_argument("--hosts", help="host list, e.g. h1:2,h2:2 (lab hosts or cluster nodes)")
    p.add_argument("--job-dir", help="job directory (default mpimig-jobs/<program name>)")
    p.add_argument("--ckpt-dir", help="checkpoint directory (default JOB_DIR/ckpt)")
    p.add_argument("--ckpt-every", type=int, default=0, metavar="N",
                   help="checkpoint every N checkpoint points (default: off)")
    p.add_argument("--ckpt-seconds", type=float, default=0.0, metavar="S",
                   help="checkpoint every S seconds (default: off)")
    p.add_argument("--keep", type=int, default=2, help="committed epochs to keep (default 2)")
    p.add_argument("--ckpt-async", action="store_true",
                   help="asynchronous checkpoints: a rank is blocked only while its state is copied (a "
                        "snapshot); the file is written in the background and the epoch is voted on and "
                        "committed at a later checkpoint point. Costs memory for a copy of the state, "
                        "and an epoch commits some points later (docs/protocol.md, \"Asynchronous "
                        "checkpoints\"). Not with --ft")
    p.add_argument("--ckpt-incremental", type=int, default=0, metavar="K",
                   help="incremental checkpoints: an epoch writes only the chunks written since the previous one "
                        "(found by the kernel's write tracking, userfaultfd; by chunk CRCs where that is "
                        "unavailable or MPIMIG_WTRACK=off), and every K-th epoch is full; a restart assembles an "
                        "epoch from its chain and refuses a broken one, naming the link. --keep then keeps the "
                        "last epochs and the links they are assembled from. Not with --ckpt-async; a restart on "
                        "another number of ranks needs a full epoch (docs/checkpoint-format.md)")
    p.add_argument("--restart", choices=RESTART_MODES, default="auto", help="restart policy (below)")
    p.add_argument("--migrate", action="append", metavar="STEP:RANK:HOST[:STRATEGY]",
                   help="migrate RANK to HOST at checkpoint point STEP (repeatable); STRATEGY: "
                        "stop-and-copy (default), pre-copy, post-copy or file-server. HOST must be in "
                        "--hosts (without it: this host); an entry the job does not carry out is "
                        "named in a warning at the end")
    p.add_argument("--coordinator", action="store_true",
                   help="start the coordinator even without a schedule (for mpimig migrate)")
    p.add_argument("--spares", type=int, default=0, metavar="K",
                   help="start K warm spare processes with the job (placed after the ranks on the "
                        "host list); a migration to a spare's host uses it instead of spawning; where no "
                        "spawn is allowed (Open MPI over several hosts), a moved rank's old process refills "
                        "its host's spares up to the number it started with")
    p.add_argument("--spares-per-host", type=int, default=None, metavar="K",
                   help="start K warm spares on EVERY host of --hosts; a moved rank's old process stays as "
                        "its host's spare, so moves between hosts never spawn (default: 1 with Open MPI over "
                        "several hosts and a coordinator, where spawning onto another host loses the job; 0 "
                        "otherwise, under Slurm and with --ft; docs/spawn.md)")
    p.add_argument("--ft", action="store_true",
                   help="online recovery from failed ranks and coordinator (Open MPI ULFM): revoke, "
                        "shrink, replace (warm spare or spawn), roll back to the last committed epoch; "
                        "with MPICH, which has none, relaunch is used instead (--relaunch, default 3)")
    p.add_argument("--no-buddy", action="store_true",
                   help="with --ft: keep no in-memory copies of checkpoints (own and buddy's); "
                        "recovery then reads the disk epoch")
    p.add_argument("--policy", metavar="NAME[:k=v,...]",
                   help="let a balancer move ranks by itself with this policy (mpimig policy list; also "
                        "MPIMIG_POLICY): the ranks report metrics to the coordinator, which decides every "
                        "--balance-seconds; implies --coordinator; 'none' meters and never moves")
    p.add_argument("--metrics-seconds", type=float, default=1.0, metavar="S",
                   help="with --policy: each rank sends its metric report every S seconds (default 1)")
    p.add_argument("--balance-seconds", type=float, default=2.0, metavar="S",
                   help="with --policy: the balancer decides every S seconds (default 2)")
    p.add_argument("--cost-json", metavar="FILE",
                   help="with --policy: seed the balancer's migration cost model from `mpimig bench migrate "
                        "[--strategies ...] --json FILE` output, or from an earlier `mpimig bench balance --json "
                        "FILE` (its moves are replayed) (default: figures measured on the test machines)")
    p.add_argument("--relaunch", type=int, default=0, metavar="K",
                   help="if the job does not complete (a host died, a rank was killed), relaunch it up to K times "
                        "on the hosts that still answer, from the last committed epoch")
    p.add_argument("--timeout", type=float, help="kill the job after this many seconds")
    p.add_argument("--mpiexec-arg", action="append", metavar="ARG", help="extra mpiexec argument")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("program", help="the program: a .py file (run through python -m mpimig.boot: its "
                                   "MPI.COMM_WORLD is the logical world; docs/porting.md) or an executable")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the program's arguments")
    return p._actions[before:]


def run_argv(args: argparse.Namespace, actions: list[argparse.Action]) -> list[str]:
    """The ``mpimig run`` arguments that give ``args`` (the values of ``actions``)."""
    out: list[str] = []
    positional: list[str] = []
    for a in actions:
        v = getattr(args, a.dest)
        if not a.option_strings:
            positional += [v] if isinstance(v, str) else list(v or [])
            continue
        opt = a.option_strings[-1] if a.option_strings[-1].startswith("--") else a.option_strings[0]
        if isinstance(a, argparse._StoreTrueAction):
            out += [opt] if v else []
        elif isinstance(a, argparse._AppendAction):
            for item in v or []:
                out += [opt, str(item)]
        elif v is not None and v != a.default or a.required:
            out += [opt, str(v)]
    return out + [str(x) for x in positional]
