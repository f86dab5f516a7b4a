"""flash-all end to end: real builds and processes, fake hardware (sandbox.py)."""

import json
import signal
import subprocess
import threading
import time

import pytest

from sandbox import KFLASH
from virtual_printer import tree


def two_boards(sandbox):
    sandbox.add_board("octopus")
    sandbox.add_board("ebb", mcu="rp2040")
    return sandbox.start_moonraker()


def test_stops_once_flashes_all_restarts_once_and_verifies(sandbox):
    two_boards(sandbox)
    report = sandbox.json("flash-all")
    assert sandbox.service_events() == ["stop", "start"]
    assert report["ok"] is True
    assert report["service"]["stopped"] and report["service"]["restarted"]
    target = report["target_version"]
    assert target.startswith("v0.13.0-0-g")
    for dev in report["devices"]:
        assert (dev["build"], dev["flash"], dev["verify"]) == ("pass", "pass", "pass")
        assert dev["version_after"] == target
        assert dev["method"] == "katapult"
        # Each flash's time is reported, and the single stop window holds them all.
        assert dev["flash_s"] > 0
    flashing = sum(d["flash_s"] for d in report["devices"])
    assert report["service"]["downtime_s"] >= flashing - 0.05  # rounded to 0.1 s
    assert sandbox.flashed_version(sandbox.boards["octopus"]) == target
    with open(report["record"]) as f:
        record = json.load(f)
    assert record["ok"] is True and len(record["report"]["devices"]) == 2


def test_json_stdout_is_one_document_and_progress_goes_to_stderr(sandbox):
    two_boards(sandbox)
    result = sandbox.run("flash-all", "--json")
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)  # exactly one document, nothing else
    assert "Programming Complete" in result.stderr


def test_second_run_uses_the_cache_and_only_outdated_skips(sandbox):
    two_boards(sandbox)
    sandbox.json("flash-all")
    again = sandbox.json("flash-all")
    assert [d["build"] for d in again["devices"]] == ["cached", "cached"]
    skip = sandbox.json("flash-all", "--only-outdated")
    assert [d["action"] for d in skip["devices"]] == ["skip", "skip"]
    assert skip["service"]["stopped"] is False
    # Two stop windows so far, never more.
    assert sandbox.service_events() == ["stop", "start", "stop", "start"]


def test_one_failing_device_does_not_stop_the_others(sandbox):
    two_boards(sandbox)
    sandbox.add_board("bad")
    sandbox.set_behaviour("bad", "fail")
    report = sandbox.json("flash-all", code=1)
    assert sandbox.service_events() == ["stop", "start"]
    by_key = {d["key"]: d for d in report["devices"]}
    assert by_key["bad"]["flash"] == "fail"
    assert by_key["bad"]["error"]
    assert by_key["octopus"]["verify"] == "pass"
    assert by_key["ebb"]["verify"] == "pass"


def test_device_in_dfu_is_a_failure_with_recovery_steps(sandbox):
    two_boards(sandbox)
    sandbox.set_behaviour("octopus", "dfu")
    report = sandbox.json("flash-all", code=1)
    octopus = report["devices"][0]
    assert octopus["flash"] == "fail"
    assert "not Katapult" in octopus["error"]
    assert "BOOT0" in octopus["hint"] and "0483:df11" in octopus["hint"]
    assert report["devices"][1]["verify"] == "pass"
    assert sandbox.service_events() == ["stop", "start"]


def test_nothing_is_stopped_when_every_build_fails(sandbox):
    sandbox.add_board("broken", fail_build=True)
    sandbox.start_moonraker()
    report = sandbox.json("flash-all", code=1)
    assert report["devices"][0]["build"] == "fail"
    assert "fixture failure requested" in report["devices"][0]["error"]
    assert sandbox.service_events() == []


def test_boards_that_built_are_flashed_when_another_build_fails(sandbox):
    two_boards(sandbox)
    sandbox.add_board("broken", fail_build=True)
    report = sandbox.json("flash-all", code=1)
    by_key = {d["key"]: d for d in report["devices"]}
    assert by_key["broken"]["build"] == "fail"
    assert by_key["broken"]["flash"] == "skip"
    assert by_key["octopus"]["flash"] == "pass"
    assert sandbox.service_events() == ["stop", "start"]


def test_printing_refuses_before_anything(sandbox):
    moonraker = two_boards(sandbox)
    for state in ("printing", "paused"):
        moonraker.print_state = state
        result = sandbox.run("flash-all", "--yes")
        assert result.returncode == 3, result.stderr
        assert state in result.stderr
    assert sandbox.service_events() == []
    assert not (sandbox.home / "builds").exists()


def test_no_moonraker_needs_yes(sandbox):
    sandbox.add_board("octopus")
    result = sandbox.run("flash-all")
    assert result.returncode == 3
    assert "Moonraker" in result.stderr and "--yes" in result.stderr
    assert sandbox.service_events() == []
    # With --yes it proceeds; without Moonraker nothing can be verified.
    report = sandbox.json("flash-all", "--yes", code=1)
    assert sandbox.service_events() == ["stop", "start"]
    assert report["devices"][0]["flash"] == "pass"
    assert report["devices"][0]["verify"] == "fail"


def test_no_service_control_refuses(sandbox):
    two_boards(sandbox)
    sandbox.settings(stop_command="/nonexistent/stop-klipper")
    result = sandbox.run("flash-all")
    assert result.returncode == 3, result.stderr
    assert "/nonexistent/stop-klipper" in result.stderr
    assert sandbox.service_events() == []


def test_restart_failure_is_exit_4_with_instructions(sandbox):
    two_boards(sandbox)
    sandbox.settings(start_command="false")
    result = sandbox.run("flash-all")
    assert result.returncode == 4, result.stderr
    assert "KLIPPER IS NOT RUNNING" in result.stderr
    assert "false" in result.stderr  # the start command to run by hand


def test_plan_has_no_side_effects(sandbox):
    two_boards(sandbox)
    sandbox.json("build")
    before = sandbox.snapshot_state()
    plan = sandbox.json("plan")
    assert [d["action"] for d in plan["devices"]] == ["flash", "flash"]
    assert plan["devices"][0]["state"] == "outdated"
    assert sandbox.snapshot_state() == before
    assert sandbox.service_events() == []


def test_flash_one_device(sandbox):
    two_boards(sandbox)
    report = sandbox.json("flash", "ebb")
    assert [d["key"] for d in report["devices"]] == ["ebb"]
    assert sandbox.service_events() == ["stop", "start"]
    assert sandbox.flashed_version(sandbox.boards["octopus"]) is None


def start_blocked_run(sandbox):
    two_boards(sandbox)
    sandbox.set_behaviour("octopus", "hang")
    proc = sandbox.spawn("flash-all", "--json")
    sandbox.wait_for(
        lambda: (sandbox.root / "hanging").exists(), timeout=60, what="flash to block"
    )
    assert sandbox.service_events() == ["stop"]
    return proc


def wait_for_line(proc, word, timeout=30):
    """Read the run's stderr until a line holds ``word`` (the lines read so far)."""
    lines = []
    found = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if word in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), f"no line with {word!r} in:\n{''.join(lines)}"
    return lines


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_second_signal_abandons_the_board_being_written(sandbox, sig):
    proc = start_blocked_run(sandbox)
    proc.send_signal(sig)
    # The first signal finishes the board being written (here: one that hangs).
    wait_for_line(proc, "interrupted: finishing octopus first")
    assert sandbox.service_events() == ["stop"]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert sandbox.service_events() == ["stop", "start"]
    report = json.loads(out)
    assert report["cancelled"] is True
    assert report["service"]["restarted"] is True
    octopus, ebb = report["devices"]
    assert "abandoned" in octopus["error"], octopus
    assert "kflash flash-all" in octopus["hint"], octopus
    # The board after it was not flashed, and the report says how to flash it.
    assert ebb["flash"] == "skip"
    assert "kflash flash ebb" in ebb["hint"], ebb


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_one_signal_finishes_the_board_being_written_then_restarts(sandbox, sig):
    two_boards(sandbox)
    sandbox.set_behaviour("octopus", "slow")
    proc = sandbox.spawn("flash-all", "--json")
    sandbox.wait_for(
        lambda: (sandbox.root / "writing").exists(), timeout=60, what="the write"
    )
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "interrupted: finishing octopus first" in err
    report = json.loads(out)
    octopus, ebb = report["devices"]
    assert octopus["flash"] == "pass", octopus
    assert sandbox.flashed_version(sandbox.boards["octopus"]) is not None
    assert (ebb["flash"], ebb["reason"]) == ("skip", "cancelled before flashing")
    assert "kflash flash ebb" in ebb["hint"]
    assert report["cancelled"] and report["service"]["restarted"]
    assert sandbox.service_events() == ["stop", "start"]
    # Nothing is left for a recovery.
    assert not (sandbox.home / "pending.json").exists()


def test_the_finish_is_bounded_by_the_flash_time_limit(sandbox):
    sandbox.settings(flash_timeout_s=3)
    proc = start_blocked_run(sandbox)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 15, err
    assert proc.returncode == 1, err
    assert sandbox.service_events() == ["stop", "start"]
    assert json.loads(out)["service"]["restarted"] is True


def test_a_run_under_nohup_ignores_sighup(sandbox):
    two_boards(sandbox)
    sandbox.set_behaviour("octopus", "slow")
    proc = subprocess.Popen(
        [*KFLASH, "flash-all", "--json"],
        env=sandbox.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # What nohup does before it runs the command.
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    sandbox.procs.append(proc)
    sandbox.wait_for(
        lambda: (sandbox.root / "writing").exists(), timeout=60, what="the write"
    )
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["ok"] and not report["cancelled"]
    assert [d["flash"] for d in report["devices"]] == ["pass", "pass"]


def test_sigkill_of_the_runner_is_recovered_by_the_watchdog(sandbox):
    proc = start_blocked_run(sandbox)
    proc.kill()
    proc.communicate()
    started = time.monotonic()
    sandbox.wait_for(
        lambda: sandbox.service_events() == ["stop", "start"],
        timeout=10,
        what="the watchdog to start klipper",
    )
    assert time.monotonic() - started < 10


def test_a_second_run_is_refused_while_one_holds_the_lock(sandbox):
    proc = start_blocked_run(sandbox)
    second = sandbox.run("flash-all", "--yes")
    assert second.returncode == 3
    assert "another kflash run" in second.stderr
    # Ctrl+C twice: the hanging board is abandoned.
    proc.send_signal(signal.SIGINT)
    wait_for_line(proc, "interrupted: finishing")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert sandbox.service_events() == ["stop", "start"]


def test_status_after_a_run(sandbox):
    two_boards(sandbox)
    before = sandbox.json("status")
    assert [d["state"] for d in before["devices"]] == ["outdated", "outdated"]
    assert before["last_run"] is None
    sandbox.json("flash-all")
    after = sandbox.json("status")
    assert [d["state"] for d in after["devices"]] == ["current", "current"]
    assert after["last_run"]["ok"] is True
    assert "current" in sandbox.ok("status").stdout


def test_plan_says_whether_an_update_changes_the_protocol(sandbox):
    sandbox.add_board("octopus")
    sandbox.start_moonraker()
    sandbox.json("flash-all")
    # A host-only update: a new commit, no firmware source changed.
    tree.git(str(sandbox.klipper), "commit", "-q", "--allow-empty", "-m", "host")
    sandbox.json("build")
    (dev,) = sandbox.json("plan")["devices"]
    assert dev["state"] == "outdated"
    assert "version string only" in dev["reason"], dev
    # A firmware change: a new source file adds a command.
    extra = sandbox.klipper / "src" / "extra" / "extra.c"
    extra.parent.mkdir()
    extra.write_text('#include "command.h"\nDECL_COMMAND(command_extra, "extra");\n')
    tree.git(str(sandbox.klipper), "add", "-A")
    tree.git(str(sandbox.klipper), "commit", "-q", "-m", "firmware")
    sandbox.json("build")
    (dev,) = sandbox.json("plan")["devices"]
    assert "protocol changed" in dev["reason"], dev


def one_document(result, code):
    """``flash-all --json`` exited with ``code`` and printed exactly one document."""
    assert result.returncode == code, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert isinstance(doc, dict)
    return doc


def test_json_exit_0_all_good(sandbox):
    two_boards(sandbox)
    doc = one_document(sandbox.run("flash-all", "--json"), 0)
    assert doc["ok"] is True and doc["service"]["restarted"] is True


def test_json_exit_1_a_device_failed(sandbox):
    two_boards(sandbox)
    sandbox.set_behaviour("octopus", "fail")
    doc = one_document(sandbox.run("flash-all", "--json"), 1)
    assert doc["ok"] is False and doc["service"]["restarted"] is True
    assert doc["devices"][0]["flash"] == "fail"


def test_json_exit_2_configuration_error_is_an_error_document(sandbox):
    two_boards(sandbox)
    (sandbox.home / "configs" / "ebb.config").unlink()
    doc = one_document(sandbox.run("flash-all", "--json"), 2)
    assert doc["ok"] is False and doc["exit_code"] == 2
    assert doc["kind"] == "ConfigError"
    assert (doc["device"], doc["step"]) == ("ebb", "plan")
    assert "kflash config ebb" in doc["error"]
    assert sandbox.service_events() == []


def test_json_exit_3_refused_is_an_error_document(sandbox):
    two_boards(sandbox).print_state = "printing"
    doc = one_document(sandbox.run("flash-all", "--json"), 3)
    assert doc["ok"] is False and doc["exit_code"] == 3
    assert doc["kind"] == "PreflightRefused" and "printing" in doc["error"]
    # Without Moonraker and without --yes: refused too, and says so.
    sandbox.moonraker.close()
    sandbox.moonraker = None
    doc = one_document(sandbox.run("flash-all", "--json"), 3)
    assert doc["kind"] == "MoonrakerUnavailable" and "--yes" in doc["error"]
    assert sandbox.service_events() == []


def test_json_exit_4_klipper_not_restarted(sandbox):
    two_boards(sandbox)
    sandbox.settings(start_command="false")
    result = sandbox.run("flash-all", "--json")
    doc = one_document(result, 4)
    assert doc["service"]["stopped"] is True
    assert doc["service"]["restarted"] is False
    assert "KLIPPER IS NOT RUNNING" in result.stderr


def test_build_json_lists_every_device_when_one_fails(sandbox):
    sandbox.add_board("octopus")
    sandbox.add_board("broken", fail_build=True)
    results = sandbox.json("build", code=1)
    assert [(r["key"], r["build"]) for r in results] == [
        ("octopus", "pass"),
        ("broken", "fail"),
    ]


def test_a_board_in_katapult_is_named_by_plan_and_status_and_flashed_first(sandbox):
    two_boards(sandbox)
    sandbox.enter_katapult("octopus")
    plan = sandbox.json("plan")
    octopus = plan["devices"][0]
    assert "octopus is in its bootloader" in octopus["reason"], octopus
    assert octopus["bootloader"].startswith("Katapult on"), octopus
    assert octopus["action"] == "flash"
    status = sandbox.json("status")
    assert status["devices"][0]["bootloader"].startswith("Katapult on")
    assert "octopus is in its bootloader" in sandbox.ok("status").stdout
    report = sandbox.json("flash-all")
    assert report["ok"], report
    flashed = sandbox.flashed_version(sandbox.boards["octopus"])
    assert flashed == report["target_version"]
    assert sandbox.json("plan")["devices"][0]["bootloader"] is None


def test_a_board_in_dfu_is_found_on_its_usb_port_with_a_hint(sandbox):
    two_boards(sandbox)
    sandbox.json("flash-all")  # kflash learns where each board is plugged in
    sandbox.enter_dfu("octopus")
    (octopus, ebb) = sandbox.json("plan")["devices"]
    assert octopus["action"] == "error"
    assert "octopus is in its bootloader (STM32 DFU (0483:df11)" in octopus["reason"]
    assert "0483:df11" in octopus["hint"] and len(octopus["hint"].splitlines()) == 2
    assert ebb["action"] == "flash"


def test_rollback_writes_what_was_last_verified_on_each_board(sandbox):
    two_boards(sandbox)
    nothing = sandbox.json("rollback")
    assert [d["action"] for d in nothing["devices"]] == ["skip", "skip"]
    assert "no last-known-good" in nothing["devices"][0]["reason"]
    assert sandbox.service_events() == []
    first = sandbox.json("flash-all")
    # A newer build that was never verified on the boards.
    tree.git(str(sandbox.klipper), "commit", "-q", "--allow-empty", "-m", "newer")
    sandbox.json("build")
    report = sandbox.json("rollback")
    assert report["ok"], report
    assert report["target_version"] == first["target_version"]
    for d in report["devices"]:
        assert d["reason"].startswith("roll back to " + first["target_version"]), d
        assert d["verify"] == "pass"
    log = (sandbox.root / "flashtool.log").read_text()
    assert log.count("ok") == 4
    assert sandbox.service_events() == ["stop", "start", "stop", "start"]
