"""The native Katapult flasher through Python: ``kflash.katapult_flash``/``_status``
and ``kflash katapult`` against the bench's Katapult bootloader served on a pty."""

import argparse
import json
import os
import pty
import select
import signal
import threading
import time
import tty

import pytest

import kflash
from kflash import katapult_cli
from virtual_printer.katapult import BOOTLOADER_VERSION, KatapultBootloader

MCU = "stm32f103xe"
APP_START = 0x08002000


class RecordingBootloader(KatapultBootloader):
    """The bench's bootloader, noting the code of every command it processes."""

    def __init__(self, commands, **kwargs):
        super().__init__(**kwargs)
        self.commands = commands
        self.writing = threading.Event()  # set at the first SEND_BLOCK

    def _command(self, cmd, payload):
        self.commands.append(cmd)
        if cmd == 0x12:
            self.writing.set()
        super()._command(cmd, payload)


class FakeKatapult(threading.Thread):
    """The bench's Katapult (virtual_printer.katapult) answering on a pty master.

    ``commands`` lists the command codes received, ``image(n)`` the first n bytes of
    its flash, ``faults`` the bench's fault switches (e.g. ``erase_delay``)."""

    def __init__(self, flash_path, block_size=64, mcu=MCU):
        super().__init__(daemon=True)
        self.master, slave = pty.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        self._slave = slave  # kept open: the master never sees a hang-up
        self.commands = []
        self.faults = {}
        self.bootloader = RecordingBootloader(
            self.commands,
            mcu=mcu,
            app_start=APP_START,
            block_size=block_size,
            image_path=str(flash_path),
            write=lambda frame: os.write(self.master, frame),
            faults=lambda: self.faults,
            on_complete=lambda: None,
        )
        self.stop = threading.Event()
        self.start()

    def run(self):
        while not self.stop.is_set():
            now = time.monotonic()
            self.bootloader.tick(now)
            wait = min(max(self.bootloader.next_deadline() - now, 0.0), 0.05)
            if not select.select([self.master], [], [], wait)[0]:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            self.bootloader.feed(data)

    def image(self, length):
        return bytes(self.bootloader.flash[:length])

    def close(self):
        self.stop.set()
        self.join(2)
        os.close(self.master)
        os.close(self._slave)


@pytest.fixture
def board(tmp_path):
    fake = FakeKatapult(tmp_path / "flash.bin")
    yield fake
    fake.close()


@pytest.fixture
def firmware(tmp_path):
    path = tmp_path / "klipper.bin"
    path.write_bytes(bytes((i * 7) & 0xFF for i in range(3000)))
    return path


def test_flash_writes_verifies_and_reports(board, firmware, monkeypatch, tmp_path):
    monkeypatch.setenv("KFLASH_SYS_ROOT", str(tmp_path / "no-sysfs"))
    events = []
    result = kflash.katapult_flash(board.path, str(firmware), on_event=events.append)
    assert board.image(3000) == firmware.read_bytes()
    assert result["bytes"] == 3000
    assert result["blocks"] == 47
    assert result["mcu"] == MCU
    assert result["bootloader_version"] == BOOTLOADER_VERSION
    assert result["completed"] is True
    assert board.commands[-1] == 0x15
    fractions = [e["fraction"] for e in events if e["fraction"] is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(e["stage"] == "flash" for e in events)


def test_status_connects_and_completes(board, monkeypatch, tmp_path):
    monkeypatch.setenv("KFLASH_SYS_ROOT", str(tmp_path / "no-sysfs"))
    info = kflash.katapult_status(board.path)
    assert info["mcu"] == MCU
    assert info["block_size"] == 64
    assert info["app_start"] == APP_START
    assert board.commands == [0x11, 0x15]


def test_an_exception_in_the_callback_cancels_the_flash(board, firmware):
    def boom(event):
        if event["fraction"] is not None:
            raise RuntimeError("stop right there")

    with pytest.raises(RuntimeError, match="stop right there"):
        kflash.katapult_flash(board.path, str(firmware), on_event=boom)
    assert 0x15 not in board.commands  # a half-written board stays in Katapult


def test_ctrl_c_interrupts_a_flash_and_leaves_the_board_in_katapult(board, firmware):
    board.faults["erase_delay"] = 0.02  # ~1 s of writing: long enough to interrupt

    def interrupt_once_writing():
        board.bootloader.writing.wait(10)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own Ctrl+C handling (importing klippy elsewhere in the run resets it).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    ctrl_c = threading.Thread(target=interrupt_once_writing)
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            kflash.katapult_flash(board.path, str(firmware))
    finally:
        ctrl_c.join()
        signal.signal(signal.SIGINT, previous)
    assert 0x15 not in board.commands  # a half-written board stays in Katapult
    written = board.commands.count(0x12)
    assert written < 47, "the flash ran to the end instead of stopping"


def test_missing_device_is_a_flash_error(firmware, tmp_path):
    with pytest.raises(kflash.FlashError, match="cannot open"):
        kflash.katapult_flash(str(tmp_path / "ttyACM9"), str(firmware))


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kflash")
    katapult_cli.add_parser(parser.add_subparsers(dest="command"))
    return katapult_cli.run(parser.parse_args(argv))


def test_cli_flash_ends_like_flashtool(board, firmware, capsys):
    assert _cli(["katapult", "flash", "-d", board.path, "-f", str(firmware)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "Programming Complete"
    assert any("3000 bytes" in line for line in out)


def test_cli_status_json_is_one_document(board, capsys):
    parser = argparse.ArgumentParser(prog="kflash")
    katapult_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["katapult", "status", "-d", board.path, "--json"])
    assert katapult_cli.command(None, args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["mcu"] == MCU


def test_cli_refuses_missing_firmware_as_usage_error(board, tmp_path, capsys):
    missing = str(tmp_path / "nope.bin")
    assert _cli(["katapult", "flash", "-d", board.path, "-f", missing]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert board.commands == []
