"""A multi-host lab and a real Slurm on one Linux machine (root only).

``mpimig lab up --hosts N`` makes hosts h1..hN: each is a network namespace
with its own address on a bridge, its own hostname (a UTS namespace per daemon)
and its own sshd that accepts the lab's private key. ``mpimig lab slurm up``
adds slurmctld (root namespace) and one slurmd per host. ``mpimig lab slow
HOST FACTOR`` limits one host's CPU (a cgroup quota). See docs/lab.md.

May import :mod:`mpimig.errors` only: the lab is a tool under the job, it knows
nothing of MPI programs (layers, bottom up: ``_sys``, ``_slurmd``, ``hosts``,
``slurm_cluster``; ``_cgroup`` under ``hosts``, ``slow`` over it).

How remote processes find Python and the MPI binaries
------------------------------------------------------
The hosts share the machine's filesystem, so every path on the launching side
(the venv's ``python``, ``prted``, ``hydra_pmi_proxy``, the application) is
valid on every host. Only the environment has to travel:

* The lab's ssh wrapper (``STATE/bin/ssh``, given to Open MPI as
  ``plm_ssh_agent`` and to MPICH as ``-launcher-exec``) sends the caller's
  ``PATH`` and ``LD_LIBRARY_PATH`` as ``MPIMIG_LAB_PATH`` /
  ``MPIMIG_LAB_LD_LIBRARY_PATH`` and the variables of
  :data:`hosts.FORWARDED_ENV` (``OMPI_*``, ``OPAL_*``, ``PRTE_*``, ``PMIX_*``,
  ``MPIMIG_*``, ``PYTHON*``, ``MPIR_CVAR_*``, ...) with ssh ``SendEnv``; the lab
  sshd accepts them (``AcceptEnv``).
* root's login shell may rewrite ``PATH`` in ``~/.bashrc`` (pyenv does), so the
  lab sshd's ``ForceCommand`` (``STATE/bin/remote-shell``) puts the caller's
  ``PATH`` and ``LD_LIBRARY_PATH`` back and runs the command with ``/bin/sh``.
* Open MPI's remote ``prted`` therefore resolves from the caller's ``PATH``
  (the venv's ``bin``; the wheel's ``mpiexec`` also exports ``OPAL_PREFIX``,
  which travels as ``OPAL_*``); the ranks inherit prted's environment, so
  ``python`` is the venv's and ``OMPI_*``/``MPIMIG_*`` arrive. No ``--prefix``
  is needed. MPICH's hydra starts ``hydra_pmi_proxy`` by its absolute path
  and forwards the whole environment to the ranks itself.

Under the lab's Slurm, jobs run with the environment ``sbatch``/``srun`` were
called with (``--export=ALL``), so the same holds.

Python API for launchers::

    lab = mpimig.lab.current()          # Lab or None
    lab.hosts                           # ['h1', 'h2', ...]
    lab.mpiexec_args('openmpi', 'h1:2,h2:2')   # or 'mpich'; spec str/list/dict/int/None
    lab.hostfile(2)                     # Path of 'h1 slots=2' lines (flavour='mpich': 'h1:2')
    lab.kill('h2', ranks_only=True)     # pids killed
"""
from __future__ import annotations

import time

from . import slow as _slow, slurm_cluster
from ._sys import LabError, capability_problem
from .hosts import Lab, current, down, revive, state_dir, up

__all__ = ["Lab", "LabError", "current", "up", "down", "capability_problem", "register"]


def _cmd_up(args) -> int:
    t0 = time.monotonic()
    lab = up(args.hosts, subnet=args.subnet)
    _print_status(lab)
    print(f"lab up in {time.monotonic() - t0:.1f}s; state in {lab.state_dir}")
    return 0


def _print_status(lab: Lab) -> None:
    rows = lab.status()
    slurm = any("slurmd" in r for r in rows)
    print(f"bridge {lab.bridge} {lab.bridge_ip} subnet {lab.subnet}; ssh: {lab.ssh_wrapper} HOST")
    head = f"{'host':<6} {'ip':<16} {'netns':<12} {'sshd':<6} " + ("slurmd " if slurm else "") + "cpu    procs"
    print(head)
    for r in rows:
        line = f"{r['host']:<6} {r['ip']:<16} {r['netns']:<12} {'up' if r['sshd'] else 'DEAD':<6} "
        if slurm:
            line += f"{'up' if r.get('slurmd') else 'DEAD':<7} "
        cpu = "full" if r["slow"] >= 1.0 else f"x{r['slow']:g}"
        print(line + f"{cpu:<6} " + str(r["procs"]))


def _cmd_status(args) -> int:
    lab = current()
    if lab is None:
        if (state_dir() / "state.json").exists():
            print(f"a partial lab (an 'up' that failed or was killed) is recorded in {state_dir()}; "
                  "'mpimig lab down' removes it")
        else:
            print(f"no lab is up (state directory {state_dir()})")
        return 1
    _print_status(lab)
    info = slurm_cluster.status_line(lab.state_dir)
    if info:
        print(info)
    return 0


def _cmd_kill(args) -> int:
    lab = _need_lab()
    pids = lab.kill(args.host, ranks_only=args.ranks_only)
    what = "ranks" if args.ranks_only else "processes"
    print(f"killed {len(pids)} {what} on {args.host}: {' '.join(map(str, pids)) or '-'}")
    return 0


def _cmd_revive(args) -> int:
    lab = _need_lab()
    started = revive(lab, args.host)
    print(f"{args.host}: started {', '.join(started) or 'nothing (all daemons alive)'}")
    return 0


def _cmd_slow(args) -> int:
    lab = _need_lab()
    if args.off == (args.factor is not None):
        raise LabError("mpimig lab slow HOST: give a FACTOR in (0, 1] or --off")
    info = _slow.slow(lab, args.host, 1.0 if args.off else args.factor)
    print(_slow.describe(args.host, info, lab))
    return 0


def _cmd_down(args) -> int:
    t0 = time.monotonic()
    if not down():
        print(f"no lab is up (state directory {state_dir()}); nothing to do")
        return 0
    print(f"lab down in {time.monotonic() - t0:.1f}s")
    return 0


def _cmd_slurm_up(args) -> int:
    t0 = time.monotonic()
    cluster = slurm_cluster.up(args.nodes, subnet=args.subnet)
    print(cluster.describe())
    print(f"slurm up in {time.monotonic() - t0:.1f}s")
    return 0


def _cmd_slurm_down(args) -> int:
    t0 = time.monotonic()
    if not slurm_cluster.down():
        print("no lab Slurm is up; nothing to do")
        return 0
    print(f"slurm down in {time.monotonic() - t0:.1f}s (the lab hosts stay up: 'mpimig lab down')")
    return 0


def _need_lab() -> Lab:
    lab = current()
    if lab is None:
        raise LabError(f"no lab is up (state directory {state_dir()}); run 'mpimig lab up --hosts N'")
    return lab


def register(subparsers) -> None:
    """Add ``mpimig lab ...`` to the command line."""
    p = subparsers.add_parser("lab", help="multi-host lab and real Slurm on this machine (root)",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="lab_command", metavar="ACTION")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    q = sub.add_parser("up", help="create hosts h1..hN (namespaces, bridge, sshd)")
    q.add_argument("--hosts", type=int, default=4, metavar="N", help="number of hosts (default 4)")
    q.add_argument("--subnet", help="private IPv4 /24 for the lab (default 10.231.84.0/24 or $MPIMIG_LAB_SUBNET)")
    q.set_defaults(func=_cmd_up)

    q = sub.add_parser("status", help="hosts, addresses, daemons alive, process counts")
    q.set_defaults(func=_cmd_status)

    q = sub.add_parser("kill", help="kill a host (every process in it) or only its MPI ranks")
    q.add_argument("host")
    q.add_argument("--ranks-only", action="store_true",
                   help="kill only MPI rank processes, keep sshd/prted/slurmd")
    q.set_defaults(func=_cmd_kill)

    q = sub.add_parser("revive", help="restart the daemons (sshd, slurmd) of a killed host")
    q.add_argument("host")
    q.set_defaults(func=_cmd_revive)

    q = sub.add_parser("slow", help="limit a host's CPU to FACTOR x its fair share (cgroup quota)",
                       description="Limit a lab host's CPU to FACTOR x its fair share (the machine's cores / lab "
                       "hosts) with a cgroup v1 CFS quota; FACTOR 1 or --off removes the limit. See docs/lab.md.")
    q.add_argument("host")
    q.add_argument("factor", type=float, nargs="?",
                   help="0 < FACTOR <= 1: share of the host's fair share (cores / hosts); 1 removes the limit")
    q.add_argument("--off", action="store_true", help="remove the limit (same as FACTOR 1)")
    q.set_defaults(func=_cmd_slow)

    q = sub.add_parser("down", help="remove everything 'up' created (safe to repeat)")
    q.set_defaults(func=_cmd_down)

    s = sub.add_parser("slurm", help="a real Slurm over the lab hosts")
    ssub = s.add_subparsers(dest="slurm_command", metavar="ACTION")
    s.set_defaults(func=lambda a: (s.print_help(), 2)[1])
    q = ssub.add_parser("up", help="munged, slurmctld and one slurmd per lab host (brings the lab up if needed)")
    q.add_argument("--nodes", type=int, default=4, metavar="N", help="number of nodes (default 4)")
    q.add_argument("--subnet", help="subnet if the lab must be brought up too")
    q.set_defaults(func=_cmd_slurm_up)
    q = ssub.add_parser("down", help="stop the lab's Slurm and remove its files")
    q.set_defaults(func=_cmd_slurm_down)
