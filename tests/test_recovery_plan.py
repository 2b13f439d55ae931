"""The pure parts of online recovery (mpimig/ft/recovery.py): where buddy copies go and
the recovery plan every survivor computes from the census."""
from mpimig.ft.recovery import buddy_of, decide, role_in_plan


def census(*members):
    out = []
    for kind, rank, host in members:
        out.append({"kind": kind, "rank": rank, "host": host, "pid": len(out) + 100, "point": 7,
                    "recoveries": 0, "size": 4 if kind != "spare" else 0, "own_epoch": 1, "buddies": [],
                    "detected": 10.0 + len(out), "hosts": ["a", "a", "b", "b"] if kind == "rank" else [],
                    "argv": ["python", "app.py"], "cwd": "/"})
    return out


def test_buddy_is_the_next_rank_on_another_host():
    hosts = ["a", "a", "b", "b", "c"]
    assert [buddy_of(r, hosts) for r in range(5)] == [2, 2, 4, 4, 0]
    assert [buddy_of(r, ["a"] * 3) for r in range(3)] == [1, 2, 0]      # one host: the next rank


def test_dead_ranks_take_spares_away_from_the_failed_host_first():
    # ranks 2 and 3 (host b) died; spares on b and c: c's spare is taken first
    table = census(("coordinator", -1, "a"), ("rank", 0, "a"), ("rank", 1, "a"),
                   ("spare", -1, "b"), ("spare", -1, "c"))
    plan = decide(table)
    assert plan["dead"] == [2, 3] and not plan["coordinator_failed"]
    assert plan["assign"] == {2: ("spare", 4), 3: ("spare", 3)}
    assert plan["spawn_hosts"] == [] and plan["coord"] == ("alive", 0)
    assert plan["detected"] == 10.0 and plan["failed_point"] == 7
    assert role_in_plan(plan, table, s_rank=4) == ("rank", 2)
    assert role_in_plan(plan, table, s_rank=1) == ("rank", 0)


def test_without_spares_replacements_are_spawned_on_the_least_loaded_live_host():
    table = census(("coordinator", -1, "a"), ("rank", 0, "a"), ("rank", 1, "a"), ("rank", 3, "b"))
    plan = decide(table)
    assert plan["dead"] == [2] and plan["assign"] == {2: ("spawn", 0)}
    assert plan["spawn_hosts"] == ["a"]      # b is where rank 2 died; a still lives
    assert role_in_plan(plan, table, spawn_k=0) == ("rank", 2)


def test_a_dead_coordinator_is_replaced_by_a_spare_else_spawned():
    with_spare = census(("rank", 0, "a"), ("rank", 1, "a"), ("rank", 2, "b"), ("rank", 3, "b"), ("spare", -1, "b"))
    plan = decide(with_spare)
    assert plan["coordinator_failed"] and plan["coord"] == ("spare", 4) and plan["dead"] == []
    assert role_in_plan(plan, with_spare, s_rank=4) == ("coordinator", -1)
    alone = census(("rank", 0, "a"), ("rank", 1, "a"), ("rank", 2, "b"), ("rank", 3, "b"))
    plan = decide(alone)
    assert plan["coord"] == ("spawn", 0) and len(plan["spawn_hosts"]) == 1
    assert role_in_plan(plan, alone, spawn_k=0) == ("coordinator", -1)
