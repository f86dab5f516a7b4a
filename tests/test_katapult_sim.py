"""``kflash._core.katapult_flash`` against the virtual printer bench's USB board.

The board runs its Klipper application on a pty with the /dev/serial and sysfs entries
a real one has; the flasher must touch it at 1200 baud, find it again as Katapult
through its stable identity, write and verify, and leave it running the new firmware.
"""

import json
import signal
import subprocess
import sys
import zlib

import pytest

from kflash import _core
from virtual_printer import wait_for

MCU = "stm32f446xx"
SERIAL = "SIMKATAPULT01"


def image(version, mcu=MCU, size=6000):
    """A klipper.bin-like image: code bytes with the data dictionary embedded."""
    dictionary = {
        "app": "Klipper",
        "version": version,
        "config": {"MCU": mcu, "CLOCK_FREQ": 180000000},
        "commands": {},
        "responses": {},
        "enumerations": {},
    }
    blob = zlib.compress(json.dumps(dictionary).encode())
    code = bytes((i * 13 + 5) & 0xFF for i in range(size))
    return code + blob + code[:100]


class Bench:
    def __init__(self, root, interface="usb"):
        self.dev = root / "dev"
        self.sys = root / "sys"
        self.state = root / "state"
        self.control = root / "control.json"
        for d in (self.dev, self.sys, self.state / "board"):
            d.mkdir(parents=True)
        (self.state / "board" / "flash.bin").write_bytes(image("v0.13.0-1-gold"))
        spec = {
            "dev_root": str(self.dev),
            "sys_root": str(self.sys),
            "state_dir": str(self.state),
            "control": str(self.control),
            "boards": [
                {
                    "name": "board",
                    "mcu": MCU,
                    "family": "stm32",
                    "serial": SERIAL,
                    "interface": interface,
                    "uart_index": 2,
                    "port": "1.2",
                    "app_start": 0x08008000,
                    "block_size": 64,
                }
            ],
        }
        (root / "spec.json").write_text(json.dumps(spec))
        spec_path = str(root / "spec.json")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtual_printer", "boards", "--spec", spec_path]
        )
        if interface == "usb":
            self.app_link = (
                self.dev / "serial/by-id" / f"usb-Klipper_{MCU}_{SERIAL}-if00"
            )
        else:
            self.app_link = self.dev / "ttyS2"
        wait_for(self.app_link.exists, 10, "the board's application")
        self.events = self.state / "board" / "events.log"

    def flashed(self):
        return (self.state / "board" / "flash.bin").read_bytes()

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


@pytest.fixture
def bench(tmp_path, monkeypatch):
    b = Bench(tmp_path)
    monkeypatch.setenv("KFLASH_DEV_ROOT", str(b.dev))
    monkeypatch.setenv("KFLASH_SYS_ROOT", str(b.sys))
    yield b
    b.close()


def test_flashes_a_running_board_through_the_1200_baud_touch(bench, tmp_path):
    firmware = tmp_path / "klipper.bin"
    new = image("v0.13.0-2-gnew")
    firmware.write_bytes(new)
    events = []
    result = _core.katapult_flash(
        str(bench.app_link), str(firmware), on_event=events.append
    )
    assert result["firmware_version"] == "v0.13.0-2-gnew"
    assert result["mcu"] == MCU
    assert result["completed"] is True
    assert "usb-katapult_" in result["device"]
    assert bench.flashed()[: len(new)] == new
    messages = [e["message"] for e in events]
    assert any("1200-baud touch" in m for m in messages)
    assert any(m.startswith("Katapult appeared on") for m in messages)
    # COMPLETE: the board leaves Katapult and runs the new application again.
    wait_for(bench.app_link.exists, 10, "the new application")


def test_refuses_firmware_for_another_mcu_and_leaves_the_board_running(bench, tmp_path):
    before = bench.flashed()
    firmware = tmp_path / "klipper.bin"
    firmware.write_bytes(image("v0.13.0-2-gnew", mcu="rp2040"))
    with pytest.raises(_core.FlashError, match="MCU mismatch.*rp2040.*stm32f446xx"):
        _core.katapult_flash(str(bench.app_link), str(firmware))
    assert bench.flashed() == before
    wait_for(bench.app_link.exists, 10, "the old application")


def test_a_board_falling_into_dfu_is_reported_not_flashed(bench, tmp_path):
    bench.control.write_text(json.dumps({"board": {"on_touch": "dfu"}}))
    firmware = tmp_path / "klipper.bin"
    firmware.write_bytes(image("v0.13.0-2-gnew"))
    with pytest.raises(_core.FlashError, match="STM32 DFU .*nothing was flashed"):
        _core.katapult_flash(str(bench.app_link), str(firmware))


def test_flashes_a_uart_board_after_the_request_string(tmp_path, monkeypatch):
    b = Bench(tmp_path, interface="uart")
    monkeypatch.setenv("KFLASH_DEV_ROOT", str(b.dev))
    monkeypatch.setenv("KFLASH_SYS_ROOT", str(b.sys))
    try:
        firmware = tmp_path / "klipper.bin"
        new = image("v0.13.0-3-guart")
        firmware.write_bytes(new)
        result = _core.katapult_flash(str(b.app_link), str(firmware), baud=250000)
        assert result["firmware_version"] == "v0.13.0-3-guart"
        assert b.flashed()[: len(new)] == new
        assert "serial bootloader request" in b.events.read_text()
    finally:
        b.close()
