"""The application side of a virtual MCU: Klipper's MCU protocol, enough for klippy.

`KlipperApp` owns one MCU's protocol state (expected seq, sync state, configuration,
shutdown) and answers from the data dictionary of the firmware it "runs": the ids and
formats come from that dictionary, so what klippy reports as ``mcu_version`` is the
dictionary's ``version``. Rules: reference/klipper-mcu-protocol.md (receiver rules §2,
responses before the ACK, one message per block, junk tolerance, shutdown state, real
reset on ``config_reset``). Steppers, endstops and trsync (what klippy needs to home)
are `virtual_printer.motion`, wired by the board's ``wiring`` (its virtual endstops);
their positions and homing records go to ``state_path`` (JSON) when given.
Transport-agnostic: bytes in through `feed`, bytes out through the ``write`` callback;
the owner's loop calls `tick` and sleeps until `next_deadline`. Not thread-safe; driven
by one event loop.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

from virtual_printer import proto
from virtual_printer.motion import McuShutdown, Motion

# Commands that still run while the MCU is shut down (the firmware's HF_IN_SHUTDOWN).
_RUN_IN_SHUTDOWN = {
    "identify",
    "get_uptime",
    "get_clock",
    "get_config",
    "emergency_stop",
    "clear_shutdown",
    "config_reset",
    "reset",
}


class KlipperApp:
    """Klipper's application protocol for one MCU running a firmware dictionary."""

    def __init__(
        self,
        dictionary: dict[str, Any],
        write: Callable[[bytes], None],
        on_reset: Optional[Callable[[], None]] = None,
        wiring: Optional[dict[str, Any]] = None,
        state_path: Optional[str] = None,
    ) -> None:
        self.dictionary = dictionary
        self._write = write
        self._on_reset = on_reset
        self.wiring = wiring
        self.state_path = state_path
        self._state_written: Any = None
        self.pins = pin_numbers(dictionary.get("enumerations", {}).get("pin", {}))
        self.blob = proto.compress_dict(dictionary)
        self.commands = {
            mid: proto.MessageFormat(f, mid)
            for f, mid in dictionary["commands"].items()
        }
        self.responses = {
            proto.MessageFormat(f, mid).name: proto.MessageFormat(f, mid)
            for f, mid in dictionary["responses"].items()
        }
        self.clock_freq = int(dictionary["config"]["CLOCK_FREQ"])
        self._string_ids = dictionary.get("enumerations", {}).get(
            "static_string_id", {}
        )
        self.reset_state()

    @property
    def version(self) -> str:
        return str(self.dictionary.get("version", "?"))

    def reset_state(self) -> None:
        """Forget what a reset forgets: seq, sync, configuration, shutdown, clock."""
        self.next_seq = 0
        self.need_sync = False
        self._nakked = False
        self.buf = bytearray()
        self.is_config = False
        self.crc = 0
        self.oids: Optional[int] = None
        self.shutdown_reason: Optional[int] = None
        self.t0 = time.monotonic()
        self.motion = Motion(self.clock_freq, self.send, self.pins, self.wiring)

    # ------------------------------------------------------------------ output

    def clock64(self, now: Optional[float] = None) -> int:
        """The MCU clock at monotonic time ``now`` (default: now)."""
        if now is None:
            now = time.monotonic()
        return int((now - self.t0) * self.clock_freq)

    def send(self, name: str, **values: Any) -> None:
        fmt = self.responses.get(name)
        if fmt is None:
            return
        self._write(proto.frame_block(self.next_seq, fmt.encode(**values)))

    def send_starting(self) -> None:
        self.send("starting")

    def _string_id(self, text: str) -> int:
        return int(self._string_ids.get(text, 0))

    def _shutdown(self, reason: str) -> None:
        if self.shutdown_reason is None:
            self.shutdown_reason = self._string_id(reason)
            self.motion.shutdown(self.clock64())
        self.send(
            "shutdown",
            clock=self.clock64() & 0xFFFFFFFF,
            static_string_id=self.shutdown_reason,
        )

    # ------------------------------------------------------------------- input

    def feed(self, data: bytes) -> None:
        """Process bytes from the host (any junk included)."""
        self.buf += data
        while self.buf:
            if self.need_sync:
                i = self.buf.find(proto.MESSAGE_SYNC)
                if i < 0:
                    self.buf.clear()
                    return
                del self.buf[: i + 1]
                self.need_sync = False
                continue
            kind, n = proto.parse_block(bytes(self.buf[: proto.MESSAGE_MAX]))
            if kind == "more":
                return
            if kind == "sync":
                del self.buf[:1]
                continue
            if kind == "bad":
                # One NAK per run of garbage: the flag in need_sync is the run.
                self.need_sync = True
                if not self._nakked:
                    self._nakked = True
                    self._write(proto.frame_block(self.next_seq))
                continue
            self._nakked = False
            block = bytes(self.buf[:n])
            del self.buf[:n]
            seq = block[1] & 0x0F
            if seq != self.next_seq:
                self._write(proto.frame_block(self.next_seq))
                continue
            self.next_seq = (seq + 1) & 0x0F
            reset = self._dispatch(block[2 : n - 3])
            if reset:
                return
            self._write(proto.frame_block(self.next_seq))

    def _dispatch(self, payload: bytes) -> bool:
        """Run every command of a block; True when a reset happened (stop)."""
        pos = 0
        while pos < len(payload):
            msgid, pos = proto.decode_vlq(payload, pos)
            fmt = self.commands.get(msgid)
            if fmt is None:
                self._shutdown("Invalid command")
                return False
            try:
                values, pos = fmt.decode(payload, pos)
            except IndexError:
                self._shutdown("Command parser error")
                return False
            if self.shutdown_reason is not None and fmt.name not in _RUN_IN_SHUTDOWN:
                self.send("is_shutdown", static_string_id=self.shutdown_reason)
                continue
            if self._run(fmt.name, values):
                return True
        return False

    def _run(self, name: str, v: dict[str, Any]) -> bool:
        if name == "identify":
            off, count = v["offset"], v["count"]
            self.send(
                "identify_response", offset=off, data=self.blob[off : off + count]
            )
        elif name == "get_uptime":
            c = self.clock64()
            self.send("uptime", high=(c >> 32) & 0xFFFFFFFF, clock=c & 0xFFFFFFFF)
        elif name == "get_clock":
            self.send("clock", clock=self.clock64() & 0xFFFFFFFF)
        elif name == "get_config":
            self.send(
                "config",
                is_config=int(self.is_config),
                crc=self.crc,
                is_shutdown=int(self.shutdown_reason is not None),
                move_count=1024 if self.is_config else 0,
            )
        elif name == "allocate_oids":
            if self.oids is not None:
                self._shutdown("oids already allocated")
            else:
                self.oids = v["count"]
        elif name == "finalize_config":
            if self.is_config:
                self._shutdown("Already finalized")
            else:
                self.is_config = True
                self.crc = v["crc"] & 0xFFFFFFFF
        elif name == "emergency_stop":
            self._shutdown("Command request")
        elif name == "clear_shutdown":
            self.shutdown_reason = None
        elif name in ("config_reset", "reset"):
            return self._reset(name)
        else:
            try:
                self.motion.run(name, v, self.clock64())
            except McuShutdown as e:
                self._shutdown(str(e))
        return False

    def _reset(self, name: str) -> bool:
        if name == "config_reset" and self.shutdown_reason is None:
            self._shutdown("config_reset only available when shutdown")
            return False
        self._write(proto.frame_block(self.next_seq))
        if self._on_reset is not None:
            self._on_reset()
        else:
            self.reset_state()
            self.send_starting()
        return True

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> None:
        """Carry out what the motion objects have due by ``now`` (monotonic seconds)."""
        try:
            self.motion.advance(self.clock64(now))
        except McuShutdown as e:
            self._shutdown(str(e))
        self._write_state(now)

    def next_deadline(self) -> float:
        """When `tick` has something to do next (monotonic seconds; inf: nothing)."""
        clock = self.motion.next_event()
        if clock is None:
            return float("inf")
        return self.t0 + clock / self.clock_freq

    def _write_state(self, now: float) -> None:
        if self.state_path is None or not self.motion.steppers:
            return
        state = self.motion.state(self.clock64(now))
        if state == self._state_written:
            return
        tmp = f"{self.state_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_path)
        self._state_written = json.loads(json.dumps(state))


def pin_numbers(enumeration: dict[str, Any]) -> dict[str, int]:
    """Pin names to numbers from a dictionary's ``pin`` enumeration (ranges expanded:
    ``"PA0": [0, 16]`` is PA0..PA15)."""
    pins: dict[str, int] = {}
    for name, value in enumeration.items():
        if isinstance(value, list):
            start, count = value
            root = name.rstrip("0123456789")
            first = int(name[len(root) :] or 0)
            for i in range(count):
                pins[f"{root}{first + i}"] = start + i
        else:
            pins[name] = int(value)
    return pins
