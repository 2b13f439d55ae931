"""The Slurm job we run in, read in one place.

Everything mpimig needs to know about a Slurm allocation comes from here: the
job id, its nodes (from ``SLURM_JOB_NODELIST``, hostlist syntax expanded),
which nodes are down or draining (``sinfo``), which are spare (in the
allocation but not used by ranks), how much time is left (``squeue %L``, or
``SLURM_JOB_END_TIME``), how often the job was requeued
(``SLURM_RESTART_COUNT``), and the ``mpiexec`` arguments that place ranks on
the usable nodes while keeping spare nodes listed (Open MPI spawns with
``host=X`` only onto hosts given to ``--host``).

The hostlist functions are pure: ``expand_hostlist('n[01-03],m4')`` ->
``['n01', 'n02', 'n03', 'm4']`` and ``compress_hostlist`` the other way.

Typical use in a launcher::

    job = SlurmJob.from_env()                  # raises SlurmError outside a job
    plan = job.plan(ranks_per_node=2, n_nodes=3)   # spare nodes: the rest
    cmd = ["mpiexec", *plan.mpiexec_args("openmpi"), "python", "app.py"]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping, Sequence

from ..errors import LaunchError


class SlurmError(LaunchError):
    """Not in a Slurm job, a malformed SLURM_* value, or a Slurm command that failed."""


# --------------------------------------------------------------------------- hostlists

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    """Split on commas (and whitespace) that are not inside brackets."""
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmError(f"hostlist {text!r}: ']' without '['")
        if depth == 0 and (ch == "," or ch.isspace()):
            if cur:
                items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if depth != 0:
        raise SlurmError(f"hostlist {text!r}: '[' without ']'")
    if cur:
        items.append("".join(cur))
    return items


def _expand_ranges(body: str, whole: str) -> list[str]:
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise SlurmError(f"hostlist {whole!r}: bad range {part!r} (want N or N-M)")
        lo_s, hi_s = m.group(1), m.group(2)
        lo = int(lo_s)
        hi = int(hi_s) if hi_s is not None else lo
        if hi < lo:
            raise SlurmError(f"hostlist {whole!r}: range {part!r} runs backwards")
        if hi - lo > 1_000_000:
            raise SlurmError(f"hostlist {whole!r}: range {part!r} is too large")
        width = len(lo_s)  # Slurm pads to the width of the lower bound: [01-10]
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


def _expand_item(item: str, whole: str) -> list[str]:
    pieces: list[list[str]] = []
    pos = 0
    for m in re.finditer(r"\[([^\[\]]*)\]", item):
        pieces.append([item[pos:m.start()]])
        pieces.append(_expand_ranges(m.group(1), whole))
        pos = m.end()
    pieces.append([item[pos:]])
    if any("[" in p or "]" in p for group in pieces[::2] for p in group):
        raise SlurmError(f"hostlist {whole!r}: nested or unbalanced brackets in {item!r}")
    return ["".join(combo) for combo in itertools.product(*pieces)]


def expand_hostlist(text: str) -> list[str]:
    """Expand Slurm hostlist syntax, keeping order and duplicates as written.

    >>> expand_hostlist("n[1-3,5],m[01-02]")
    ['n1', 'n2', 'n3', 'n5', 'm01', 'm02']
    """
    if text is None:
        return []
    out: list[str] = []
    for item in _split_top(text.strip()):
        out.extend(_expand_item(item, text))
    return out


_TAIL_NUM = re.compile(r"^(.*?)(\d+)(\D*)$")


def compress_hostlist(names: Iterable[str]) -> str:
    """The shortest-ish hostlist string for ``names`` (duplicates dropped).

    Names are grouped by prefix and suffix around their last number; each
    group keeps the order of its first appearance and its numbers are sorted,
    so ``expand_hostlist(compress_hostlist(x))`` has the same set as ``x``.

    >>> compress_hostlist(["n1", "n2", "n3", "n5", "m01", "m02"])
    'n[1-3,5],m[01-02]'
    """
    groups: dict[tuple, list[str]] = {}   # (prefix, suffix) -> numbers; (name, None) -> literal
    for name in dict.fromkeys(names):
        m = _TAIL_NUM.match(name)
        key = (m.group(1), m.group(3)) if m else (name, None)
        groups.setdefault(key, [])
        if m:
            groups[key].append(m.group(2))
    parts = []
    for (prefix, suffix), numbers in groups.items():
        if suffix is None:
            parts.append(prefix)
            continue
        nums = sorted(set(numbers), key=lambda s: (int(s), len(s)))
        runs: list[list[str]] = []
        for s in nums:
            if runs:
                run = runs[-1]
                last = run[-1]
                if int(s) == int(last) + 1 and str(int(s)).zfill(len(run[0])) == s:
                    run.append(s)
                    continue
            runs.append([s])
        if len(runs) == 1 and len(runs[0]) == 1:
            parts.append(f"{prefix}{runs[0][0]}{suffix}")
            continue
        body = ",".join(r[0] if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
        parts.append(f"{prefix}[{body}]{suffix}")
    return ",".join(parts)


def expand_counts(text: str) -> list[int]:
    """Expand Slurm's per-node counts: ``'2(x3),1'`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^(\d+)(?:\(x(\d+)\))?$", part)
        if not m:
            raise SlurmError(f"bad Slurm count list {text!r} at {part!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def parse_duration(text: str) -> float | None:
    """Seconds in a Slurm duration (``squeue %L``, time limits); None when unlimited.

    Accepts ``D-HH:MM:SS``, ``D-HH:MM``, ``D-HH``, ``HH:MM:SS``, ``MM:SS``, ``MM``.
    """
    text = (text or "").strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NOT_SET", "INVALID", "N/A", ""):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        fields = [int(x) for x in text.split(":")]
        fields += [0] * (3 - len(fields))          # D-HH, D-HH:MM
        h, m, s = fields
    else:
        fields = [int(x) for x in text.split(":")]
        if len(fields) == 1:
            h, m, s = 0, fields[0], 0               # MM
        elif len(fields) == 2:
            h, (m, s) = 0, fields                   # MM:SS
        elif len(fields) == 3:
            h, m, s = fields
        else:
            raise SlurmError(f"bad Slurm duration {text!r}")
    return float(((days * 24 + h) * 60 + m) * 60 + s)


_BAD_STATES = ("down", "drain", "fail", "inval", "not_responding", "maint", "power", "unknown", "future")


def state_is_usable(state: str) -> bool:
    """Whether a node state from ``sinfo %T`` can take new work (``idle``, ``mixed``, ``allocated``...).

    ``*`` marks a node that does not respond; ``down``, ``drained``,
    ``draining``, ``fail``, ``maint``, power-saving and unknown states are not usable.
    """
    s = state.strip().lower()
    if not s or s.endswith("*"):
        return False
    return not any(bad in s for bad in _BAD_STATES)


# --------------------------------------------------------------------------- the job

def _slurm_cmd(cmd: Sequence[str], timeout: float = 15, env: Mapping | None = None) -> str:
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                             env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise SlurmError(f"{cmd[0]}: not found (is Slurm installed and on PATH?)") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{' '.join(cmd)}: no answer after {timeout:g}s") from exc
    if res.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


@dataclass
class LaunchPlan:
    """Where ranks go in an allocation: ``nodes`` get ``ranks_per_node`` each, ``spares`` none."""
    nodes: list[str]
    spares: list[str]
    ranks_per_node: int
    oversubscribe: bool = True

    @property
    def nranks(self) -> int:
        return self.ranks_per_node * len(self.nodes)

    def mpiexec_args(self, flavour: str = "openmpi") -> list[str]:
        """``mpiexec`` arguments including ``-n``.

        Open MPI: ``-n N --host a:K,b:K,spare:K --map-by ppr:K:node[:OVERSUBSCRIBE]``;
        ranks fill the listed hosts in order, so with ``-n K*len(nodes)`` the
        spares (listed last) get none but can take spawned ranks (``host=spare``).
        OVERSUBSCRIBE lets replacements be spawned where dead ranks' slots are
        not released (ULFM). MPICH (hydra): ``-n N -hosts a:K,...,spare:K -ppn K``.
        """
        k = self.ranks_per_node
        hosts = ",".join(f"{h}:{k}" for h in self.nodes + self.spares)
        if flavour == "openmpi":
            mapping = f"ppr:{k}:node" + (":OVERSUBSCRIBE" if self.oversubscribe else "")
            return ["-n", str(self.nranks), "--host", hosts, "--map-by", mapping]
        if flavour == "mpich":
            return ["-n", str(self.nranks), "-hosts", hosts, "-ppn", str(k)]
        raise SlurmError(f"unknown MPI flavour {flavour!r}: use 'openmpi' or 'mpich'")


@dataclass
class SlurmJob:
    """A Slurm job, read from ``SLURM_*`` variables (see :meth:`from_env`)."""
    job_id: str
    nodes: list[str]
    tasks_per_node: list[int] = field(default_factory=list)
    cpus_per_node: list[int] = field(default_factory=list)
    ntasks: int | None = None
    restart_count: int = 0
    end_time: float | None = None
    this_node: str | None = None
    job_name: str | None = None
    partition: str | None = None
    submit_dir: str | None = None
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @staticmethod
    def in_job(env: Mapping[str, str] | None = None) -> bool:
        env = os.environ if env is None else env
        return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SlurmJob:
        """Read the job from ``env`` (default ``os.environ``); raises :class:`SlurmError` outside a job."""
        env = dict(os.environ if env is None else env)
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job_id:
            raise SlurmError("not inside a Slurm job: SLURM_JOB_ID is not set")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise SlurmError(f"Slurm job {job_id}: SLURM_JOB_NODELIST is not set")
        end = env.get("SLURM_JOB_END_TIME")
        ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
        return cls(
            job_id=job_id,
            nodes=list(dict.fromkeys(expand_hostlist(nodelist))),
            tasks_per_node=expand_counts(env.get("SLURM_TASKS_PER_NODE", "")),
            cpus_per_node=expand_counts(env.get("SLURM_JOB_CPUS_PER_NODE", "")),
            ntasks=int(ntasks) if ntasks else None,
            restart_count=int(env.get("SLURM_RESTART_COUNT") or 0),
            end_time=float(end) if end and end.isdigit() and int(end) > 0 else None,
            this_node=env.get("SLURMD_NODENAME"),
            job_name=env.get("SLURM_JOB_NAME"),
            partition=env.get("SLURM_JOB_PARTITION"),
            submit_dir=env.get("SLURM_SUBMIT_DIR"),
            env=env,
        )

    # ---------------------------------------------------------------- queries

    def node_states(self) -> dict[str, str]:
        """``{node: state}`` for the allocation's nodes, from ``sinfo -N %N %T``."""
        out = _slurm_cmd(["sinfo", "-h", "-N", "-n", compress_hostlist(self.nodes), "-o", "%N %T"],
                         env=self.env or None)
        states: dict[str, str] = {}
        for line in out.splitlines():
            parts = line.split()
            # a node in several partitions is listed once per partition: keep the worst
            if len(parts) == 2 and (parts[0] not in states or not state_is_usable(parts[1])):
                states[parts[0]] = parts[1]
        return states

    def down_nodes(self) -> list[str]:
        """Nodes of the allocation that are down, draining/drained, failing or not responding."""
        states = self.node_states()
        return [n for n in self.nodes if not state_is_usable(states.get(n, "unknown"))]

    def usable_nodes(self, exclude_down: bool = True) -> list[str]:
        """The allocation's nodes in order, without the down ones if ``exclude_down``."""
        if not exclude_down:
            return list(self.nodes)
        bad = set(self.down_nodes())
        return [n for n in self.nodes if n not in bad]

    def spare_nodes(self, used: Iterable[str], exclude_down: bool = True) -> list[str]:
        """Usable nodes of the allocation that no rank uses."""
        used = set(used)
        return [n for n in self.usable_nodes(exclude_down) if n not in used]

    def time_left(self, query: bool = True) -> float | None:
        """Seconds until the job's time limit; None when unlimited or unknown.

        Asks ``squeue -h -j ID -o %L`` (which follows limit changes) when
        ``query``; falls back to ``SLURM_JOB_END_TIME``.
        """
        if query:
            try:
                out = _slurm_cmd(["squeue", "-h", "-j", self.job_id, "-o", "%L"], env=self.env or None)
                line = out.strip().splitlines()[0] if out.strip() else ""
                if line:
                    return parse_duration(line)
            except (SlurmError, ValueError):
                pass
        if self.end_time is not None:
            return max(0.0, self.end_time - time.time())
        return None

    # ---------------------------------------------------------------- launching

    def plan(self, ranks_per_node: int | None = None, n_nodes: int | None = None,
             exclude_down: bool = True, oversubscribe: bool = True) -> LaunchPlan:
        """Ranks on the first ``n_nodes`` usable nodes, the other usable nodes as spares.

        ``ranks_per_node`` defaults to ``SLURM_NTASKS_PER_NODE`` or the tasks Slurm gave
        the first node; ``n_nodes`` defaults to every usable node (no spares).
        """
        nodes = self.usable_nodes(exclude_down)
        if not nodes:
            raise SlurmError(f"Slurm job {self.job_id}: no usable node among {compress_hostlist(self.nodes)}")
        n_nodes = len(nodes) if n_nodes is None else n_nodes
        if not 1 <= n_nodes <= len(nodes):
            raise SlurmError(f"Slurm job {self.job_id}: {n_nodes} nodes wanted but "
                             f"{len(nodes)} usable ({compress_hostlist(nodes)})")
        if ranks_per_node is None:
            per = self.env.get("SLURM_NTASKS_PER_NODE")
            ranks_per_node = int(per) if per and per.isdigit() else (self.tasks_per_node or [1])[0]
        return LaunchPlan(nodes[:n_nodes], nodes[n_nodes:], int(ranks_per_node), oversubscribe)

    def mpiexec_args(self, flavour: str = "openmpi", ranks_per_node: int | None = None,
                     n_nodes: int | None = None, exclude_down: bool = True) -> list[str]:
        """Shortcut for ``self.plan(...).mpiexec_args(flavour)``."""
        return self.plan(ranks_per_node, n_nodes, exclude_down).mpiexec_args(flavour)

    def requeue(self) -> None:
        """Ask Slurm to requeue this job (it restarts with ``SLURM_RESTART_COUNT`` + 1)."""
        _slurm_cmd(["scontrol", "requeue", self.job_id], env=self.env or None)



def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mpimig.launch.slurm info|hosts K [--nodes M]`` for job scripts."""
    p = argparse.ArgumentParser(prog="python -m mpimig.launch.slurm",
                                description="What mpimig sees of the Slurm job it runs in.")
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("info", help="job id, nodes, down and spare nodes, time left, restart count (JSON)")
    h = sub.add_parser("hosts", help="host spec 'n1:K,n2:K' of the usable nodes, for mpimig run --hosts")
    h.add_argument("k", type=int, help="ranks per node")
    h.add_argument("--nodes", type=int, help="use only the first M usable nodes")
    args = p.parse_args(argv)
    try:
        job = SlurmJob.from_env()
        if args.what == "info":
            down = job.down_nodes()
            print(json.dumps({"job_id": job.job_id, "nodes": job.nodes, "down": down,
                              "usable": [n for n in job.nodes if n not in down],
                              "tasks_per_node": job.tasks_per_node, "restart_count": job.restart_count,
                              "time_left": job.time_left(), "this_node": job.this_node}))
        else:
            nodes = job.usable_nodes()[:args.nodes]
            print(",".join(f"{n}:{args.k}" for n in nodes))
    except SlurmError as exc:
        print(f"python -m mpimig.launch.slurm: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
