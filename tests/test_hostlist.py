"""Slurm hostlists, counts, durations and node states: pure functions, no Slurm needed."""
import pytest
from hypothesis import given, settings, strategies as st

from mpimig.launch.slurm import (LaunchPlan, SlurmError, SlurmJob, compress_hostlist, expand_counts,
                          expand_hostlist, parse_duration, state_is_usable)


@pytest.mark.parametrize("text, names", [
    ("", []),
    ("n1", ["n1"]),
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("n[01-03],m4", ["n01", "n02", "n03", "m4"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("h[1-2],h5,g[3]", ["h1", "h2", "h5", "g3"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("a1b[2-3]", ["a1b2", "a1b3"]),
    ("login,n[1-2] x", ["login", "n1", "n2", "x"]),
])
def test_expand(text, names):
    assert expand_hostlist(text) == names


@pytest.mark.parametrize("bad", ["n[1-", "n]1[", "n[3-1]", "n[a-b]", "n[1-2", "n[[1]]"])
def test_expand_rejects_malformed_and_names_it(bad):
    with pytest.raises(SlurmError, match="hostlist"):
        expand_hostlist(bad)


@pytest.mark.parametrize("names, text", [
    (["n1", "n2", "n3", "n5"], "n[1-3,5]"),
    (["n01", "n02", "n03", "m4"], "n[01-03],m4"),
    (["n9", "n10", "n11"], "n[9-11]"),
    (["n09", "n10"], "n[09-10]"),
    (["n1", "n01"], "n[1,01]"),
    (["login"], "login"),
    (["h3", "h1", "h2", "h1"], "h[1-3]"),
])
def test_compress(names, text):
    assert compress_hostlist(names) == text


name = st.builds(
    lambda prefix, num, width, suffix: f"{prefix}{str(num).zfill(width)}{suffix}",
    st.sampled_from(["n", "node", "h", "rack1-n", "gpu"]),
    st.integers(0, 120), st.integers(1, 4), st.sampled_from(["", "-ib"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(name | st.sampled_from(["login", "head"]), max_size=25))
def test_compress_then_expand_keeps_the_set(names):
    text = compress_hostlist(names)
    back = expand_hostlist(text)
    assert sorted(back) == sorted(set(names))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 5)), min_size=1, max_size=6),
       st.integers(1, 3))
def test_expand_ranges_match_a_python_model(ranges, width):
    body = ",".join(f"{str(lo).zfill(width)}-{str(lo + k).zfill(width)}" for lo, k in ranges)
    want = [f"x{str(i).zfill(width)}" for lo, k in ranges for i in range(lo, lo + k + 1)]
    assert expand_hostlist(f"x[{body}]") == want


def test_counts():
    assert expand_counts("2(x3),1") == [2, 2, 2, 1]
    assert expand_counts("4") == [4]
    assert expand_counts("") == []
    with pytest.raises(SlurmError):
        expand_counts("2(3)")


@pytest.mark.parametrize("text, seconds", [
    ("UNLIMITED", None), ("NOT_SET", None), ("5", 300.0), ("1:30", 90.0), ("2:00:05", 7205.0),
    ("1-00:00:00", 86400.0), ("1-2", 93600.0), ("1-2:3", 93780.0), ("0:00", 0.0),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("state, ok", [
    ("idle", True), ("mixed", True), ("allocated", True), ("completing", True),
    ("down", False), ("down*", False), ("idle*", False), ("drained", False), ("draining", False),
    ("fail", False), ("maint", False), ("unknown", False), ("powered_down", False), ("", False),
])
def test_node_states(state, ok):
    assert state_is_usable(state) is ok


JOB_ENV = {
    "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-3],m1", "SLURM_TASKS_PER_NODE": "2(x4)",
    "SLURM_JOB_CPUS_PER_NODE": "4(x4)", "SLURM_NTASKS": "8", "SLURM_RESTART_COUNT": "2",
    "SLURM_JOB_END_TIME": "2000000000", "SLURMD_NODENAME": "n1", "SLURM_NTASKS_PER_NODE": "2",
}


def test_job_from_env():
    job = SlurmJob.from_env(JOB_ENV)
    assert job.job_id == "42" and job.nodes == ["n1", "n2", "n3", "m1"]
    assert job.tasks_per_node == [2, 2, 2, 2] and job.ntasks == 8
    assert job.restart_count == 2 and job.end_time == 2e9 and job.this_node == "n1"
    assert job.time_left(query=False) > 0
    assert not SlurmJob.in_job({}) and SlurmJob.in_job(JOB_ENV)
    with pytest.raises(SlurmError, match="not inside a Slurm job"):
        SlurmJob.from_env({})


def test_plan_keeps_spares_listed(monkeypatch):
    job = SlurmJob.from_env(JOB_ENV)
    monkeypatch.setattr(job, "node_states",
                        lambda: {"n1": "idle", "n2": "down*", "n3": "idle", "m1": "idle"})
    assert job.down_nodes() == ["n2"]
    plan = job.plan(n_nodes=1)
    assert plan == LaunchPlan(["n1"], ["n3", "m1"], 2)
    assert plan.mpiexec_args("openmpi") == ["-n", "2", "--host", "n1:2,n3:2,m1:2",
                                            "--map-by", "ppr:2:node:OVERSUBSCRIBE"]
    assert plan.mpiexec_args("mpich") == ["-n", "2", "-hosts", "n1:2,n3:2,m1:2", "-ppn", "2"]
    assert job.spare_nodes(["n1"]) == ["n3", "m1"]
    assert job.usable_nodes(exclude_down=False) == job.nodes
    with pytest.raises(SlurmError, match="4 nodes wanted but 3 usable"):
        job.plan(n_nodes=4)
