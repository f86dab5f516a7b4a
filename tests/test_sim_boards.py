"""Virtual boards without klippy: UART bootloader request, flash persistence."""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
import tty

import pytest

import kflash
from virtual_printer import stack, tree, wait_for
from virtual_printer.proto import SERIAL_BOOTLOADER_REQUEST

pytestmark = pytest.mark.usefixtures("bench_tools")


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


def answers(path, data, wait=2.0):
    """Write `data` to the tty (raw) and decode what comes back until a frame does."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd, termios.TCSANOW)
        os.write(fd, data)
        got = b""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            if select.select([fd], [], [], left)[0]:
                got += os.read(fd, 4096)
                frames = kflash.katapult_decode(got)
                if any(f["response"] != "garbage" for f in frames):
                    return frames
        return kflash.katapult_decode(got)
    finally:
        os.close(fd)


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
    uart_tty = os.path.join(spec["dev_root"], "ttyS0")

    proc = start_boards(str(spec_path))
    try:
        # No application in flash: the board sits in Katapult on its UART.
        wait_for(lambda: "bootloader" in events(state, "uart"), 10, "bootloader")
        # Garbage earns exactly one NACK, as from real Katapult.
        assert answers(uart_tty, b"\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd") == [
            {"response": "nack"}
        ]
        report = kflash.katapult_flash(
            uart_tty, os.path.join(out, "klipper.bin"), baud=250000
        )
        assert (report["mcu"], report["block_size"]) == ("stm32f446xx", 128)
        assert report["completed"] and report["firmware_version"] == version
        wait_for(lambda: f"application {version}" in events(state, "uart"), 5, "app")
        assert not os.path.exists(os.path.join(spec["sys_root"], "class", "uart_tty"))
        # The request string, at any baud, sends the application back to Katapult.
        fd = os.open(uart_tty, os.O_RDWR | os.O_NOCTTY)
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
    assert not os.path.lexists(uart_tty)  # unplugged on exit

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
