"""kflash flash-all end to end on the bench: real klippy and Moonraker, virtual boards.

The printer starts on firmware built from the tree's tag; flash-all must build HEAD,
stop klipper once, flash every MCU (Katapult over USB, the linux MCU by replace +
restart), restart klipper and verify that klippy reports the built version. Failure
modes of the mainboard must leave klipper restarted and the report saying what
happened and what to do.
"""


import pytest

from virtual_printer import tree
from virtual_printer.demo import flash_all, registered

pytestmark = pytest.mark.usefixtures("bench_tools")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    with registered(
        str(tmp_path_factory.mktemp("flashall")),
        build_cache=str(tmp_path_factory.getbasetemp() / "sim-build-cache"),
    ) as bench:
        yield bench


def test_flash_all_updates_every_mcu_with_one_stop(bench):
    p, env = bench
    target = tree.describe(p.tree)
    spawns = p.klipper_spawns()
    rc, report, res = flash_all(env)
    assert rc == 0, res.stdout + res.stderr
    assert (
        report["ok"] and report["service"]["stopped"] and report["service"]["restarted"]
    )
    assert p.klipper_spawns() == spawns + 1  # stopped once, started once
    for d in report["devices"]:
        assert (d["build"], d["flash"], d["verify"]) == ("pass", "pass", "pass"), d
        assert d["version_after"] == target
    versions = p.wait_ready()
    assert set(versions.values()) == {target}


def test_flash_all_after_a_version_only_change(bench):
    """Klipper's TRAP: no source changed, an incremental make keeps the old version."""
    p, env = bench
    tree.git(p.tree, "commit", "-q", "--allow-empty", "-m", "host-only change")
    target = tree.describe(p.tree)
    rc, report, res = flash_all(env)
    assert rc == 0, res.stdout + res.stderr
    assert {d["version_after"] for d in report["devices"]} == {target}
    assert set(p.wait_ready().values()) == {target}


@pytest.mark.parametrize(
    "faults,words",
    [
        ({"after_complete": "never"}, ["power"]),
        ({"after_complete": "dfu"}, ["dfu"]),
        ({"corrupt_readback": True}, ["checksum", "make flash"]),
        ({"on_touch": "dfu"}, ["dfu", "not katapult"]),
    ],
)
def test_failing_mainboard_is_reported_and_klipper_restarted(bench, faults, words):
    p, env = bench
    p.set_faults("mainboard", **faults)
    try:
        # The lost mainboard keeps klippy from `ready`: do not wait a minute for it.
        rc, report, res = flash_all(env, KFLASH_READY_TIMEOUT_S="10")
    finally:
        p.clear_faults()
    assert rc == 1, res.stdout + res.stderr
    assert report["service"]["restarted"]
    assert p.program_state("klipper") == "RUNNING"
    flashed = [d for d in report["devices"] if d["flash"] == "fail"]
    assert len(flashed) == 1, report  # only the mainboard failed to flash
    failed = flashed[0]
    assert failed["error"] and failed["hint"], failed
    text = (failed["error"] + " " + failed["hint"]).lower()
    assert any(w in text for w in words), text
    assert all(d["flash"] == "pass" for d in report["devices"] if d is not failed)
    # Recover the board for the next case: replug it, restart klipper.
    p.power_cycle("mainboard")
    p.wait_app(p.board("mainboard"), 10)
    p.stop_klipper()
    p.start_klipper()


@pytest.mark.parametrize(
    "faults",
    [{"nack_every": 50}, {"erase_delay": 0.004}],
    ids=["nacked-blocks", "slow-erase"],
)
def test_nacks_and_a_slow_board_are_recovered(bench, faults):
    """A board that NACKs some blocks or erases slowly still ends on the new version."""
    p, env = bench
    tree.git(p.tree, "commit", "-q", "--allow-empty", "-m", f"bump for {faults}")
    target = tree.describe(p.tree)
    p.set_faults("mainboard", **faults)
    try:
        rc, report, res = flash_all(env)
    finally:
        p.clear_faults()
    assert rc == 0, res.stdout + res.stderr
    assert report["service"]["restarted"]
    for d in report["devices"]:
        assert (d["flash"], d["verify"], d["version_after"]) == ("pass", "pass", target)
    assert set(p.wait_ready().values()) == {target}
    # The fault really happened: NACKed blocks were sent again; the slow erase (about
    # 800 blocks x 4 ms) shows in the mainboard's flash time next to the toolhead's.
    secs = {d["key"]: d["flash_s"] for d in report["devices"]}
    if "nack_every" in faults:
        assert "commands sent again" in res.stderr, res.stderr[-2000:]
    else:
        assert secs["mcu"] > secs["toolhead"] + 2.0, secs
