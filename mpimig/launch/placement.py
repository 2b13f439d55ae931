"""Where the processes of a job start: warm spares on every host (docs/spawn.md).

With Open MPI (PRRTE 3.0.x in the wheel) a process spawned onto another host
loses the job in most runs, and a second spawn in a job nearly always
(docs/spawn.md has the counts). So ``mpimig run`` starts the spares a move
needs with the job, one (``--spares-per-host K``) on every host, and a moved
rank's old process stays as its host's spare (the coordinator recycles it):
moves between hosts then never spawn.

``mpiexec --map-by slot`` gives each host a block of consecutive world ranks,
as many as its slots. :func:`spares_on_every_host` keeps the coordinator's and
the ranks' places of the user's host list and ends each host's block with its
spares; the world ranks of the spares travel as ``MPIMIG_SPARE_WORLD``.
"""
from __future__ import annotations

from ..errors import UsageError


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    """``h1:2,h2:2`` as [(host, slots)] (a host without ``:N`` has one slot)."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, slots = part.partition(":")
        try:
            n = int(slots) if slots else 1
        except ValueError:
            raise UsageError(f"--hosts {spec}: bad slot count in {part!r}") from None
        if n < 1:
            raise UsageError(f"--hosts {spec}: {part!r} has no slots")
        out.append((name, n))
    return out


def spares_on_every_host(hosts: str, nprocs: int, per_host: int, extra: int = 0) -> tuple[str, list[int]]:
    """(host spec for ``mpiexec --map-by slot``, world ranks of the spares).

    ``nprocs`` is the coordinator plus the ranks: they fill the hosts in list
    order up to each host's slots, then round robin (as the user's spec would
    place them); each host's block then ends with ``per_host`` spares, and the
    last host's with ``extra`` more (``--spares``).
    """
    entries = parse_hosts(hosts)
    if not entries:
        raise UsageError("--spares-per-host needs --hosts")
    counts = []
    left = nprocs
    for _, slots in entries:
        take = min(slots, left)
        counts.append(take)
        left -= take
    i = 0
    while left > 0:
        counts[i % len(entries)] += 1
        left -= 1
        i += 1
    spec: list[str] = []
    spares: list[int] = []
    world = 0
    for i, (name, _) in enumerate(entries):
        k = per_host + (extra if i == len(entries) - 1 else 0)
        world += counts[i]
        spares.extend(range(world, world + k))
        world += k
        if counts[i] + k:
            spec.append(f"{name}:{counts[i] + k}")
    return ",".join(spec), spares
