"""A minimal host side for the bench: the 1200-baud touch and a Katapult client.

Test and demo tooling (kflash's real flasher lives in the Rust core): `touch` does
what flash tools do to reboot a USB board into its bootloader; `KatapultClient`
speaks the frame protocol (CONNECT, SEND_BLOCK with retries, SEND_EOF, REQUEST_BLOCK
verify, COMPLETE) and counts what went wrong, so tests can check each failure mode.
One client per tty; not thread-safe.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import select
import struct
import termios
import time
from dataclasses import dataclass, field
from typing import Optional

from virtual_printer import proto
from virtual_printer.katapult import (
    CMD_COMPLETE,
    CMD_CONNECT,
    CMD_REQUEST_BLOCK,
    CMD_SEND_BLOCK,
    CMD_SEND_EOF,
    RESP_ACK,
    RESP_COMMAND_ERROR,
    RESP_NACK,
)


def touch(device: str) -> None:
    """The 1200-baud touch: open, DTR on, 1200 baud, DTR off, close."""
    fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        dtr = struct.pack("I", termios.TIOCM_DTR)
        try:
            fcntl.ioctl(fd, termios.TIOCMBIS, dtr)
        except OSError:
            pass  # ptys have no modem lines
        attrs = termios.tcgetattr(fd)
        attrs[4] = attrs[5] = termios.B1200
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        try:
            fcntl.ioctl(fd, termios.TIOCMBIC, dtr)
        except OSError:
            pass
    finally:
        os.close(fd)


class KatapultError(Exception):
    """The bootloader refused or did not answer."""


@dataclass
class FlashReport:
    """What a flash through `KatapultClient.flash` saw."""

    blocks: int = 0
    nacks: int = 0
    command_errors: int = 0
    verified: bool = False
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class KatapultClient:
    """Talks to a board in Katapult through its tty."""

    def __init__(self, device: str, timeout: float = 2.0) -> None:
        self.fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        attrs = termios.tcgetattr(self.fd)
        attrs[0] = attrs[1] = attrs[3] = 0
        attrs[2] = termios.CS8 | termios.CREAD | termios.CLOCAL
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        self.timeout = timeout
        self.buf = bytearray()
        self.app_start = 0
        self.block_size = 0
        self.mcu = ""
        self.version = ""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> KatapultClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_frame(self, deadline: float) -> Optional[tuple[int, bytes]]:
        while True:
            i = self.buf.find(proto.KATAPULT_HEADER)
            if i > 0:
                del self.buf[:i]
            if i >= 0 and len(self.buf) >= 8:
                size = self.buf[3] * 4 + 8
                if len(self.buf) >= size:
                    frame = bytes(self.buf[:size])
                    del self.buf[:size]
                    body = frame[2 : size - 4]
                    (crc,) = struct.unpack("<H", frame[size - 4 : size - 2])
                    if crc != proto.crc16(body):
                        continue
                    return body[0], body[2:]
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                try:
                    self.buf += os.read(self.fd, 4096)
                except BlockingIOError:
                    pass

    def command(self, cmd: int, payload: bytes = b"") -> tuple[int, bytes]:
        """Send one command; returns (response type, payload after orig_cmd)."""
        os.write(self.fd, proto.katapult_frame(cmd, payload))
        got = self._read_frame(time.monotonic() + self.timeout)
        if got is None:
            raise KatapultError(f"no answer to command 0x{cmd:02x}")
        kind, data = got
        if kind == RESP_ACK:
            (orig,) = struct.unpack("<I", data[:4])
            if orig != cmd:
                raise KatapultError(f"ACK for 0x{orig:02x}, expected 0x{cmd:02x}")
            return kind, data[4:]
        return kind, b""

    def connect(self) -> None:
        kind, data = self.command(CMD_CONNECT)
        if kind != RESP_ACK:
            raise KatapultError(f"CONNECT answered 0x{kind:02x}")
        _proto, self.app_start, self.block_size = struct.unpack("<III", data[:12])
        parts = [p for p in data[12:].split(b"\0") if p]
        self.mcu = parts[0].decode() if parts else ""
        self.version = parts[1].decode() if len(parts) > 1 else "?"

    def flash(self, image: bytes, tries: int = 3) -> FlashReport:
        """Write, EOF, verify by read-back; COMPLETE is left to the caller."""
        report = FlashReport()
        start = time.monotonic()
        bs = self.block_size
        blocks = [
            image[i : i + bs].ljust(bs, b"\xff") for i in range(0, len(image), bs)
        ]
        for n, block in enumerate(blocks):
            addr = self.app_start + n * bs
            for _ in range(tries):
                kind, data = self.command(
                    CMD_SEND_BLOCK, struct.pack("<I", addr) + block
                )
                if kind == RESP_ACK and data[:4] == struct.pack("<I", addr):
                    break
                if kind == RESP_NACK:
                    report.nacks += 1
                elif kind == RESP_COMMAND_ERROR:
                    report.command_errors += 1
            else:
                report.errors.append(f"block at 0x{addr:08x} not accepted")
                report.seconds = time.monotonic() - start
                return report
            report.blocks += 1
        kind, _ = self.command(CMD_SEND_EOF)
        if kind != RESP_ACK:
            report.errors.append("SEND_EOF refused")
        sent = hashlib.sha1(b"".join(blocks)).hexdigest()
        back = hashlib.sha1()
        for n in range(len(blocks)):
            kind, data = self.command(
                CMD_REQUEST_BLOCK, struct.pack("<I", self.app_start + n * bs)
            )
            back.update(data[4:])
        report.verified = back.hexdigest() == sent
        if not report.verified:
            report.errors.append("read-back does not match what was written")
        report.seconds = time.monotonic() - start
        return report

    def complete(self) -> None:
        kind, _ = self.command(CMD_COMPLETE)
        if kind != RESP_ACK:
            raise KatapultError(f"COMPLETE answered 0x{kind:02x}")
