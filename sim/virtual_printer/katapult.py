"""The Katapult side of a virtual board: the bootloader's byte protocol.

`KatapultBootloader` owns the frame parser (one NACK per run of garbage), the
commands of reference/katapult.md "Device behaviour" (CONNECT with protocol version,
application start, block size, MCU name, a zero word and the bootloader version, laid
out as real Katapult does; SEND_BLOCK; SEND_EOF;
REQUEST_BLOCK; COMPLETE; command error for anything else, e.g. the 0x90 priming
command) and the flash contents, kept in a file so a flash survives the process.
Failure modes (NACKs, corrupted read-back, slow erase, persistent write errors) come
from the board's `faults` mapping, re-read on every command. Not thread-safe.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Any, Callable

from virtual_printer import proto

CMD_CONNECT = 0x11
CMD_SEND_BLOCK = 0x12
CMD_SEND_EOF = 0x13
CMD_REQUEST_BLOCK = 0x14
CMD_COMPLETE = 0x15
RESP_ACK = 0xA0
RESP_NACK = 0xF1
RESP_COMMAND_ERROR = 0xF2
PROTO_VERSION = 0x00010100
FRAME_MAX = 128
#: What the virtual bootloader reports as its own software version.
BOOTLOADER_VERSION = "v0.0.1-sim"
PAGE_SIZE = 1024


def write_atomic(path: str, data: bytes) -> None:
    """Write a file atomically: temp in the same directory, fsync, rename, fsync dir."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class KatapultBootloader:
    """One board's bootloader session (created on every entry into Katapult)."""

    def __init__(
        self,
        *,
        mcu: str,
        app_start: int,
        block_size: int,
        image_path: str,
        write: Callable[[bytes], None],
        faults: Callable[[], dict[str, Any]],
        on_complete: Callable[[], None],
    ) -> None:
        if block_size not in (64, 128, 256, 512):
            raise ValueError("block size must be 64, 128, 256 or 512")
        self.mcu = mcu
        self.app_start = app_start
        self.block_size = block_size
        # Real builds use 64-byte blocks in frames of at most 128 bytes; larger
        # (configurable) blocks need frames that can carry them.
        self.frame_max = max(FRAME_MAX, 12 + block_size)
        self.image_path = image_path
        self._write = write
        self._faults = faults
        self._on_complete = on_complete
        self.buf = bytearray()
        self._in_garbage = False
        self.busy_until = 0.0
        self._pending: list[tuple[float, bytes]] = []
        self.blocks_received = 0
        self.erased = False
        try:
            with open(image_path, "rb") as f:
                self.flash = bytearray(f.read())
        except OSError:
            self.flash = bytearray()

    # -------------------------------------------------------------- output

    def _respond(self, kind: int, payload: bytes = b"", delay: float = 0.0) -> None:
        frame = proto.katapult_frame(kind, payload)
        if delay > 0:
            self._pending.append((time.monotonic() + delay, frame))
        else:
            self._write(frame)

    def _ack(self, cmd: int, payload: bytes = b"", delay: float = 0.0) -> None:
        self._respond(RESP_ACK, struct.pack("<I", cmd) + payload, delay)

    def tick(self, now: float) -> None:
        """Release delayed responses and continue with buffered input once not busy."""
        while self._pending and self._pending[0][0] <= now:
            self._write(self._pending.pop(0)[1])
        if now >= self.busy_until and self.buf:
            self._process()

    def next_deadline(self) -> float:
        if self._pending:
            return self._pending[0][0]
        if self.buf and self.busy_until > time.monotonic():
            return self.busy_until
        return float("inf")

    # --------------------------------------------------------------- input

    def feed(self, data: bytes) -> None:
        self.buf += data
        if time.monotonic() >= self.busy_until:
            self._process()

    def _process(self) -> None:
        while len(self.buf) >= 2 and time.monotonic() >= self.busy_until:
            if self.buf[:2] != proto.KATAPULT_HEADER:
                self._garbage()
                continue
            if len(self.buf) < 8:
                return
            size = self.buf[3] * 4 + 8
            if size > self.frame_max:
                self._garbage()
                continue
            if len(self.buf) < size:
                return
            frame = bytes(self.buf[:size])
            body = frame[2 : size - 4]
            crc = struct.unpack("<H", frame[size - 4 : size - 2])[0]
            if frame[size - 2 :] != proto.KATAPULT_TRAILER or crc != proto.crc16(body):
                self._garbage()
                continue
            del self.buf[:size]
            self._in_garbage = False
            self._command(body[0], body[2:])
        if len(self.buf) == 1 and self.buf[0] != 0x01:
            self._garbage()

    def _garbage(self) -> None:
        """Discard up to the next 0x01; one NACK per run of garbage."""
        i = self.buf.find(b"\x01", 1)
        del self.buf[: i if i > 0 else len(self.buf)]
        if not self._in_garbage:
            self._in_garbage = True
            self._respond(RESP_NACK)

    def _command(self, cmd: int, payload: bytes) -> None:
        faults = self._faults()
        if cmd == CMD_CONNECT:
            # As Katapult's command_connect lays it out: the MCU name zero-padded to
            # whole words, ONE zero word, then the version zero-padded to whole words.
            mcu = self.mcu.encode()
            ver = BOOTLOADER_VERSION.encode()
            tail = mcu + b"\0" * (-len(mcu) % 4) + b"\0" * 4
            tail += ver + b"\0" * (-len(ver) % 4)
            info = struct.pack("<III", PROTO_VERSION, self.app_start, self.block_size)
            self._ack(cmd, info + tail)
        elif cmd == CMD_SEND_BLOCK:
            self._send_block(payload, faults)
        elif cmd == CMD_SEND_EOF:
            self._store()
            pages = (len(self.flash) + PAGE_SIZE - 1) // PAGE_SIZE
            self._ack(cmd, struct.pack("<I", pages))
        elif cmd == CMD_REQUEST_BLOCK and len(payload) == 4:
            (addr,) = struct.unpack("<I", payload)
            off = addr - self.app_start
            block = bytearray(b"\xff" * self.block_size)
            if off >= 0:
                chunk = self.flash[off : off + self.block_size]
                block[: len(chunk)] = chunk
            if faults.get("corrupt_readback"):
                block[len(block) // 2] ^= 0x04
            self._ack(cmd, payload + bytes(block))
        elif cmd == CMD_COMPLETE:
            if self.erased:
                self._store()
            self._ack(cmd)
            self._on_complete()
        else:
            self._respond(RESP_COMMAND_ERROR)

    def _send_block(self, payload: bytes, faults: dict[str, Any]) -> None:
        if len(payload) != 4 + self.block_size:
            self._respond(RESP_COMMAND_ERROR)
            return
        (addr,) = struct.unpack("<I", payload[:4])
        if addr < self.app_start:
            self._respond(RESP_COMMAND_ERROR)
            return
        self.blocks_received += 1
        n = self.blocks_received
        nack_every = int(faults.get("nack_every") or 0)
        if nack_every and n % nack_every == 0:
            self._respond(RESP_NACK)
            return
        fail_from = int(faults.get("fail_from_block") or 0)
        if fail_from and n >= fail_from:
            self._respond(RESP_COMMAND_ERROR)
            return
        if not self.erased:
            # The first write erases the application: a flash cut short leaves the
            # board in the bootloader, as on real hardware.
            self.erased = True
            self.flash = bytearray()
            write_atomic(self.image_path, b"")
        off = addr - self.app_start
        if len(self.flash) < off + self.block_size:
            self.flash += b"\xff" * (off + self.block_size - len(self.flash))
        self.flash[off : off + self.block_size] = payload[4:]
        delay = float(faults.get("erase_delay") or 0.0)
        if delay > 0:
            self.busy_until = time.monotonic() + delay
        self._ack(CMD_SEND_BLOCK, payload[:4], delay)

    def _store(self) -> None:
        write_atomic(self.image_path, bytes(self.flash))
