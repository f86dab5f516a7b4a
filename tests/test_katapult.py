"""The native Katapult flasher through Python: ``kflash.katapult_flash``/``_status``
and ``kflash katapult`` against a small Katapult bootloader served on a pty."""

import argparse
import json
import os
import pty
import signal
import struct
import threading
import time
import tty

import pytest

import kflash
from kflash import katapult_cli

MCU = "stm32f103xe"
APP_START = 0x08002000


def crc16(data):
    crc = 0xFFFF
    for byte in data:
        byte ^= crc & 0xFF
        byte ^= (byte << 4) & 0xFF
        crc = ((byte << 8) | (crc >> 8)) ^ (byte >> 4) ^ (byte << 3)
        crc &= 0xFFFF
    return crc


def frame(code, payload=b""):
    body = bytes([code, len(payload) // 4]) + payload
    return b"\x01\x88" + body + struct.pack("<H", crc16(body)) + b"\x99\x03"


def ack(cmd, payload=b""):
    return frame(0xA0, struct.pack("<I", cmd) + payload)


def pad4(data):
    return data + b"\x00" * (-len(data) % 4)


class FakeKatapult(threading.Thread):
    """Answers Katapult frames on a pty master; ``flash`` holds what was written."""

    def __init__(self, block_size=64, mcu=MCU):
        super().__init__(daemon=True)
        self.master, slave = pty.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        self._slave = slave  # kept open: the master never sees a hang-up
        self.block_size = block_size
        self.mcu = mcu
        self.flash = {}
        self.commands = []
        self.delay = 0.0  # seconds before each answer (a slow board)
        self.stop = threading.Event()
        self.start()

    def run(self):
        buf = b""
        while not self.stop.is_set():
            try:
                os.set_blocking(self.master, False)
                chunk = os.read(self.master, 4096)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            except OSError:
                return
            buf += chunk
            while len(buf) >= 8:
                start = buf.find(b"\x01\x88")
                if start < 0:
                    buf = b""
                    break
                buf = buf[start:]
                size = 8 + 4 * buf[3]
                if len(buf) < size:
                    break
                msg, buf = buf[:size], buf[size:]
                self.answer(msg[2], msg[4:-4])

    def answer(self, cmd, payload):
        self.commands.append(cmd)
        if cmd == 0x11:
            info = struct.pack("<III", 0x00010100, APP_START, self.block_size)
            tail = pad4(self.mcu.encode()) + b"\x00" * 4 + pad4(b"v0.0.1-py")
            reply = ack(cmd, info + tail)
        elif cmd == 0x12:
            (addr,) = struct.unpack("<I", payload[:4])
            self.flash[addr] = payload[4:]
            reply = ack(cmd, payload[:4])
        elif cmd == 0x13:
            reply = ack(cmd, struct.pack("<I", len(self.flash)))
        elif cmd == 0x14:
            (addr,) = struct.unpack("<I", payload[:4])
            data = self.flash.get(addr, b"\xff" * self.block_size)
            reply = ack(cmd, payload[:4] + data)
        elif cmd == 0x15:
            reply = ack(cmd)
        else:
            reply = frame(0xF2)
        if self.delay:
            time.sleep(self.delay)
        os.write(self.master, reply)

    def image(self, length):
        data = b"".join(self.flash[a] for a in sorted(self.flash))
        return data[:length]

    def close(self):
        self.stop.set()
        self.join(2)
        os.close(self.master)
        os.close(self._slave)


@pytest.fixture
def board():
    fake = FakeKatapult()
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
    assert result["bootloader_version"] == "v0.0.1-py"
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
    board.delay = 0.02  # about 2 s of writing: long enough to be interrupted

    def interrupt_once_writing():
        end = time.monotonic() + 10
        while 0x12 not in board.commands and time.monotonic() < end:
            time.sleep(0.005)
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
