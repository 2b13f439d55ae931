"""The message storm's result: every rank's counts summed into rank 0's totals, and the lines a
runnable storm prints."""
from __future__ import annotations

import json
from typing import Any

#: the short summary the runnable scripts print
SHORT_KEYS = ("sent", "received", "lost", "duplicated", "out_of_order", "corrupted", "unexpected",
              "collective_errors")
#: counters summed over ranks into the result
SUM_KEYS = ["sent", "received", "expected", "lost", "duplicated", "out_of_order", "corrupted",
            "unexpected", "collective_errors", "pickled", "buffer", "wildcard", "kept_requests",
            "deferred", "probe", "stray", "held_total", "held_restored", "to_self"]


def combine(every: list[dict], **run: Any) -> dict:
    """Rank 0's result from every rank's counts (``run``: seed, steps, size, msgs)."""
    res: dict[str, Any] = {k: sum(int(e[k]) for e in every) for k in SUM_KEYS}
    res.update(run,
               held_max=max(e["held_max"] for e in every),
               held_at_start=sum(e["held_at_start"] for e in every),
               restarted=any(e["pid_role"] == "restarted" for e in every),
               start_step=min(e["start_step"] for e in every),
               migrated_ranks=sorted(r for r, e in enumerate(every) if e["pid_role"] == "migrated"),
               moves={str(r): e["moves"] for r, e in enumerate(every) if e["moves"]},
               notes=[n for e in every for n in e["notes"]][:40])
    res["errors"] = (res["lost"] + res["duplicated"] + res["out_of_order"] + res["corrupted"]
                     + res["unexpected"] + res["collective_errors"] + abs(res["sent"] - res["expected"]))
    res["ok"] = res["errors"] == 0
    return res


def summary(res: dict, notes: int = 10) -> str:
    """The lines a runnable storm prints: the short totals, OK or ERRORS, the first notes."""
    short = {k: res[k] for k in SHORT_KEYS}
    lines = ["storm " + json.dumps(short) + " " + ("OK" if res["ok"] else "ERRORS")]
    lines += [f"   {n}" for n in res["notes"][:notes]]
    return "\n".join(lines)
