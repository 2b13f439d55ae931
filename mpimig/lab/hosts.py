"""Lab hosts: network namespaces with their own IP, hostname and sshd.

Layout (defaults; the subnet can be changed with ``--subnet`` or
``MPIMIG_LAB_SUBNET``, the state directory with ``MPIMIG_LAB_DIR``)::

    root namespace                       namespace mmlab-hN ("host" hN)
    bridge mmlab0  10.231.84.1/24  <-->  veth "mmlab0"  10.231.84.(10+N)/24
      (+ root-side veth mmlv-hN)          lo up, no default route
    /etc/hosts: "10.231.84.(10+N) hN  # mpimig-lab"
    sshd on hN: nsenter --net=/run/netns/mmlab-hN unshare --uts -- \
                sh -c 'hostname hN && exec sshd -D -e -f STATE/ssh/sshd_config'

The namespace end of each veth carries the bridge's name, so one interface
name (``mmlab0``) is valid on every host: MPICH's ``-iface mmlab0`` works on
the launching side and on every lab host alike. The namespaces have no default
route, so nothing a lab host sends can leave the machine.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Union
from collections.abc import Sequence

from . import _cgroup, _slurmd, _sys
from ._sys import LabError, Proc, say

DEFAULT_DIR = "/run/mpimig-lab"
DEFAULT_SUBNET = "10.231.84.0/24"
BRIDGE = "mmlab0"
NS_PREFIX = "mmlab-"
VETH_PREFIX = "mmlv-"
HOSTS_MARK = "# mpimig-lab"
FIRST_HOST_OFFSET = 10          # hN gets host address 10+N of the subnet
MAX_HOSTS = 200

# Environment that travels over the lab's ssh to prted / hydra_pmi_proxy and so
# to the ranks (ssh SendEnv + sshd AcceptEnv): MPI tuning, Python and mpimig
# settings. PATH and LD_LIBRARY_PATH travel separately (see SSH_WRAPPER).
FORWARDED_ENV = ["VIRTUAL_ENV", "PYTHON*", "OPAL_*", "OMPI_*",
                 "PRTE_*", "PMIX_*", "MPIMIG_*", "MPIR_CVAR_*", "MPICH_*", "HYDRA_*",
                 "FI_*", "UCX_*", "TMPDIR", "LANG", "LC_*"]

# Processes that launch or serve ranks; never counted as ranks themselves.
LAUNCHERS = {"sshd", "prted", "prte", "prterun", "mpiexec", "mpirun", "ompirun_wrapper",
             "hydra_pmi_proxy", "mpiexec.hydra", "slurmd", "slurmstepd", "srun", "munged"}
RANK_ENV = {"PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"}


def state_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("MPIMIG_LAB_DIR") or DEFAULT_DIR)


HostsSpec = Union[None, int, str, Sequence[str], dict[str, int]]


class Lab:
    """A lab that is up, read from its state directory.

    Attributes:
        hosts: host names, ``['h1', 'h2', ...]``.
        ips: host name -> IPv4 address.
        bridge: name of the bridge (and of each host's interface).
        bridge_ip: the root namespace's address on the bridge.
        subnet: the lab's network, e.g. ``'10.231.84.0/24'``.
        ssh_wrapper: an ``ssh`` that reaches the lab hosts as root with the lab's key.
    """

    def __init__(self, sdir: Path, state: dict):
        self.state_dir = sdir
        self._state = state
        self.hosts: list[str] = [h["name"] for h in state["hosts"]]
        self.ips: dict[str, str] = {h["name"]: h["ip"] for h in state["hosts"]}
        self.bridge: str = state["bridge"]
        self.bridge_ip: str = state["bridge_ip"]
        self.subnet: str = state["subnet"]
        self.ssh_wrapper = Path(state["ssh_wrapper"])

    def __repr__(self) -> str:
        return f"Lab({', '.join(self.hosts)} on {self.bridge} {self.subnet}, state {self.state_dir})"

    # ---------------------------------------------------------------- launch helpers

    def netns(self, host: str) -> str:
        return self._host(host)["netns"]

    def _host(self, host: str) -> dict:
        for h in self._state["hosts"]:
            if h["name"] == host:
                return h
        raise LabError(f"no lab host named {host!r} (lab hosts: {', '.join(self.hosts)})")

    def slots(self, hosts_spec: HostsSpec = None, default_slots: int = 1) -> dict[str, int]:
        """Normalise a host spec to ``{host: slots}``.

        ``hosts_spec`` may be None (every host, ``default_slots`` each), an int
        (every host with that many slots), ``"h1:2,h2:2"`` / ``"h1,h2"``, a list
        of such items, or a dict.
        """
        if hosts_spec is None:
            hosts_spec = default_slots
        if isinstance(hosts_spec, int):
            return {h: hosts_spec for h in self.hosts}
        if isinstance(hosts_spec, dict):
            items = list(hosts_spec.items())
        else:
            if isinstance(hosts_spec, str):
                hosts_spec = [s for s in hosts_spec.split(",") if s.strip()]
            items = []
            for item in hosts_spec:
                name, _, count = item.strip().partition(":")
                items.append((name, int(count) if count else default_slots))
        out: dict[str, int] = {}
        unknown = [name for name, _ in items if name not in self.ips]
        if unknown:
            raise LabError(f"not lab hosts: {', '.join(unknown)} (lab hosts: {', '.join(self.hosts)})")
        for name, n in items:
            out[name] = out.get(name, 0) + int(n)
        return out

    def mpiexec_args(self, flavour: str, hosts_spec: HostsSpec = None) -> list[str]:
        """Extra ``mpiexec`` arguments that launch over the lab's ssh onto ``hosts_spec``.

        Args:
            flavour: ``'openmpi'`` or ``'mpich'``.
            hosts_spec: see :meth:`slots`; None means every lab host, one slot each.

        Open MPI: ssh agent, no tree spawn (every ssh starts from the root
        namespace, so killing one host never cuts another's launch path), OOB
        and TCP BTL restricted to the lab subnet, ``--host h1:K,...``.
        MPICH: ``-launcher ssh -launcher-exec WRAPPER -iface BRIDGE -hosts h1:K,...``.
        Environment reaches remote daemons and ranks through ssh (see the
        package docstring); MPICH's hydra also forwards the whole environment.

        Inside a job of the lab's Slurm these arguments are harmless: Open MPI
        then starts its daemons with srun (under slurmstepd) whatever the ssh
        agent says (measured), and ``--host`` still picks the nodes.
        """
        hosts = ",".join(f"{h}:{n}" for h, n in self.slots(hosts_spec).items())
        if flavour == "openmpi":
            # no plm_ssh_no_tree_spawn: with it, prted segfaults in libprrte in
            # 2-3 of 5 MPI_Comm_spawn(host=remote) calls (Open MPI 5.0.11, measured)
            return ["--prtemca", "plm_ssh_agent", str(self.ssh_wrapper),
                    "--prtemca", "oob_tcp_if_include", self.subnet,
                    "--mca", "btl_tcp_if_include", self.subnet,
                    "--host", hosts]
        if flavour == "mpich":
            return ["-launcher", "ssh", "-launcher-exec", str(self.ssh_wrapper),
                    "-iface", self.bridge, "-hosts", hosts]
        raise LabError(f"unknown MPI flavour {flavour!r}: use 'openmpi' or 'mpich'")

    def hostfile(self, slots: HostsSpec = 1, flavour: str = "openmpi") -> Path:
        """Write a hostfile for ``slots`` (see :meth:`slots`) and return its path.

        Open MPI lines read ``h1 slots=K``, MPICH lines ``h1:K``.
        """
        table = self.slots(slots)
        if flavour == "openmpi":
            text = "".join(f"{h} slots={n}\n" for h, n in table.items())
        elif flavour == "mpich":
            text = "".join(f"{h}:{n}\n" for h, n in table.items())
        else:
            raise LabError(f"unknown MPI flavour {flavour!r}: use 'openmpi' or 'mpich'")
        tag = "_".join(f"{h}-{n}" for h, n in table.items())
        path = self.state_dir / "hostfiles" / f"{flavour}_{tag}"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return path

    # ---------------------------------------------------------------- processes

    def pids(self, host: str) -> list[int]:
        """Every pid on ``host`` (its network namespace)."""
        return _sys.netns_pids(self.netns(host))

    def rank_pids(self, host: str) -> list[int]:
        """Pids of MPI ranks on ``host``.

        A rank is a process that carries a rank variable set by its launcher
        (``PMIX_RANK``, ``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``) or whose parent is
        a launcher daemon (prted, hydra_pmi_proxy, slurmstepd), and is not such a
        daemon itself. This holds for Open MPI, MPICH and srun alike.
        """
        out = []
        for pid in self.pids(host):
            comm = _sys.proc_comm(pid)
            if not comm or comm in LAUNCHERS:
                continue
            ppid = _sys.proc_ppid(pid)
            parent = _sys.proc_comm(ppid) if ppid else ""
            if _sys.proc_environ_keys(pid) & RANK_ENV or parent in LAUNCHERS - {"sshd", "slurmd"}:
                out.append(pid)
        return out

    def kill(self, host: str, ranks_only: bool = False, sig: int = signal.SIGKILL) -> list[int]:
        """Kill the whole host (every process in its namespace) or only its ranks.

        Returns the pids signalled.
        """
        pids = self.rank_pids(host) if ranks_only else self.pids(host)
        if ranks_only:
            # a rank's own children (e.g. a subprocess) go too
            pids = pids + [p for p in self.pids(host) if _sys.proc_ppid(p) in pids and p not in pids]
        # a host dies at once: with SIGKILL every process is stopped first, so that none of them runs
        # on between the others' deaths and its own (CI, session 15: of a host's two ranks killed one
        # after the other, the second saw the first's failure and reported it before it died)
        for s in ((signal.SIGSTOP, sig) if sig == signal.SIGKILL and len(pids) > 1 else (sig,)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, s)
        return pids

    def sshd(self, host: str) -> Proc:
        return Proc.from_json(self._host(host)["sshd"])

    def status(self) -> list[dict]:
        """One dict per host: name, ip, netns, sshd alive, process count (and slurmd if Slurm is up)."""
        slurm = _slurmd.current_state(self.state_dir)
        rows = []
        for h in self._state["hosts"]:
            row = {"host": h["name"], "ip": h["ip"], "netns": h["netns"],
                   "sshd": bool(h.get("sshd")) and Proc.from_json(h["sshd"]).alive(),
                   "procs": len(_sys.netns_pids(h["netns"])),
                   "slow": self.slow_factor(h["name"])}
            if slurm is not None:
                d = slurm.get("slurmd", {}).get(h["name"])
                row["slurmd"] = bool(d) and Proc.from_json(d).alive()
            rows.append(row)
        return rows

    def slow_factor(self, host: str) -> float:
        """The CPU factor ``mpimig lab slow`` set on ``host`` (1.0: not slowed)."""
        entry = self._state.get("slow", {}).get(host)
        return float(entry["factor"]) if entry else 1.0

    def ssh(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run ``command`` on ``host`` through the lab's ssh."""
        return _sys.run([str(self.ssh_wrapper), host, command], timeout=timeout, check=False)


def current(path: str | Path | None = None) -> Lab | None:
    """The lab that is up (state in ``MPIMIG_LAB_DIR`` or /run/mpimig-lab), or None."""
    sdir = state_dir(path)
    state = _sys.read_json(sdir / "state.json")
    if not state or not state.get("complete"):
        return None
    return Lab(sdir, state)


# --------------------------------------------------------------------------- up

def _check_subnet(subnet: ipaddress.IPv4Network) -> None:
    for where, net in _sys.addresses_in_use():
        if net.overlaps(subnet):
            raise LabError(f"subnet {subnet} is already in use ({where}: {net}); "
                           "choose another with --subnet or MPIMIG_LAB_SUBNET")


# The caller's search paths travel under names no rc file touches ...
SSH_WRAPPER = """\
#!/bin/sh
# ssh into mpimig lab hosts with the lab's key; the remote command runs with
# this side's PATH and LD_LIBRARY_PATH (see remote-shell).
MPIMIG_LAB_PATH="$PATH"; export MPIMIG_LAB_PATH
if [ -n "${{LD_LIBRARY_PATH+x}}" ]; then
  MPIMIG_LAB_LD_LIBRARY_PATH="$LD_LIBRARY_PATH"; export MPIMIG_LAB_LD_LIBRARY_PATH
fi
exec {ssh} -F {config} "$@"
"""

# ... and the lab sshd's ForceCommand puts them back after root's login shell
# ran ~/.bashrc (which may rewrite PATH, e.g. pyenv), then runs the command
# with /bin/sh (bash would read ~/.bashrc again).
REMOTE_SHELL = """\
#!/bin/sh
# ForceCommand of the mpimig lab sshd: restore the caller's search paths, run the command.
if [ -n "${MPIMIG_LAB_PATH+x}" ]; then PATH="$MPIMIG_LAB_PATH"; export PATH; fi
if [ -n "${MPIMIG_LAB_LD_LIBRARY_PATH+x}" ]; then
  LD_LIBRARY_PATH="$MPIMIG_LAB_LD_LIBRARY_PATH"; export LD_LIBRARY_PATH
fi
unset MPIMIG_LAB_PATH MPIMIG_LAB_LD_LIBRARY_PATH
if [ -n "${SSH_ORIGINAL_COMMAND+x}" ]; then exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"; fi
exec "${SHELL:-/bin/sh}" -l
"""


def _ssh_files(sdir: Path, state: dict) -> None:
    ssh = sdir / "ssh"
    ssh.mkdir(mode=0o700)
    for key in ("id_ed25519", "host_ed25519_key"):
        _sys.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"mpimig-lab {key}",
                  "-f", ssh / key], what="ssh-keygen")
    (ssh / "authorized_keys").write_text((ssh / "id_ed25519.pub").read_text())
    (ssh / "authorized_keys").chmod(0o600)
    accept = " ".join(FORWARDED_ENV)
    (ssh / "sshd_config").write_text(f"""\
# sshd of every mpimig lab host (one per network namespace)
Port 22
ListenAddress 0.0.0.0
HostKey {ssh}/host_ed25519_key
AuthorizedKeysFile {ssh}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
PidFile none
MaxStartups 200:30:400
MaxSessions 200
LogLevel ERROR
AcceptEnv {accept}
ForceCommand {sdir}/bin/remote-shell
""")
    (ssh / "config").write_text(f"""\
# ssh client settings for the mpimig lab hosts
Host *
  User root
  IdentityFile {ssh}/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  GlobalKnownHostsFile /dev/null
  BatchMode yes
  LogLevel ERROR
  ConnectTimeout 10
  SendEnv {accept}
""")
    bindir = sdir / "bin"
    bindir.mkdir()
    wrapper = bindir / "ssh"      # named ssh so launchers treat it as ssh
    wrapper.write_text(SSH_WRAPPER.format(ssh=_sys.tool("ssh"), config=ssh / "config"))
    (bindir / "remote-shell").write_text(REMOTE_SHELL)
    for script in (wrapper, bindir / "remote-shell"):
        script.chmod(0o755)
    state["ssh_wrapper"] = str(wrapper)
    state["ssh_key"] = str(ssh / "id_ed25519")


def up(n: int, path: str | Path | None = None, subnet: str | None = None) -> Lab:
    """Bring up ``n`` lab hosts h1..hN; returns the :class:`Lab`.

    On failure everything created so far is removed again and the error says
    what failed.
    """
    _sys.require_root()
    if not 1 <= n <= MAX_HOSTS:
        raise LabError(f"--hosts {n}: the lab has 1 to {MAX_HOSTS} hosts")
    problem = _sys.capability_problem()
    if problem:
        raise LabError(problem)
    sdir = state_dir(path)
    with _sys.locked(_sys.lock_path(sdir)):
        if (sdir / "state.json").exists():
            old = _sys.read_json(sdir / "state.json") or {}
            raise LabError(f"a lab is already up ({len(old.get('hosts', []))} hosts, state in {sdir}); "
                           "run 'mpimig lab down' first")
        if sdir.exists() and any(sdir.iterdir()):
            raise LabError(f"state directory {sdir} exists and is not empty; remove it or set MPIMIG_LAB_DIR")
        _sys.ensure_tools({"sshd": "openssh-server", "ssh": "openssh-client",
                           "ssh-keygen": "openssh-client"}, "lab hosts need sshd and ssh")
        net = ipaddress.ip_network(subnet or os.environ.get("MPIMIG_LAB_SUBNET") or DEFAULT_SUBNET)
        if not isinstance(net, ipaddress.IPv4Network):
            raise LabError(f"subnet {net}: the lab needs an IPv4 subnet")
        if net.num_addresses < FIRST_HOST_OFFSET + n + 2:
            raise LabError(f"subnet {net} is too small for {n} hosts")
        if _sys.run(["ip", "link", "show", BRIDGE], check=False).returncode == 0:
            raise LabError(f"network interface {BRIDGE} already exists (another lab?); "
                           "run 'mpimig lab down' or remove it")
        names = [f"h{i}" for i in range(1, n + 1)]
        for name in names:
            if _sys.netns_exists(NS_PREFIX + name):
                raise LabError(f"network namespace {NS_PREFIX + name} already exists (another lab?); "
                               f"run 'mpimig lab down' or 'ip netns del {NS_PREFIX + name}'")
        _check_subnet(net)

        t0 = time.monotonic()
        sdir.mkdir(parents=True, exist_ok=True)
        sdir.chmod(0o755)
        addrs = list(net.hosts())
        state: dict[str, Any] = {
            "version": 1, "complete": False, "bridge": BRIDGE, "subnet": str(net),
            "bridge_ip": str(addrs[0]), "prefixlen": net.prefixlen, "hosts": [],
            "hosts_lines": [], "made_run_sshd": False, "created": time.time()}
        save = lambda: _sys.write_json(sdir / "state.json", state)  # noqa: E731
        save()
        try:
            _build(sdir, state, save, names, addrs, net)
        except BaseException as exc:
            say(f"lab up failed ({exc}); removing what was created")
            _down_locked(sdir)
            raise
        say(f"lab up: {n} hosts in {time.monotonic() - t0:.1f}s "
            f"({state['hosts'][0]['ip']}..{state['hosts'][-1]['ip']} on {BRIDGE})")
        return Lab(sdir, state)


def _spawn_sshd(sdir: Path, host: dict) -> Proc:
    argv = _sys.daemon_argv(host["netns"], host["name"],
                            [_sys.tool("sshd"), "-D", "-e", "-f", sdir / "ssh" / "sshd_config"])
    return _sys.spawn_daemon(argv, sdir / "logs" / f"sshd_{host['name']}.log")


def _wait_sshd(sdir: Path, host: dict, timeout: float = 20) -> None:
    proc = Proc.from_json(host["sshd"])
    log = sdir / "logs" / f"sshd_{host['name']}.log"
    _sys.wait_for(lambda: _sys.tcp_open(host["ip"], 22), timeout, f"sshd on {host['name']} ({host['ip']}:22)",
                  fail=lambda: None if proc.alive() else f"sshd exited: {_sys.tail(log)}")


def revive(lab: Lab, host: str) -> list[str]:
    """Restart the dead daemons of ``host`` after ``kill``: sshd, and slurmd if Slurm is up.

    Returns the names of the daemons started.
    """
    _sys.require_root()
    lab._host(host)  # names the lab hosts if ``host`` is not one
    started = []
    with _sys.locked(_sys.lock_path(lab.state_dir)):
        state = _sys.read_json(lab.state_dir / "state.json")
        entry = next(h for h in state["hosts"] if h["name"] == host)
        if not (entry.get("sshd") and Proc.from_json(entry["sshd"]).alive()):
            entry["sshd"] = _spawn_sshd(lab.state_dir, entry).to_json()
            _sys.write_json(lab.state_dir / "state.json", state)
            _wait_sshd(lab.state_dir, entry)
            started.append("sshd")
            slowed = state.get("slow", {}).get(host)
            if slowed:      # the new sshd (and so what it starts) keeps the host's CPU limit
                _cgroup.move(Path(slowed["cgroup"]), _sys.netns_pids(entry["netns"]))
        if _slurmd.revive_node(lab.state_dir, host, entry["netns"]):
            started.append("slurmd")
    return started


def _build(sdir: Path, state: dict, save, names, addrs, net) -> None:
    _ssh_files(sdir, state)
    if not Path("/run/sshd").exists():  # sshd's privilege separation directory
        state["made_run_sshd"] = True
        save()
        Path("/run/sshd").mkdir(mode=0o755)
    say(f"creating bridge {BRIDGE} {addrs[0]}/{net.prefixlen} and {len(names)} namespaces")
    state["bridge_created"] = True
    save()
    run = _sys.run
    run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    run(["ip", "addr", "add", f"{addrs[0]}/{net.prefixlen}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    for i, name in enumerate(names, start=1):
        ns, veth = NS_PREFIX + name, VETH_PREFIX + name
        ip = str(addrs[FIRST_HOST_OFFSET + i - 1])
        host = {"name": name, "ip": ip, "netns": ns, "veth": veth, "sshd": None}
        state["hosts"].append(host)
        save()
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", BRIDGE, "netns", ns])
        run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
        run(["ip", "-n", ns, "addr", "add", f"{ip}/{net.prefixlen}", "dev", BRIDGE])
        run(["ip", "-n", ns, "link", "set", BRIDGE, "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    state["hosts_lines"] = [f"{h['ip']} {h['name']} {HOSTS_MARK}" for h in state["hosts"]]
    save()
    _sys.hosts_add(state["hosts_lines"])

    (sdir / "logs").mkdir(exist_ok=True)
    for host in state["hosts"]:
        host["sshd"] = _spawn_sshd(sdir, host).to_json()
        save()
    say(f"waiting for sshd on {len(names)} hosts")
    for host in state["hosts"]:
        _wait_sshd(sdir, host)
    # prove the whole path (key, config, hostname) with one ssh per host, in parallel
    wrapper = state["ssh_wrapper"]
    procs = {h["name"]: subprocess.Popen([wrapper, h["name"], "hostname"], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
             for h in state["hosts"]}
    bad = []
    for name, p in procs.items():
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        if out.strip() != name:
            bad.append(f"{name}: got {out.strip()!r} {err.strip()}")
    if bad:
        raise LabError("ssh into lab hosts failed: " + "; ".join(bad))
    state["complete"] = True
    save()


# --------------------------------------------------------------------------- down

def down(path: str | Path | None = None) -> bool:
    """Remove everything ``up`` recorded (also after a partial ``up``). Returns False if no lab was up."""
    _sys.require_root()
    sdir = state_dir(path)
    with _sys.locked(_sys.lock_path(sdir)):
        return _down_locked(sdir)


def _down_locked(sdir: Path) -> bool:
    state = _sys.read_json(sdir / "state.json")
    if state is None:
        return False
    _slurmd.down_locked(sdir)
    problems = []
    sshds = [Proc.from_json(h["sshd"]) for h in state["hosts"] if h.get("sshd")]
    _sys.kill_and_wait(sshds, timeout=2)
    for host in state["hosts"]:
        ns = host["netns"]
        # everything left in a lab namespace was started in the lab
        _sys.kill_and_wait([Proc.of(p) for p in _sys.netns_pids(ns)], timeout=2)
        if _sys.netns_exists(ns):
            res = _sys.run(["ip", "netns", "del", ns], check=False)
            if res.returncode:
                problems.append(f"ip netns del {ns}: {res.stderr.strip()}")
        if _sys.run(["ip", "link", "show", host["veth"]], check=False).returncode == 0:
            _sys.run(["ip", "link", "del", host["veth"]], check=False)
    for host, slowed in state.get("slow", {}).items():     # mpimig lab slow's cgroups
        problem = _cgroup.remove(Path(slowed["cgroup"]))
        if problem:
            problems.append(f"cgroup of {host}: {problem}")
    if state.get("bridge_created") and _sys.run(["ip", "link", "show", state["bridge"]], check=False).returncode == 0:
        res = _sys.run(["ip", "link", "del", state["bridge"]], check=False)
        if res.returncode:
            problems.append(f"ip link del {state['bridge']}: {res.stderr.strip()}")
    _sys.hosts_remove(state.get("hosts_lines", []))
    if state.get("made_run_sshd"):
        with contextlib.suppress(OSError):
            Path("/run/sshd").rmdir()
    if problems:
        raise LabError("lab down left things behind: " + "; ".join(problems))
    shutil.rmtree(sdir, ignore_errors=True)
    return True
