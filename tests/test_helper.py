"""The detached helper (`python -m kflash.helper`) with the real engine on the
CLI sandbox (tests/sandbox.py: real builds, command-backed service control,
fake boards): its run record and progress, its exit codes, signals, one run
at a time, the pending request of the installed unit."""

import json
import os
import signal
import subprocess
import sys

import pytest

from kflash import Runs, render
from virtual_printer import tree


def two_boards(sandbox):
    sandbox.add_board("octopus")
    sandbox.add_board("ebb", mcu="rp2040")
    return sandbox.start_moonraker()


def helper(sandbox, *args):
    proc = subprocess.Popen(
        [sys.executable, "-m", "kflash.helper", "--home", str(sandbox.home),
         *args], env=sandbox.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    sandbox.procs.append(proc)
    return proc


def blocked(sandbox, run_id):
    """A helper run stuck flashing octopus (klipper stopped). A first signal lets
    the board being written finish, bounded by its flash time limit: 8 s here."""
    two_boards(sandbox)
    sandbox.settings(flash_timeout_s=8)
    sandbox.set_behaviour("octopus", "hang")
    proc = helper(sandbox, "--run-id", run_id)
    sandbox.wait_for(lambda: (sandbox.root / "hanging").exists(), timeout=60,
                     what="the flash to block")
    assert sandbox.service_events() == ["stop"]
    return proc


def test_a_run_leaves_its_record_and_progress(sandbox):
    two_boards(sandbox)
    proc = helper(sandbox, "--run-id", "20260101T000000Z-1", "--device",
                  "ebb")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    runs = Runs(sandbox.home)
    rec = runs.get("20260101T000000Z-1")
    assert rec["state"] == "finished" and rec["ok"] is True
    assert rec["exit_code"] == 0 and rec["interrupted"] is None
    assert rec["pid"] == proc.pid
    assert rec["options"] == {"keys": ["ebb"], "only_outdated": False,
                              "yes": True, "rollback": False}
    assert rec["watchdog"] == "disarmed"
    assert rec["service"]["backend"] == "command"
    assert [d["key"] for d in rec["report"]["devices"]] == ["ebb"]
    assert rec["report"]["devices"][0]["flash"] == "pass"
    assert rec["report"]["record"].endswith("runs/20260101T000000Z-1.json")
    assert sandbox.service_events() == ["stop", "start"]
    events, offset = runs.events(rec["run_id"])
    stages = [e["stage"] for e in events]
    for stage in ("plan", "preflight", "build", "stop", "flash", "restart",
                  "verify"):
        assert stage in stages, stages
    assert all(e["run_id"] == rec["run_id"] for e in events)
    assert runs.events(rec["run_id"], offset) == ([], offset)
    assert runs.latest()["run_id"] == rec["run_id"] and runs.busy() is None
    # the watchdog stood down when the run ended
    sandbox.wait_for(lambda: "standing down" in (sandbox.home /
                                                "watchdog.log").read_text(),
                     what="the watchdog to stand down")
    # the next run is the newest
    proc = helper(sandbox, "--run-id", "20260101T000001Z-1", "--device",
                  "ebb")
    assert proc.wait(120) == 0
    assert runs.latest()["run_id"] == "20260101T000001Z-1"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_unwinds_through_the_restart_and_the_record_says_so(
        sandbox, sig):
    proc = blocked(sandbox, "R-SIG")
    rec = Runs(sandbox.home).get("R-SIG")
    assert rec["state"] == "running" and rec["watchdog"] == "armed"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert sandbox.service_events() == ["stop", "start"]
    rec = Runs(sandbox.home).get("R-SIG")
    assert rec["state"] == "finished" and rec["ok"] is False
    assert rec["interrupted"] == f"stopped by {sig.name}"
    assert rec["report"]["cancelled"] is True
    assert rec["report"]["service"]["restarted"] is True
    events, _ = Runs(sandbox.home).events("R-SIG")
    assert any("interrupted: finishing octopus first" in e["message"]
               for e in events), events
    _, errors = render.summary(rec)
    assert f"interrupted (stopped by {sig.name})" in errors[-1]
    assert "klipper was started again" in errors[-1]


def test_one_run_at_a_time(sandbox):
    proc = blocked(sandbox, "R-FIRST")
    runs = Runs(sandbox.home)
    assert "another kflash run is in progress" in runs.busy()
    second = helper(sandbox, "--run-id", "R-SECOND")
    out, err = second.communicate(timeout=60)
    assert second.returncode == 3, err
    assert "another kflash run" in err
    assert runs.get("R-SECOND") is None
    assert runs.latest()["run_id"] == "R-FIRST"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert sandbox.service_events() == ["stop", "start"]


def test_a_killed_helper_reads_as_interrupted_and_its_watchdog_starts_klipper(
        sandbox):
    proc = blocked(sandbox, "R-KILL")
    proc.kill()
    proc.communicate()
    sandbox.wait_for(lambda: sandbox.service_events() == ["stop", "start"],
                     timeout=10, what="the watchdog to start klipper")
    rec = Runs(sandbox.home).get("R-KILL")
    assert rec["state"] == "interrupted"
    assert f"pid {proc.pid}" in rec["interrupted"]
    assert "during flash of octopus" in rec["interrupted"]
    log = (sandbox.home / "watchdog.log").read_text()
    assert "the runner went away without finishing" in log
    assert "started again" in log
    status = sandbox.json("status")
    assert status["last_run"]["state"] == "interrupted"


def test_the_installed_units_pending_request(sandbox):
    two_boards(sandbox)
    pending = sandbox.home / "runs" / "pending.json"
    pending.parent.mkdir(parents=True)
    pending.write_text(json.dumps({"version": 1, "run_id": "R-UNIT",
                                   "only_outdated": True, "device": None}))
    proc = helper(sandbox, "--pending")
    assert proc.wait(120) == 0, proc.stderr.read()
    assert not pending.exists()
    rec = Runs(sandbox.home).get("R-UNIT")
    assert rec["options"]["only_outdated"] is True and rec["ok"] is True
    # no request: a usage error, no run
    proc = helper(sandbox, "--pending")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no pending run" in err
    assert Runs(sandbox.home).latest()["run_id"] == "R-UNIT"


def test_the_installed_units_pending_rollback(sandbox):
    """Moonraker's kflash-run unit: a rollback request puts back the image
    last verified on the board, not the newer build."""
    sandbox.add_board("ebb", mcu="rp2040")
    sandbox.start_moonraker()
    good = sandbox.json("flash-all")["target_version"]
    tree.git(str(sandbox.klipper), "commit", "-q", "--allow-empty", "-m",
             "newer")
    sandbox.json("flash-all")  # newer, verified: now its last-known-good
    newer = sandbox.flashed_version(sandbox.boards["ebb"])
    assert newer != good
    sandbox.flash_by_hand("ebb", good)  # and back to the old one by hand
    pending = sandbox.home / "runs" / "pending.json"
    pending.write_text(json.dumps({"version": 1, "run_id": "R-BACK",
                                   "only_outdated": False, "device": "ebb",
                                   "rollback": True}))
    proc = helper(sandbox, "--pending")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert sandbox.flashed_version(sandbox.boards["ebb"]) == newer
    rec = Runs(sandbox.home).get("R-BACK")
    assert rec["ok"] is True and rec["options"]["rollback"] is True
    assert rec["report"]["devices"][0]["version_before"] == good
    assert rec["report"]["devices"][0]["version_after"] == newer


def test_a_run_that_cannot_start_still_leaves_its_record(sandbox):
    """A registry the engine cannot read: the run is recorded as failed
    (the extra reports that), nothing is stopped."""
    (sandbox.home / "devices.json").write_text('{"version": 1, "devices": [')
    proc = helper(sandbox, "--run-id", "R-BAD")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    rec = Runs(sandbox.home).get("R-BAD")
    assert rec["state"] == "finished" and rec["ok"] is False
    assert "devices.json" in rec["error"]
    assert sandbox.service_events() == []
    assert os.path.exists(sandbox.home / "runs" / "R-BAD.jsonl")
