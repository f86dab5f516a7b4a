"""Wire codecs shared by the virtual MCUs: Klipper's message blocks and Katapult frames.

Owns the byte-level rules of reference/klipper-mcu-protocol.md (block framing, CRC,
VLQ integers, message encoding by format string) and reference/katapult.md (frame
format), plus the search for the zlib-compressed data dictionary embedded in a
firmware image. Pure functions and small value classes; no I/O, thread-safe.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from typing import Any, Optional

MESSAGE_MIN = 5
MESSAGE_MAX = 64
MESSAGE_SYNC = 0x7E
MESSAGE_DEST = 0x10
MAX_PAYLOAD = MESSAGE_MAX - MESSAGE_MIN

KATAPULT_HEADER = b"\x01\x88"
KATAPULT_TRAILER = b"\x99\x03"
#: The UART bootloader request Katapult listens for (34 bytes).
SERIAL_BOOTLOADER_REQUEST = b"~ \x1c Request Serial Bootloader!! ~"


def crc16(data: bytes) -> int:
    """CRC-16/MCRF4XX (Klipper's crc16_ccitt): check value of b"123456789" is 0x6F91."""
    crc = 0xFFFF
    for b in data:
        x = (b ^ (crc & 0xFF)) & 0xFF
        x = (x ^ (x << 4)) & 0xFF
        crc = ((x << 8) | (crc >> 8)) ^ (x >> 4) ^ (x << 3)
        crc &= 0xFFFF
    return crc


# ---------------------------------------------------------------- VLQ integers


def encode_vlq(value: int) -> bytes:
    """Encode an int the way the firmware does (signed 32-bit, 1..5 bytes)."""
    v = value & 0xFFFFFFFF
    if v & 0x80000000:
        v -= 1 << 32
    out = bytearray()
    if v >= 3 * (1 << 26) or v < -(1 << 26):
        out.append(((v >> 28) & 0x7F) | 0x80)
    if v >= 3 * (1 << 19) or v < -(1 << 19):
        out.append(((v >> 21) & 0x7F) | 0x80)
    if v >= 3 * (1 << 12) or v < -(1 << 12):
        out.append(((v >> 14) & 0x7F) | 0x80)
    if v >= 96 or v < -32:
        out.append(((v >> 7) & 0x7F) | 0x80)
    out.append(v & 0x7F)
    return bytes(out)


def decode_vlq(data: bytes, pos: int) -> tuple[int, int]:
    """Decode one VLQ at ``pos``; returns (signed value, next position)."""
    b = data[pos]
    pos += 1
    v = b & 0x7F
    if (b & 0x60) == 0x60:
        v |= -0x20
    while b & 0x80:
        b = data[pos]
        pos += 1
        v = (v << 7) | (b & 0x7F)
    # Fold the host's 5-byte unsigned form into the signed 32-bit range.
    v &= 0xFFFFFFFF
    if v & 0x80000000:
        v -= 1 << 32
    return v, pos


# ------------------------------------------------------- messages by format

_PARAM = re.compile(r"(\w+)=(%[a-z.*]+)")


class MessageFormat:
    """One command or response of a data dictionary: name, id and typed parameters."""

    def __init__(self, msgformat: str, msgid: int) -> None:
        self.format = msgformat
        self.msgid = msgid
        self.name = msgformat.split()[0]
        self.params = [(n, t) for n, t in _PARAM.findall(msgformat)]

    def encode(self, **values: Any) -> bytes:
        out = bytearray(encode_vlq(self.msgid))
        for name, kind in self.params:
            v = values[name]
            if kind in ("%s", "%*s", "%.*s"):
                raw = v.encode() if isinstance(v, str) else bytes(v)
                out.append(len(raw))
                out += raw
            else:
                out += encode_vlq(int(v))
        return bytes(out)

    def decode(self, data: bytes, pos: int) -> tuple[dict[str, Any], int]:
        """Decode the parameters following the id; returns (values, next position)."""
        values: dict[str, Any] = {}
        for name, kind in self.params:
            if kind in ("%s", "%*s", "%.*s"):
                n = data[pos]
                values[name] = bytes(data[pos + 1 : pos + 1 + n])
                pos += 1 + n
            else:
                v, pos = decode_vlq(data, pos)
                if kind in ("%u", "%hu", "%c"):
                    v &= 0xFFFFFFFF
                values[name] = v
        return values, pos


def frame_block(seq: int, payload: bytes = b"") -> bytes:
    """Frame one MCU->host message block (an empty payload is an ACK/NAK)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("message payload too long")
    head = bytes([len(payload) + MESSAGE_MIN, MESSAGE_DEST | (seq & 0x0F)]) + payload
    crc = crc16(head)
    return head + bytes([crc >> 8, crc & 0xFF, MESSAGE_SYNC])


def parse_block(buf: bytes) -> tuple[str, int]:
    """Classify the start of ``buf``: more, sync (skip 1), bad or ok (with length)."""
    if len(buf) < MESSAGE_MIN:
        return "more", 0
    n = buf[0]
    if n == MESSAGE_SYNC:
        return "sync", 1
    if n < MESSAGE_MIN or n > MESSAGE_MAX:
        return "bad", 0
    if len(buf) < n:
        return "more", 0
    if (buf[1] & 0xF0) != MESSAGE_DEST or buf[n - 1] != MESSAGE_SYNC:
        return "bad", 0
    if crc16(buf[: n - 3]) != (buf[n - 3] << 8 | buf[n - 2]):
        return "bad", 0
    return "ok", n


# ------------------------------------------------------------ Katapult frames


def katapult_frame(cmd: int, payload: bytes = b"") -> bytes:
    """Build a Katapult frame (either direction); payload is whole 32-bit words."""
    if len(payload) % 4:
        raise ValueError("Katapult payload must be whole 32-bit words")
    body = bytes([cmd, len(payload) // 4]) + payload
    return KATAPULT_HEADER + body + struct.pack("<H", crc16(body)) + KATAPULT_TRAILER


# ------------------------------------------------- dictionaries in firmware


def compress_dict(d: dict[str, Any]) -> bytes:
    """The identify blob: zlib-compressed compact JSON."""
    return zlib.compress(
        json.dumps(d, separators=(",", ":"), sort_keys=True).encode(), 9
    )


def find_dictionary(image: bytes) -> Optional[dict[str, Any]]:
    """Find the data dictionary embedded (zlib-compressed JSON) in a firmware image."""
    for m in re.finditer(rb"\x78[\x01\x5e\x9c\xda]", image):
        try:
            d = zlib.decompressobj().decompress(image[m.start() :])
            obj = json.loads(d)
        except (zlib.error, ValueError):
            continue
        if isinstance(obj, dict) and "commands" in obj and "version" in obj:
            return obj
    return None
