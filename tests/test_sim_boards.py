"""Virtual boards without klippy: UART bootloader request, flash persistence."""

import json
import os
import shutil
import signal
import subprocess
import sys
import termios

import pytest

from virtual_printer import stack, tree, wait_for
from virtual_printer.client import KatapultClient
from virtual_printer.proto import SERIAL_BOOTLOADER_REQUEST

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("make") is None,
    reason="the bench tree needs gcc and make",
)


def start_boards(spec_path):
    env = dict(os.environ, PYTHONPATH=stack.PACKAGE_PARENT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtual_printer", "boards", "--spec", spec_path],
        env=env,
    )
    return proc


def stop_boards(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def events(state, name):
    try:
        with open(os.path.join(state, name, "events.log")) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def test_uart_board_request_string_flash_survives_restart(tmp_path):
    src = tree.materialise(str(tmp_path / "klipper"))
    cfg = tmp_path / "stm32.config"
    shutil.copy(os.path.join(src, tree.SAMPLE_CONFIGS["stm32f446"]), cfg)
    out = tree.build(src, str(cfg), str(tmp_path / "out"))
    with open(os.path.join(out, "klipper.dict")) as f:
        version = json.load(f)["version"]
    state = tmp_path / "state"
    spec = {
        "dev_root": str(tmp_path / "dev"),
        "sys_root": str(tmp_path / "sys"),
        "state_dir": str(state),
        "control": str(tmp_path / "control.json"),
        "boards": [
            {
                "name": "uart",
                "mcu": "stm32f446xx",
                "interface": "uart",
                "app_start": 0x8008000,
                "block_size": 128,
            }
        ],
    }
    os.makedirs(spec["dev_root"])
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    tty = os.path.join(spec["dev_root"], "ttyS0")

    proc = start_boards(str(spec_path))
    try:
        # No application in flash: the board sits in Katapult on its UART.
        wait_for(lambda: "bootloader" in events(state, "uart"), 10, "bootloader")
        with KatapultClient(tty) as client:
            client.connect()
            assert (client.mcu, client.block_size) == ("stm32f446xx", 128)
            with open(os.path.join(out, "klipper.bin"), "rb") as f:
                assert client.flash(f.read()).verified
            client.complete()
        wait_for(lambda: f"application {version}" in events(state, "uart"), 5, "app")
        assert not os.path.exists(os.path.join(spec["sys_root"], "class", "tty"))
        # The request string, at any baud, sends the application back to Katapult.
        fd = os.open(tty, os.O_RDWR | os.O_NOCTTY)
        attrs = termios.tcgetattr(fd)
        attrs[4] = attrs[5] = termios.B115200
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        os.write(fd, b"\x00junk" + SERIAL_BOOTLOADER_REQUEST)
        os.close(fd)
        wait_for(
            lambda: events(state, "uart").count(" bootloader\n") == 2, 5, "request"
        )
    finally:
        stop_boards(proc)
    assert not os.path.lexists(tty)  # unplugged on exit

    # A new process (power on) boots the image flashed before.
    proc = start_boards(str(spec_path))
    try:
        wait_for(
            lambda: events(state, "uart").count(f"application {version}") == 2,
            10,
            "the flashed application after power on",
        )
    finally:
        stop_boards(proc)
