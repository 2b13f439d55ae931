"""``mpimig.envflag.env_flag``: every on/off switch of the runtime read one way (the check was copied in
nine modules with three spellings: ``MPIMIG_HANDOVER_HUGEPAGES=on`` did nothing)."""
import pytest

from mpimig import envflag
from mpimig.envflag import env_flag


@pytest.mark.parametrize("value, default, want", [
    ("on", False, True), ("1", False, True), ("Yes", False, True), (" TRUE ", False, True),
    ("off", True, False), ("0", True, False), ("No", True, False), ("false", True, False),
    ("", True, True), ("", False, False), ("  ", False, False),
])
def test_a_switch_reads_on_and_off_in_any_spelling_and_unset_gives_the_default(monkeypatch, capsys, value, default,
                                                                             want):
    monkeypatch.setenv("MPIMIG_TEST_SWITCH", value)
    assert env_flag("MPIMIG_TEST_SWITCH", default) is want
    assert capsys.readouterr().err == ""


def test_an_unknown_value_gives_the_default_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(envflag, "_told", set())
    monkeypatch.setenv("MPIMIG_TEST_SWITCH", "ofF-please")
    assert env_flag("MPIMIG_TEST_SWITCH", True) is True
    assert env_flag("MPIMIG_TEST_SWITCH", True) is True
    err = capsys.readouterr().err
    assert err.count("MPIMIG_TEST_SWITCH='ofF-please' is neither on") == 1, err
    assert "using the default, on" in err


def test_the_runtimes_switches_use_it(monkeypatch):
    """Switches the old copies spelt only as "1" (hugepages) or without "shadow" read every spelling now."""
    from mpimig.migration import background, handover, wtrack
    monkeypatch.setenv("MPIMIG_HANDOVER_HUGEPAGES", "on")
    assert handover.huge_ok()
    monkeypatch.setenv("MPIMIG_HANDOVER_HUGEPAGES", "0")
    assert not handover.huge_ok()
    monkeypatch.setenv("MPIMIG_WTRACK", "shadow")
    assert wtrack.disabled_by_env()
    monkeypatch.setenv("MPIMIG_WTRACK", "False")
    assert wtrack.disabled_by_env()
    monkeypatch.setenv("MPIMIG_WTRACK", "on")
    assert not wtrack.disabled_by_env()
    monkeypatch.setenv("MPIMIG_SEND_THREAD", "no")
    assert background.thread_ok() == (False, "MPIMIG_SEND_THREAD=off")
