"""``mpimig inspect PATH``: list and verify checkpoints.

PATH is a checkpoint directory, one epoch directory in it, or a single rank
file. Lists epochs, ranks, datasets and sizes, recomputes every dataset's
CRC-32 from the bytes in the file, and exits non-zero naming the epoch, rank
and dataset of every problem found (exit 1: problems, 0: all fine).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .store import MANIFEST, CheckpointStore, describe_file
from ..errors import NoCommittedEpoch, UsageError

_EPOCH_DIR = re.compile(r"^epoch-(\d+)(\.tmp)?$")


def human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def collect(path: Path, epoch: int | None = None, verify: bool = True) -> dict:
    """Everything `mpimig inspect` shows, as a JSON-serialisable dict with a
    ``problems`` list. Raises NoCommittedEpoch for a directory without epochs."""
    if path.is_file():
        info = describe_file(path, verify)
        return {"kind": "file", "path": str(path), "files": [info], "epochs": [],
                "problems": list(info["problems"])}
    m = _EPOCH_DIR.match(path.name)
    if m and path.is_dir() and (m.group(2) or not (path / MANIFEST).is_file()):
        # an uncommitted epoch: check each rank file on its own
        files = [describe_file(p, verify) for p in sorted(path.glob("rank-*.h5"))]
        return {"kind": "uncommitted epoch", "path": str(path), "files": files, "epochs": [],
                "problems": [p for f in files for p in f["problems"]]}
    if m and path.is_dir():
        if epoch is not None and epoch != int(m.group(1)):
            raise UsageError(f"{path} is epoch {int(m.group(1))}, not --epoch {epoch}")
        store, epochs = CheckpointStore(path.parent), [int(m.group(1))]
    else:
        store = CheckpointStore(path)
        committed = store.committed_epochs()
        if not committed:
            raise store._no_epoch()
        epochs = committed if epoch is None else [epoch]
    out = {"kind": "directory", "path": str(store.directory),
           "committed": store.committed_epochs(), "uncommitted": store.uncommitted_epochs(),
           "epochs": [], "problems": []}
    for e in epochs:
        d = store.describe(e, verify)
        out["epochs"].append(d)
        out["problems"].extend(d["problems"])
    return out


def _print_file(info: dict, indent: str, out) -> None:
    a = info.get("attrs", {})
    out(f"{indent}rank {info.get('rank')}: {human(info.get('bytes'))}, host {a.get('host', '?')}, "
        f"step {a.get('step', '?')}, written {a.get('time_iso', '?')}  {info['file']}")
    for d in info.get("datasets", []):
        kind = d["encoding"]
        if "array_dtype" in d:
            what = f"{d['array_dtype']} {tuple(d['array_shape'])} pickled"
        elif kind == "native":
            what = f"{d['dtype']} {tuple(d['shape'])}"
        else:
            what = "opaque bytes"
        status = d.get("checksum", "not verified")
        out(f"{indent}  {d['path']:<28} {kind:<7} {what:<28} {human(d['nbytes']):>10}  "
            f"crc32 {d['crc32']} {status}")


def render(report: dict, out=print) -> None:
    if report["kind"] == "directory":
        out(f"checkpoint directory {report['path']}")
        out(f"  committed epochs: {', '.join(map(str, report['committed'])) or 'none'}"
            + (f"; uncommitted (ignored): {', '.join(map(str, report['uncommitted']))}"
               if report["uncommitted"] else ""))
        for e in report["epochs"]:
            out(f"epoch {e['epoch']}: job {e.get('job_id')}, step {e.get('step')}, "
                f"{e.get('size')} rank(s), {human(e.get('bytes'))}, committed {e.get('time_iso')}")
            for info in e["ranks"]:
                _print_file(info, "  ", out)
    else:
        out(f"{report['kind']} {report['path']}"
            + (" (not committed: never used for a restart)" if report["kind"] != "file" else ""))
        for info in report["files"]:
            _print_file(info, "  ", out)


def main(args) -> int:
    path = Path(args.path)
    if not path.exists():
        raise NoCommittedEpoch(f"no committed epoch in checkpoint directory {path}: "
                               "the path does not exist")
    report = collect(path, args.epoch, verify=not args.no_verify)
    report["ok"] = not report["problems"]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        render(report)
        ndata = sum(len(f.get("datasets", [])) for e in report["epochs"] for f in e["ranks"]) + \
            sum(len(f.get("datasets", [])) for f in report.get("files", []))
        if report["problems"]:
            print(f"{len(report['problems'])} problem(s):")
            for p in report["problems"]:
                print(f"  PROBLEM: {p}")
        else:
            what = "checksums verified" if not args.no_verify else "checksums NOT verified"
            print(f"OK: {len(report['epochs']) or len(report['files'])} "
                  f"{'epoch(s)' if report['epochs'] else 'file(s)'}, {ndata} dataset(s), {what}")
    for p in report["problems"]:
        print(f"mpimig inspect: {p}", file=sys.stderr)
    return 1 if report["problems"] else 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect", help="list and verify checkpoints (epochs, ranks, datasets, checksums)",
        description=__doc__.split("\n\n")[1])
    p.add_argument("path", metavar="PATH",
                   help="checkpoint directory, epoch directory, or rank file")
    p.add_argument("--epoch", type=int, help="only this committed epoch (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("--no-verify", action="store_true",
                   help="list only; do not read the data to check checksums")
    p.set_defaults(func=main)
    return p
