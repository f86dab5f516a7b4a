"""Virtual USB/UART boards: Klipper application, Katapult, DFU, all on ptys.

A `Board` owns one simulated board's life: the flashed image (a file in its state
dir), its mode (``app`` running the image's dictionary, ``katapult``, ``dfu``,
``gone``), its pty and the device/sysfs entries the bench lays out (brief, "Shared
interfaces"):

    <dev_root>/ttyACM<n> -> /dev/pts/N            (new pty, maybe new n, every boot)
    <dev_root>/serial/by-id/usb-Klipper_<mcu>_<serial>-if00 -> ../../ttyACM<n>
        (usb-katapult_<mcu>_<serial>-if00 in the bootloader)
    <dev_root>/serial/by-path/<topology>-usb-0:<port>:1.0 -> ../../ttyACM<n>
    <sys_root>/bus/usb/devices/1-<port> -> ../../../devices/.../1-<port>
        (idVendor idProduct serial manufacturer product busnum devnum)
    <sys_root>/class/tty/ttyACM<n> -> .../1-<port>/1-<port>:1.0/tty/ttyACM<n>
        (its ``device`` link resolves to the interface dir 1-<port>:1.0)

UART boards get a stable ``<dev_root>/ttyS<n>`` link and no USB entries.

Bootloader entry: USB boards on the 1200-baud touch. A pty cannot report DTR, so the
approximation is "speed set to 1200, then the port closed" (or held at 1200 for
0.25 s). UART boards on Katapult's 34-byte request string, at any baud.

Failure modes come from the board's ``faults`` (spec) overlaid with the control file
(JSON ``{board: {...}}``, re-read when it changes): ``on_touch`` (katapult | dfu |
ignore), ``after_complete`` (app | never | dfu), ``nack_every``, ``fail_from_block``,
``corrupt_readback``, ``erase_delay``; ``power_cycle`` (an int: a new value reboots).

`run_boards` drives every board of a spec from one thread with a poll loop.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import termios
import time
from typing import Any, Optional

from virtual_printer import proto
from virtual_printer.app import KlipperApp
from virtual_printer.katapult import KatapultBootloader, write_atomic
from virtual_printer.ptys import Pty, symlink_atomic, unlink_quiet

KLIPPER_USB = ("1d50", "614e", "Klipper")
KATAPULT_USB = ("1d50", "6177", "katapult")
DFU_USB = {
    "stm32": ("0483", "df11", "STMicroelectronics", "STM32  BOOTLOADER"),
    "rp2040": ("2e8a", "0003", "Raspberry Pi", "RP2 Boot"),
}
TOPOLOGY = "platform-xhci-hcd.0"
REENUMERATE_DELAY = 0.3
COMPLETE_DELAY = 0.1
HUP_RECHECK = 0.05
TOUCH_HOLD = 0.25


class Control:
    """The control file tests flip: {board: {fault: value}}, re-read on change."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self._stamp: Any = None
        self.data: dict[str, Any] = {}

    def refresh(self) -> None:
        if not self.path:
            return
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            with open(self.path) as f:
                data = json.load(f)
            self.data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.data = {}

    def faults(self, board: str) -> dict[str, Any]:
        v = self.data.get(board)
        return v if isinstance(v, dict) else {}


class Board:
    """One virtual board (see module docs)."""

    def __init__(self, spec: dict[str, Any], bench: dict[str, Any], control: Control):
        self.spec = spec
        self.name: str = spec["name"]
        self.mcu: str = spec["mcu"]
        self.family: str = spec.get("family", "stm32")
        self.serial: str = spec.get("serial", "0")
        self.interface: str = spec.get("interface", "usb")
        self.port: str = spec.get("port", "1")
        self.app_start: int = int(spec.get("app_start", 0))
        self.block_size: int = int(spec.get("block_size", 64))
        self.dev_root: str = bench["dev_root"]
        self.sys_root: str = bench["sys_root"]
        self.state_dir = os.path.join(bench["state_dir"], self.name)
        os.makedirs(self.state_dir, exist_ok=True)
        self.image_path = os.path.join(self.state_dir, "flash.bin")
        self.control = control
        self.mode = "off"
        self.pty: Optional[Pty] = None
        self.tty: Optional[str] = None
        self.last_tty_num = -1
        self.devnum = 1
        self.app: Optional[KlipperApp] = None
        self.katapult: Optional[KatapultBootloader] = None
        self.timers: list[tuple[float, str]] = []
        self.hup_until = 0.0
        self.touch_seen: Optional[float] = None
        self._uart_tail = b""
        self.power_seen = self.faults().get("power_cycle")
        self.log_path = os.path.join(self.state_dir, "events.log")

    # --------------------------------------------------------------- helpers

    def log(self, msg: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"{time.time():.3f} {self.mode} {msg}\n")

    def faults(self) -> dict[str, Any]:
        merged = dict(self.spec.get("faults") or {})
        merged.update(self.control.faults(self.name))
        return merged

    @property
    def usb_name(self) -> str:
        return "1-" + self.port

    @property
    def usb_dir(self) -> str:
        return os.path.join(
            self.sys_root, "devices", "platform", "xhci-hcd.0", "usb1", self.usb_name
        )

    def by_id(self, katapult: bool) -> str:
        maker = "katapult" if katapult else "Klipper"
        return os.path.join(
            self.dev_root,
            "serial",
            "by-id",
            f"usb-{maker}_{self.mcu}_{self.serial}-if00",
        )

    @property
    def by_path(self) -> str:
        return os.path.join(
            self.dev_root, "serial", "by-path", f"{TOPOLOGY}-usb-0:{self.port}:1.0"
        )

    def image_dictionary(self) -> Optional[dict[str, Any]]:
        """The dictionary of the stored image, if it is a bootable app for this MCU."""
        try:
            with open(self.image_path, "rb") as f:
                image = f.read()
        except OSError:
            return None
        d = proto.find_dictionary(image)
        if d is None or d.get("config", {}).get("MCU") != self.mcu:
            return None
        return d

    # ------------------------------------------------------------ life cycle

    def power_on(self) -> None:
        """Boot: the application if the stored image is valid, else Katapult."""
        d = self.image_dictionary()
        if d is not None:
            self.app = KlipperApp(
                d,
                self._write,
                on_reset=self._app_reset,
                wiring=self.spec.get("wiring"),
                state_path=os.path.join(self.state_dir, "motion.json"),
            )
            self.katapult = None
            self._enumerate("app")
            self.log(f"application {self.app.version}")
        else:
            self._enter_katapult(now=True)

    def _enter_katapult(self, now: bool = False) -> None:
        self.app = None
        self.katapult = KatapultBootloader(
            mcu=self.mcu,
            app_start=self.app_start,
            block_size=self.block_size,
            image_path=self.image_path,
            write=self._write,
            faults=self.faults,
            on_complete=self._katapult_complete,
        )
        if now:
            self._enumerate("katapult")
        else:
            self._disconnect()
            self._at(REENUMERATE_DELAY, "enum-katapult")
        self.log("bootloader")

    def _app_reset(self) -> None:
        """config_reset: a real reset, new pty (klippy sees EOF and reconnects)."""
        self.log("config_reset")
        self._disconnect()
        self._at(REENUMERATE_DELAY, "boot")

    def _katapult_complete(self) -> None:
        self._at(COMPLETE_DELAY, "after-complete")

    def _at(self, delay: float, what: str) -> None:
        self.timers.append((time.monotonic() + delay, what))
        self.timers.sort()

    def _fire(self, what: str) -> None:
        if what == "enum-katapult":
            self._enumerate("katapult")
        elif what == "boot":
            self.power_on()
        elif what == "enter-dfu":
            self._enter_dfu()
        elif what == "after-complete":
            outcome = self.faults().get("after_complete", "app")
            self._disconnect()
            if outcome == "never":
                self.mode = "gone"
                self._remove_usb_device()
                self.log("never came back")
            elif outcome == "dfu":
                self._at(REENUMERATE_DELAY, "enter-dfu")
            else:
                self._at(REENUMERATE_DELAY, "boot")

    def _enter_dfu(self) -> None:
        self.app = None
        self.katapult = None
        self.mode = "dfu"
        vid, pid, maker, product = DFU_USB.get(self.family, DFU_USB["stm32"])
        self._write_usb_ids(vid, pid, maker, product, f"{self.serial}")
        self.log(f"DFU {vid}:{pid}")

    # ------------------------------------------------------ device entries

    def _alloc_tty(self) -> str:
        """UART: a stable ttyS<n>. USB: the lowest free ttyACM<n> other than the last
        one, so the number changes across re-enumeration (as it may on real hosts)."""
        if self.interface != "usb":
            return "ttyS{}".format(self.spec.get("uart_index", 0))
        n = 0
        while n == self.last_tty_num or os.path.lexists(
            os.path.join(self.dev_root, f"ttyACM{n}")
        ):
            n += 1
        self.last_tty_num = n
        return f"ttyACM{n}"

    def _write_usb_ids(self, vid: str, pid: str, maker: str, product: str, serial: str):
        os.makedirs(self.usb_dir, exist_ok=True)
        self.devnum += 1
        values = {
            "idVendor": vid,
            "idProduct": pid,
            "manufacturer": maker,
            "product": product,
            "serial": serial,
            "busnum": "1",
            "devnum": str(self.devnum),
        }
        for key, value in values.items():
            write_atomic(os.path.join(self.usb_dir, key), (value + "\n").encode())
        bus_link = os.path.join(self.sys_root, "bus", "usb", "devices", self.usb_name)
        os.makedirs(os.path.dirname(bus_link), exist_ok=True)
        if not os.path.lexists(bus_link):
            symlink_atomic(
                os.path.relpath(self.usb_dir, os.path.dirname(bus_link)), bus_link
            )

    def _remove_usb_device(self) -> None:
        unlink_quiet(
            os.path.join(self.sys_root, "bus", "usb", "devices", self.usb_name)
        )
        shutil.rmtree(self.usb_dir, ignore_errors=True)

    def _enumerate(self, mode: str) -> None:
        if self.interface != "usb" and self.pty is not None:
            # UART: the same wire after a reset; the board talks on it again.
            self.mode = mode
            self._uart_tail = b""
            return None
        self._disconnect(unplug=True)
        self.mode = mode
        self.pty = Pty(keep_slave=False)
        self.hup_until = 0.0
        self.touch_seen = None
        self._uart_tail = b""
        tty = self._alloc_tty()
        self.tty = tty
        dev_link = os.path.join(self.dev_root, tty)
        symlink_atomic(self.pty.name, dev_link)
        if self.interface != "usb":
            self.log(f"tty {tty} -> {self.pty.name}")
            return
        vid, pid, maker = KATAPULT_USB if mode == "katapult" else KLIPPER_USB
        self._write_usb_ids(vid, pid, maker, self.mcu, self.serial)
        iface = os.path.join(self.usb_dir, f"{self.usb_name}:1.0")
        tty_dir = os.path.join(iface, "tty", tty)
        os.makedirs(tty_dir, exist_ok=True)
        symlink_atomic(f"../../../{self.usb_name}:1.0", os.path.join(tty_dir, "device"))
        class_link = os.path.join(self.sys_root, "class", "tty", tty)
        os.makedirs(os.path.dirname(class_link), exist_ok=True)
        symlink_atomic(
            os.path.relpath(tty_dir, os.path.dirname(class_link)), class_link
        )
        rel = "../../" + tty
        for link in (self.by_path, self.by_id(mode == "katapult")):
            os.makedirs(os.path.dirname(link), exist_ok=True)
            symlink_atomic(rel, link)
        self.log(f"tty {tty} -> {self.pty.name}")

    def _disconnect(self, unplug: bool = False) -> None:
        """The MCU goes away. USB: unplugged, the tty, its links and sysfs entries go
        away and the pty is closed. UART: the host's port stays (it is the host's
        own); the board is only silent until it talks again, unless ``unplug``."""
        if self.interface != "usb" and not unplug:
            self.mode = "off" if self.mode in ("app", "katapult") else self.mode
            return
        if self.interface == "usb":
            unlink_quiet(self.by_id(True))
            unlink_quiet(self.by_id(False))
            unlink_quiet(self.by_path)
        if self.tty is not None:
            unlink_quiet(os.path.join(self.dev_root, self.tty))
            if self.interface == "usb":
                unlink_quiet(os.path.join(self.sys_root, "class", "tty", self.tty))
                shutil.rmtree(
                    os.path.join(self.usb_dir, f"{self.usb_name}:1.0"),
                    ignore_errors=True,
                )
            self.tty = None
        if self.pty is not None:
            self.pty.close()
            self.pty = None
        self.mode = "off" if self.mode in ("app", "katapult") else self.mode

    def shutdown(self) -> None:
        self._disconnect(unplug=True)
        self._remove_usb_device()

    # ------------------------------------------------------------------ I/O

    def _write(self, data: bytes) -> None:
        if self.pty is not None:
            self.pty.write(data)

    def fileno(self) -> Optional[int]:
        if self.pty is None or time.monotonic() < self.hup_until:
            return None
        return self.pty.master

    def on_readable(self) -> None:
        if self.pty is None:
            return
        data = self.pty.read()
        if data is None:
            self.hup_until = time.monotonic() + HUP_RECHECK
            return
        if not data or self.mode not in ("app", "katapult"):
            return  # nothing listens on the wire while the board reboots
        if self.app is not None:
            if self.interface != "usb":
                # The request may arrive split over reads: look across the boundary.
                seen = self._uart_tail + data
                self._uart_tail = seen[-len(proto.SERIAL_BOOTLOADER_REQUEST) :]
                if proto.SERIAL_BOOTLOADER_REQUEST in seen:
                    self.log("serial bootloader request")
                    self._enter_katapult()
                    return
            self.app.feed(data)
        elif self.katapult is not None:
            self.katapult.feed(data)

    def on_hangup(self) -> None:
        self.hup_until = time.monotonic() + HUP_RECHECK

    def tick(self, now: float) -> None:
        faults = self.faults()
        power = faults.get("power_cycle")
        if power != self.power_seen:
            self.power_seen = power
            self.log("power cycle")
            self._disconnect()
            self.timers.clear()
            self._at(REENUMERATE_DELAY, "boot")
        while self.timers and self.timers[0][0] <= now:
            _, what = self.timers.pop(0)
            self._fire(what)
        if self.katapult is not None:
            self.katapult.tick(now)
        if self.app is not None:
            self.app.tick(now)
        if self.mode == "app" and self.interface == "usb" and self.pty is not None:
            self._check_touch(now, faults)

    def _check_touch(self, now: float, faults: dict[str, Any]) -> None:
        assert self.pty is not None
        if self.pty.speed() != termios.B1200:
            self.touch_seen = None
            return
        if self.touch_seen is None:
            self.touch_seen = now
        closed = not self.pty.host_attached()
        if not closed and now - self.touch_seen < TOUCH_HOLD:
            return
        action = faults.get("on_touch", "katapult")
        self.log(f"1200-baud touch -> {action}")
        if action == "ignore":
            attrs = termios.tcgetattr(self.pty.master)
            attrs[4] = attrs[5] = termios.B38400
            termios.tcsetattr(self.pty.master, termios.TCSANOW, attrs)
            return
        if action == "dfu":
            self._disconnect()
            self._at(REENUMERATE_DELAY, "enter-dfu")
            return
        self._enter_katapult()

    def next_deadline(self) -> float:
        t = self.timers[0][0] if self.timers else float("inf")
        if self.katapult is not None:
            t = min(t, self.katapult.next_deadline())
        if self.app is not None:
            t = min(t, self.app.next_deadline())
        return t


def run_boards(spec_path: str) -> int:
    """Run every board of a bench spec until SIGTERM/SIGINT (the `boards` program)."""
    with open(spec_path) as f:
        spec = json.load(f)
    control = Control(spec.get("control"))
    control.refresh()
    boards = [Board(b, spec, control) for b in spec["boards"]]
    stop = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for b in boards:
        b.power_on()
    status_path = os.path.join(spec["state_dir"], "boards.ready")
    write_atomic(status_path, b"%d\n" % os.getpid())
    poller = select.poll()
    registered: dict[int, Board] = {}
    try:
        while not stop:
            now = time.monotonic()
            wanted: dict[int, Board] = {}
            for b in boards:
                fd = b.fileno()
                if fd is not None:
                    wanted[fd] = b
            for fd in set(registered) - set(wanted):
                try:
                    poller.unregister(fd)
                except (KeyError, ValueError):
                    pass
            for fd in set(wanted) - set(registered):
                poller.register(fd, select.POLLIN)
            registered = wanted
            deadline = min([b.next_deadline() for b in boards] + [now + HUP_RECHECK])
            timeout_ms = max(0, int((deadline - now) * 1000) + 1)
            try:
                events = poller.poll(timeout_ms)
            except InterruptedError:
                continue
            for fd, ev in events:
                b = registered.get(fd)
                if b is None or b.fileno() != fd:
                    continue
                if ev & select.POLLIN:
                    b.on_readable()
                elif ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    b.on_hangup()
            now = time.monotonic()
            control.refresh()
            for b in boards:
                b.tick(now)
    finally:
        for b in boards:
            b.shutdown()
        unlink_quiet(status_path)
    return 0
