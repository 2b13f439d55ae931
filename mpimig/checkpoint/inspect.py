"""``mpimig inspect PATH``: list and verify checkpoints (epochs, ranks, datasets, checksums,
signatures, incremental chains).

The command over :mod:`.reader` (one epoch, one file) and :mod:`.incremental` (chains); it
never writes to the checkpoint directory. A module of its own so that the reader, which the
store and the incremental chains build on, does not import them back.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

from ..errors import NoCommittedEpoch, SecretError, UsageError
from . import auth
from . import format as _format
from .format import (EPOCH_DIR_RE, MANIFEST, QUARANTINE_RE, committed_epochs, no_epoch_error, quarantined_epochs,
                     uncommitted_epochs)
from .incremental import check_chains
from .reader import describe_epoch, describe_file
from .store import CheckpointStore

INSPECT_DESCRIPTION = """\
PATH is a job directory (its ckpt/ is inspected), a checkpoint directory, one
epoch directory in it, or a single rank file. Lists epochs, ranks, datasets
and sizes, recomputes every dataset's CRC-32 from the bytes in the file,
verifies the HMAC-SHA256 tags of each manifest and of every pickled blob under
the job secret, and exits non-zero naming the epoch, rank and dataset of every
problem found (exit 1: problems, 0: all fine). The secret is taken from
--secret-file, else MPIMIG_SECRET_FILE / MPIMIG_SECRET, else a file named
"secret" in the checkpoint directory or the job directory above it; without
one the tags are not verified and inspect says so. Damaged epochs that a
restart moved aside (epoch-N.damaged-*) are listed. Incremental epochs
(mpimig run --ckpt-incremental): each rank's link is shown (full, or delta of
epoch P, and how its chunks were found), and every delta is assembled from its
chain and checked against its digest; a broken chain is a problem naming the link."""


# ------------------------------------------------------------- mpimig inspect
def human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def checkpoint_dir_of(path: Path) -> Path:
    """The checkpoint directory ``mpimig inspect PATH`` means: PATH/ckpt for a
    job directory (one without epochs of its own that has a ckpt/)."""
    if (path.is_dir() and not EPOCH_DIR_RE.match(path.name) and (path / "ckpt").is_dir()
            and not any(EPOCH_DIR_RE.match(p.name) for p in path.iterdir())):
        return path / "ckpt"
    return path


def find_key(path: Path, secret_file: str | None = None) -> auth.Key | None:
    """The secret to verify ``path`` with: --secret-file, the environment, or a
    ``secret`` file in the checkpoint directory or the job directory above it."""
    if secret_file:
        return auth.read_secret_file(secret_file)
    key = auth.env_key()
    if key is not None:
        return key
    d = path.parent if path.is_file() else path
    if EPOCH_DIR_RE.match(d.name) or QUARANTINE_RE.match(d.name):
        d = d.parent
    for cand in (d / auth.SECRET_NAME, d.parent / auth.SECRET_NAME):
        if cand.exists():
            return auth.read_secret_file(cand)
    return None


def collect(path: Path, epoch: int | None = None, verify: bool = True,
            key: auth.Key | None = None) -> dict[str, Any]:
    """Everything `mpimig inspect` shows, as a JSON-serialisable dict with a
    ``problems`` list; with ``key`` signatures are verified. Raises
    NoCommittedEpoch for a directory without epochs."""
    path = checkpoint_dir_of(path)
    if path.is_file():
        info = describe_file(path, verify, key=key)
        return {"kind": "file", "path": str(path), "files": [info], "epochs": [],
                "problems": list(info["problems"])}
    if QUARANTINE_RE.match(path.name) and path.is_dir():
        # a damaged epoch a restart moved aside: each rank file on its own (its own tags)
        files = [describe_file(p, verify, key=key) for p in sorted(path.glob("rank-*.h5"))]
        return {"kind": "damaged epoch (moved aside by a restart)", "path": str(path), "files": files,
                "epochs": [], "problems": [p for f in files for p in f["problems"]]}
    m = EPOCH_DIR_RE.match(path.name)
    if m and path.is_dir() and (m.group(2) or not (path / MANIFEST).is_file()):
        # an uncommitted epoch: check each rank file on its own
        files = [describe_file(p, verify, key=key) for p in sorted(path.glob("rank-*.h5"))]
        return {"kind": "uncommitted epoch", "path": str(path), "files": files, "epochs": [],
                "problems": [p for f in files for p in f["problems"]]}
    if m and path.is_dir():
        if epoch is not None and epoch != int(m.group(1)):
            raise UsageError(f"{path} is epoch {int(m.group(1))}, not --epoch {epoch}")
        directory, epochs = path.parent, [int(m.group(1))]
    else:
        directory = path
        committed = committed_epochs(directory)
        if not committed:
            raise no_epoch_error(directory)
        epochs = committed if epoch is None else [epoch]
    described = [describe_epoch(directory, e, verify, key) for e in epochs]
    problems = [p for d in described for p in d["problems"]]
    if verify and key is not None:      # incremental epochs: each rank's link, and its chain assembled
        # objects of the program's own classes (its __main__) cannot be decoded here: they stay bytes
        defer, _format.DEFER_MAIN = _format.DEFER_MAIN, True
        try:
            links, broken = check_chains(CheckpointStore(directory, create=False, key=key), epochs,
                                         {d["epoch"]: len(d.get("ranks", [])) for d in described})
        finally:
            _format.DEFER_MAIN = defer
        for d in described:
            if any(links.get(d["epoch"], [])):
                d["links"] = links[d["epoch"]]
        problems += broken
    return {"kind": "directory", "path": str(directory),
            "committed": committed_epochs(directory), "uncommitted": uncommitted_epochs(directory),
            "quarantined": quarantined_epochs(directory),
            "epochs": described, "problems": problems}


Out = Callable[[str], Any]


def _print_file(info: dict[str, Any], indent: str, out: Out) -> None:
    a = info.get("attrs", {})
    digest = f", {info.get('digest_kind', auth.FILE_DIGEST)} {info['digest']}" if "digest" in info else ""
    out(f"{indent}rank {info.get('rank')}: {human(info.get('bytes'))}, host {a.get('host', '?')}, "
        f"step {a.get('step', '?')}, written {a.get('time_iso', '?')}{digest}  {info['file']}")
    for d in info.get("datasets", []):
        kind = d["encoding"]
        if "array_dtype" in d:
            what = f"{d['array_dtype']} {tuple(d['array_shape'])} pickled"
        elif kind == "native":
            what = f"{d['dtype']} {tuple(d['shape'])}"
        else:
            what = "opaque bytes"
        status = d.get("checksum", "not verified")
        tag = f"  hmac {d['hmac']}" if "hmac" in d else ""
        out(f"{indent}  {d['path']:<28} {kind:<7} {what:<28} {human(d['nbytes']):>10}  "
            f"crc32 {d['crc32']} {status}{tag}")


def render(report: dict[str, Any], out: Out = print) -> None:
    if report["kind"] == "directory":
        out(f"checkpoint directory {report['path']}")
        out(f"  committed epochs: {', '.join(map(str, report['committed'])) or 'none'}"
            + (f"; uncommitted (ignored): {', '.join(map(str, report['uncommitted']))}"
               if report["uncommitted"] else ""))
        if report.get("quarantined"):
            out(f"  damaged epochs moved aside by a restart (kept, never loaded): {', '.join(report['quarantined'])}")
        for e in report["epochs"]:
            out(f"epoch {e['epoch']}: job {e.get('job_id')}, step {e.get('step')}, "
                f"{e.get('size')} rank(s), {human(e.get('bytes'))}, committed {e.get('time_iso')} "
                f"(manifest signature {e.get('signature', '?')})")
            if e.get("links"):
                out("  incremental links: " + "; ".join(
                    f"rank {r} " + ("-" if ln is None else ln["kind"] if ln["kind"] == "full" else
                                    f"delta of epoch {ln['parent_epoch']}") + ("" if ln is None else f" ({ln['mode']})")
                    for r, ln in enumerate(e["links"])))
            for info in e["ranks"]:
                _print_file(info, "  ", out)
    else:
        out(f"{report['kind']} {report['path']}"
            + (" (not committed: never used for a restart)" if report["kind"] != "file" else ""))
        for info in report["files"]:
            _print_file(info, "  ", out)


def main(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise NoCommittedEpoch(f"no committed epoch in checkpoint directory {path}: "
                               "the path does not exist")
    try:
        key = find_key(path, args.secret_file)
    except SecretError as exc:
        raise UsageError(str(exc)) from exc
    report = collect(path, args.epoch, verify=not args.no_verify, key=key)
    report["secret"] = key.source if key is not None else None
    report["ok"] = not report["problems"]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"secret: {key.source} (id {auth.key_id(key)})" if key is not None else
              "no secret found (--secret-file, MPIMIG_SECRET_FILE, or a 'secret' file in the checkpoint or job "
              "directory): HMAC signatures NOT verified")
        render(report)
        ndata = sum(len(f.get("datasets", [])) for e in report["epochs"] for f in e["ranks"]) + \
            sum(len(f.get("datasets", [])) for f in report.get("files", []))
        if report["problems"]:
            print(f"{len(report['problems'])} problem(s):")
            for p in report["problems"]:
                print(f"  PROBLEM: {p}")
        else:
            what = "checksums verified" if not args.no_verify else "checksums NOT verified"
            what += (", signatures NOT verified (no secret)" if key is None else
                     f", signatures verified ({key.source})" if not args.no_verify else
                     ", manifest signatures verified")
            print(f"OK: {len(report['epochs']) or len(report['files'])} "
                  f"{'epoch(s)' if report['epochs'] else 'file(s)'}, {ndata} dataset(s), {what}")
    for p in report["problems"]:
        print(f"mpimig inspect: {p}", file=sys.stderr)
    return 1 if report["problems"] else 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "inspect", help="list and verify checkpoints (epochs, ranks, datasets, checksums)",
        description=INSPECT_DESCRIPTION)
    p.add_argument("path", metavar="PATH",
                   help="job directory (its ckpt/), checkpoint directory, epoch directory, or rank file")
    p.add_argument("--epoch", type=int, help="only this committed epoch (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("--no-verify", action="store_true",
                   help="list only; do not read the data to check checksums and blob signatures")
    p.add_argument("--secret-file", metavar="FILE",
                   help="the job secret to verify signatures with (default: MPIMIG_SECRET_FILE, MPIMIG_SECRET, "
                        "or a 'secret' file in the checkpoint directory or the job directory above it)")
    p.set_defaults(func=main)
    return p
