"""A real Slurm over the lab hosts: munged, slurmctld, one slurmd per host.

* munged runs as user ``munge`` (``setpriv``, no fork) with a lab-private key
  and socket in ``STATE/slurm/munge``.
* slurmctld runs in the root network namespace, listening on the bridge
  address, in its own UTS namespace named ``labctl`` (``SlurmctldHost`` must
  name the host it runs on; this keeps it independent of the machine's name).
* slurmd for node hN runs "on" lab host hN (its network namespace and a UTS
  namespace named hN), so every node has its own hostname and address and
  ``MPI_Get_processor_name`` tells nodes apart.
* Nodes are named like the lab hosts (``NodeName=h1 NodeAddr=10.231.84.11``),
  so ``--host h1:2`` and Slurm's node list speak of the same machines.
* The configuration is ``STATE/slurm/slurm.conf``; ``/etc/slurm/slurm.conf``
  is made a symlink to it when there is none, so plain ``sbatch``/``srun``/
  ``squeue``/``scontrol`` work. If a foreign one exists it is left alone and
  ``SLURM_CONF`` must be exported (``up`` says so).
* ``srun --mpi=pmix`` needs Debian's libpmix2 and an unversioned
  ``libpmix.so`` in its lib dir; ``up`` installs and links it (and ``down``
  removes the link if ``up`` made it).
"""
from __future__ import annotations

import os
import pwd
import time
from pathlib import Path

from . import _slurmd, _sys, hosts
from ._slurmd import current_state, down_locked
from ._sys import LabError, Proc, say

CTL_NAME = "labctl"
CTL_PORT = 6817
SLURMD_PORT = 6818
# Slurm holds a requeued job back for cred_expire + 1 s (default 120: ~2 min per
# requeue); 20 s keeps requeue experiments short and is ample for one machine.
CRED_EXPIRE = 20
ETC_CONF = Path("/etc/slurm/slurm.conf")
PMIX_LIBDIR = Path("/usr/lib/x86_64-linux-gnu/pmix2/lib")
TOOLS = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm",
         "srun": "slurm-wlm", "scontrol": "slurm-wlm", "munged": "munge", "munge": "munge",
         "setpriv": "util-linux"}


class SlurmCluster:
    """The lab's Slurm, as recorded by ``up``."""

    def __init__(self, sdir: Path, state: dict):
        self.state_dir = sdir
        self.nodes: list[str] = state["nodes"]
        self.conf = Path(state["conf"])
        self.etc_link: bool = bool(state.get("etc_link"))
        self._state = state

    def env(self, base: dict | None = None) -> dict:
        """Environment for Slurm commands (``SLURM_CONF`` set to the lab's config)."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def describe(self) -> str:
        lines = [f"slurm: controller {CTL_NAME} on {self._state['ctl_addr']}:{CTL_PORT}, "
                 f"nodes {','.join(self.nodes)} (partition lab), config {self.conf}"]
        if not self.etc_link:
            lines.append(f"  {ETC_CONF} is not the lab's: export SLURM_CONF={self.conf}")
        res = _sys.run(["sinfo", "-N", "-h", "-o", "%N %t %c"], env=self.env(), check=False, timeout=20)
        lines += ["  " + line for line in res.stdout.splitlines()]
        return "\n".join(lines)


def current(path: str | Path | None = None) -> SlurmCluster | None:
    sdir = hosts.state_dir(path)
    state = current_state(sdir)
    if not state or not state.get("complete"):
        return None
    return SlurmCluster(sdir, state)


def status_line(sdir: Path) -> str | None:
    state = current_state(sdir)
    if state is None:
        return None
    daemons = {"munged": state.get("munged"), "slurmctld": state.get("slurmctld")}
    alive = ", ".join(f"{k} {'up' if v and Proc.from_json(v).alive() else 'DEAD'}" for k, v in daemons.items())
    return f"slurm: {alive}; nodes {','.join(state['nodes'])}; config {state['conf']}"


# --------------------------------------------------------------------------- config

def slurm_conf(sdir: Path, ctl_addr: str, nodes: dict[str, str]) -> str:
    d = sdir / "slurm"
    node_lines = "".join(f"NodeName={n} NodeAddr={ip} CPUs=4 State=UNKNOWN\n" for n, ip in nodes.items())
    return f"""\
# Written by 'mpimig lab slurm up'; removed by 'mpimig lab slurm down'.
ClusterName=mpimiglab
SlurmctldHost={CTL_NAME}({ctl_addr})
SlurmctldPort={CTL_PORT}
SlurmdPort={SLURMD_PORT}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire={CRED_EXPIRE}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/ctld
SlurmctldPidFile={d}/slurmctld.pid
SlurmctldLogFile={d}/logs/slurmctld.log
SlurmdSpoolDir={d}/spool_%n
SlurmdPidFile={d}/slurmd_%n.pid
SlurmdLogFile={d}/logs/slurmd_%n.log
TmpFS={d}/tmp_%n
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=10
SlurmctldTimeout=10
MessageTimeout=10
InactiveLimit=0
KillWait=5
Waittime=0
MinJobAge=600
{node_lines}PartitionName=lab Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""


# --------------------------------------------------------------------------- up

def up(n: int, path: str | Path | None = None, subnet: str | None = None) -> SlurmCluster:
    """Start Slurm with ``n`` nodes on lab hosts h1..hN (bringing the lab up if none is)."""
    _sys.require_root()
    sdir = hosts.state_dir(path)
    lab = hosts.current(sdir)
    if lab is None:
        lab = hosts.up(n, sdir, subnet=subnet)
    if len(lab.hosts) < n:
        raise LabError(f"the lab has {len(lab.hosts)} hosts but Slurm wants {n} nodes; "
                       f"'mpimig lab down', then 'mpimig lab slurm up --nodes {n}'")
    with _sys.locked(_sys.lock_path(sdir)):
        if _slurmd.state_file(sdir).exists():
            raise LabError(f"the lab's Slurm is already up (state {_slurmd.state_file(sdir)}); "
                           "run 'mpimig lab slurm down' first")
        _sys.ensure_tools(TOOLS, "the lab's Slurm needs slurm-wlm and munge")
        if _sys.port_listeners(CTL_PORT):
            raise LabError(f"port {CTL_PORT} (slurmctld) is busy in the root namespace: "
                           "another slurmctld? stop it first")
        t0 = time.monotonic()
        nodes = {h: lab.ips[h] for h in lab.hosts[:n]}
        state = {"nodes": list(nodes), "ctl_addr": lab.bridge_ip, "complete": False,
                 "conf": str(sdir / "slurm" / "slurm.conf"), "slurmd": {}}
        save = lambda: _sys.write_json(_slurmd.state_file(sdir), state)  # noqa: E731
        save()
        try:
            _build(sdir, lab, state, save, nodes)
        except BaseException as exc:
            say(f"slurm up failed ({exc}); removing what was created")
            down_locked(sdir)
            raise
        say(f"slurm up: {n} nodes in {time.monotonic() - t0:.1f}s")
        return SlurmCluster(sdir, state)


def _pmix_link(state: dict, save) -> None:
    """Give Slurm's mpi_pmix plugin the unversioned libpmix.so it dlopens (Debian lacks it)."""
    try:
        _sys.apt_install([] if (PMIX_LIBDIR / "libpmix.so.2").exists() else ["libpmix2"],
                         "srun --mpi=pmix needs libpmix2")
    except LabError as exc:  # optional: mpiexec inside sbatch does not need it
        say(f"srun --mpi=pmix will not work: {exc}")
        return
    link = PMIX_LIBDIR / "libpmix.so"
    if not link.exists() and not link.is_symlink() and (PMIX_LIBDIR / "libpmix.so.2").exists():
        state["pmix_link"] = str(link)
        save()
        link.symlink_to("libpmix.so.2")


def _build(sdir: Path, lab, state: dict, save, nodes: dict[str, str]) -> None:
    d = sdir / "slurm"
    d.mkdir(mode=0o755)
    (d / "logs").mkdir()
    (d / "ctld").mkdir()
    for node in nodes:
        (d / f"spool_{node}").mkdir()
        (d / f"tmp_{node}").mkdir()
    conf = Path(state["conf"])
    conf.write_text(slurm_conf(sdir, lab.bridge_ip, nodes))
    if not ETC_CONF.exists() and not ETC_CONF.is_symlink():
        state["etc_link"] = str(ETC_CONF)
        save()
        ETC_CONF.parent.mkdir(parents=True, exist_ok=True)
        ETC_CONF.symlink_to(conf)
    elif ETC_CONF.resolve() != conf:
        say(f"{ETC_CONF} exists and is not the lab's: export SLURM_CONF={conf} for Slurm commands")
    _pmix_link(state, save)
    env = dict(os.environ, SLURM_CONF=str(conf))

    # munge, as user munge, with a private key and socket
    munge = pwd.getpwnam("munge")
    mdir = d / "munge"
    mdir.mkdir(mode=0o700)
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for p in (mdir, key):
        os.chown(p, munge.pw_uid, munge.pw_gid)
    sock = mdir / "munge.socket"
    say("starting munged")
    state["munged"] = _slurmd.spawn(sdir, "munged", [
        "setpriv", f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}", "--init-groups", "--",
        _sys.tool("munged"), "-F", "--force", f"--socket={sock}", f"--key-file={key}",
        f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log",
        f"--seed-file={mdir}/munged.seed"], env).to_json()
    save()
    munged = Proc.from_json(state["munged"])
    _sys.wait_for(lambda: sock.exists(), 15, "munged socket",
                  fail=lambda: _exited(munged, "munged", mdir / "munged.log", d / "logs" / "munged.out"))
    cred = _sys.run(["munge", "-n", "-S", sock], what="munge -n (credential test)").stdout
    _sys.run(["unmunge", "-S", sock], input=cred, what="unmunge (credential test)")

    say(f"starting slurmctld ({CTL_NAME} on {lab.bridge_ip}:{CTL_PORT})")
    ctl_argv: list[_sys.Arg] = ["unshare", "--uts", "--", "sh", "-c", f'hostname {CTL_NAME} && exec "$@"', "sh",
                                _sys.tool("slurmctld"), "-D", "-i", "-f", conf]
    state["slurmctld"] = _slurmd.spawn(sdir, "slurmctld", ctl_argv, env).to_json()
    save()
    ctl = Proc.from_json(state["slurmctld"])
    _sys.wait_for(lambda: _sys.run(["scontrol", "ping"], env=env, check=False, timeout=15).stdout.find("UP") >= 0,
                  30, "slurmctld",
                  fail=lambda: _exited(ctl, "slurmctld", d / "logs" / "slurmctld.log", d / "logs" / "slurmctld.out"))

    say(f"starting slurmd on {', '.join(nodes)}")
    for node in nodes:
        state["slurmd"][node] = _slurmd.spawn_slurmd(sdir, lab.netns(node), node, env).to_json()
        save()
    say("waiting for the nodes to register (idle)")

    def idle() -> bool:
        res = _sys.run(["sinfo", "-N", "-h", "-o", "%N %t"], env=env, check=False, timeout=15)
        states = dict(line.split() for line in res.stdout.splitlines() if len(line.split()) == 2)
        return all(states.get(n, "").startswith("idle") for n in nodes)

    def dead() -> str | None:
        for node, pj in state["slurmd"].items():
            why = _exited(Proc.from_json(pj), f"slurmd on {node}",
                          d / "logs" / f"slurmd_{node}.log", d / "logs" / f"slurmd_{node}.out")
            if why:
                return why
        return None

    _sys.wait_for(idle, 60, "slurm nodes idle", fail=dead)
    state["complete"] = True
    save()


def _exited(proc: Proc, what: str, *logs: Path) -> str | None:
    """None while ``proc`` is alive; else why it failed: WHAT exited and the last lines of its logs."""
    if proc.alive():
        return None
    return f"{what} exited: " + (" | ".join(t for t in (_sys.tail(p, 8) for p in logs) if t) or "(no log)")


# --------------------------------------------------------------------------- down

def down(path: str | Path | None = None) -> bool:
    """Stop the lab's Slurm and remove its files; the lab hosts stay. False if none was up."""
    _sys.require_root()
    sdir = hosts.state_dir(path)
    with _sys.locked(_sys.lock_path(sdir)):
        return down_locked(sdir)
