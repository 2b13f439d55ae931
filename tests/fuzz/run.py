"""Coverage-guided fuzzing of mpimig's decoders with atheris (libFuzzer), bounded in time.

    python tests/fuzz/run.py envelope --seconds 60
    python tests/fuzz/run.py checkpoint-manifest --seconds 600 --corpus /tmp/corpus
    python tests/fuzz/run.py checkpoint-file --seconds 600      # may crash inside libhdf5, see below

Targets (tests/fuzz/targets.py): ``envelope`` (the migration message codec and
the held-message queue decoder), ``checkpoint-manifest`` (a committed epoch
whose manifest is the input or is mutated by it), ``checkpoint-file`` (its
rank file is the input, mutated or truncated by it: this goes through h5py
into libhdf5, which segfaults on some damaged files; libFuzzer then saves the
input as ``crash-*`` and exits non-zero), ``control`` (the control socket's
request validator, when this checkout has ``parse_request``).

Prints libFuzzer's own lines, ending with ``Done N runs in S second(s)`` and
its stats, or with the finding and its input saved as ``crash-*``; exit status
0 only when nothing was found (libFuzzer ends the process itself).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # tests/ (for fuzz.targets)

MODES = {"checkpoint-manifest": (1, 3, 4), "checkpoint-file": (0, 2, 5)}


def target(name: str):
    from fuzz import targets
    if name == "envelope":
        return targets.envelope
    if name == "control":
        if targets.control_parser() is None:
            raise SystemExit("fuzz control: this checkout's mpimig.migration.control has no parse_request")
        return targets.control
    if name in MODES:
        ck = targets.CheckpointTarget()
        modes = MODES[name]
        return lambda data: ck(bytes([modes[data[0] % len(modes)] if data else modes[0]]) + data[1:])
    raise SystemExit(f"fuzz: unknown target {name!r}; known: envelope, checkpoint-manifest, checkpoint-file, "
                     "control")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target")
    p.add_argument("--seconds", type=int, default=10, help="time budget (default 10)")
    p.add_argument("--corpus", help="corpus directory (read and extended)")
    p.add_argument("--runs", type=int, default=-1, help="stop after this many inputs (default: no limit)")
    args = p.parse_args(argv)
    import atheris
    with atheris.instrument_imports(include=["mpimig"]):
        import mpimig.checkpoint.format  # noqa: F401
        import mpimig.checkpoint.reader  # noqa: F401
        import mpimig.migration.control  # noqa: F401
    fn = target(args.target)
    lf = [sys.argv[0], f"-max_total_time={args.seconds}", f"-runs={args.runs}", "-rss_limit_mb=4096",
          "-print_final_stats=1"]
    if args.corpus:
        Path(args.corpus).mkdir(parents=True, exist_ok=True)
        lf.append(args.corpus)
    atheris.Setup(lf, fn)
    atheris.Fuzz()          # never returns: libFuzzer exits when the time is up or on a finding
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
