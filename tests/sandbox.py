"""A sandboxed printer for the CLI tests: real processes, fake hardware.

- the bench's Klipper-like source tree (sim/virtual_printer/firmware, tagged
  v0.13.0) that compiles real C;
- fake USB boards under a device root (by-id/by-path links to files) with sysfs
  entries (USB ids, serial), as the bench lays them out;
- a fake ``flashtool.py`` that imitates the real one's documented behaviour and
  traps: ``Programming Complete`` on success; ``Device is not Katapult,
  exiting...`` and exit 0 when the board fell into DFU; refusal of a tty held
  open by another process; per-device behaviour chosen by the test (``ok``,
  ``fail``, ``dfu``, ``hang``, ``slow``: 3 s of writing, then success);
- service stop/start commands that append to a log (the `command` backend);
- a fake Moonraker (tests/fake_moonraker.py: Moonraker's query traps kept) that
  reports print state and the version each board was last flashed with, and
  503s /printer/* while klipper is stopped.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fake_moonraker import FakeMoonraker
from virtual_printer import tree

ROOT = Path(__file__).resolve().parent.parent

KFLASH = [sys.executable, "-m", "kflash.cli"]

FLASHTOOL = r'''"""Fake Katapult flashtool.py for kflash's tests (imitates the real)."""
import argparse, json, os, sys, time

sandbox = os.environ["KFLASH_TEST_SANDBOX"]
p = argparse.ArgumentParser()
p.add_argument("-d"); p.add_argument("-b"); p.add_argument("-i", default="can0")
p.add_argument("-u"); p.add_argument("-f", required=True)
a = p.parse_args()
ident = os.path.basename(a.d) if a.d else a.u
behaviour = json.load(open(os.path.join(sandbox, "behaviour.json"))).get(ident, "ok")
with open(os.path.join(sandbox, "flashtool.log"), "a") as log:
    log.write("%s %s\n" % (ident, behaviour))
if a.d:
    real = os.path.realpath(a.d)
    if not os.path.exists(real):
        print("Serial device %s not found" % a.d); sys.exit(1)
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%s/fd/%s" % (pid, fd)) == real:
                    print("Serial device %s in use by another program" % a.d)
                    sys.exit(1)
            except OSError:
                pass
print("Connecting to %s" % ident)
sys.stdout.flush()
if behaviour == "hang":
    open(os.path.join(sandbox, "hanging"), "w").write(str(os.getpid()))
    while True:
        time.sleep(1)
if behaviour == "slow":
    # Writing takes a while: long enough to be interrupted in the middle.
    open(os.path.join(sandbox, "writing"), "w").write(str(os.getpid()))
    time.sleep(3)
if behaviour == "fail":
    print("ERROR: no response from bootloader", file=sys.stderr); sys.exit(1)
if behaviour == "dfu":
    # The board re-enumerated into the STM32 ROM loader: no tty any more.
    os.unlink(a.d)
    usb = os.path.join(os.environ["KFLASH_SYS_ROOT"], "bus/usb/devices/1-9")
    os.makedirs(usb, exist_ok=True)
    open(os.path.join(usb, "idVendor"), "w").write("0483\n")
    open(os.path.join(usb, "idProduct"), "w").write("df11\n")
    print("Device is not Katapult, exiting...")
    print("Bootloader Request Complete")
    sys.exit(0)
dict_path = os.path.join(os.path.dirname(a.f), "klipper.dict")
version = json.load(open(dict_path))["version"]
print("Flashing '%s'..." % a.f)
print("[##################################################]")
print("Write complete: 4 pages")
print("Verification Complete")
flashed = os.path.join(sandbox, "flashed")
os.makedirs(flashed, exist_ok=True)
name = ident.replace("usb-katapult_", "usb-Klipper_")
open(os.path.join(flashed, name), "w").write(version)
if a.d and os.path.basename(a.d).startswith("usb-katapult_"):
    # COMPLETE: the board leaves Katapult and runs Klipper again.
    tty = os.path.basename(os.readlink(a.d))
    usb = os.path.dirname(os.path.realpath(os.path.join(
        os.environ["KFLASH_SYS_ROOT"], "class/tty", tty, "device")))
    open(os.path.join(usb, "idProduct"), "w").write("614e\n")
    os.rename(a.d, a.d.replace("usb-katapult_", "usb-Klipper_"))
print("Programming Complete")
'''

SERVICE = """#!/bin/sh
echo "$1" >> "{log}"
"""


class Board:
    def __init__(self, key, mcu, serial, n, section):
        self.key = key
        self.mcu = mcu
        self.serial = serial
        self.n = n
        self.section = section

    @property
    def by_id_name(self):
        return f"usb-Klipper_{self.mcu}_{self.serial}-if00"


def terminal_signals():
    """In a child before exec: the signal dispositions of a terminal's process."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


class SandboxMoonraker(FakeMoonraker):
    """Moonraker for the sandbox: print state and the version each board was last
    flashed with; klippy is disconnected while the sandbox's klipper is stopped."""

    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.print_state = "standby"
        self.initial_versions = {}
        super().__init__()

    def klippy_state(self):
        return "disconnected" if self.sandbox.service_stopped() else "ready"

    def printer_object(self, name):
        if name == "print_stats":
            return {"state": self.print_state}
        if name == "idle_timeout":
            return {"state": "Idle"}
        for board in self.sandbox.boards.values():
            if board.section == name:
                version = self.sandbox.flashed_version(board)
                if version is None:
                    version = self.initial_versions.get(board.key, "v0.0.9-3-g1234567")
                return {"mcu_version": version}
        return super().printer_object(name)


class Sandbox:
    def __init__(self, root):
        self.root = Path(root)
        self.home = self.root / "home"
        self.dev = self.root / "dev"
        self.sys = self.root / "sys"
        self.klipper = self.root / "klipper"
        self.katapult = self.root / "katapult"
        self.service_log = self.root / "service.log"
        self.boards = {}
        self.behaviour = {}
        self.moonraker = None
        self.procs = []
        for d in (self.home, self.dev / "serial/by-id", self.dev / "serial/by-path"):
            d.mkdir(parents=True, exist_ok=True)
        tree.materialise(str(self.klipper), commits_after_tag=0)
        (self.katapult / "scripts").mkdir(parents=True)
        (self.katapult / "scripts/flashtool.py").write_text(FLASHTOOL)
        svc = self.root / "svc.sh"
        svc.write_text(SERVICE.format(log=self.service_log))
        svc.chmod(0o755)
        self.write_behaviour()
        self.env = dict(os.environ)
        self.env.update(
            KFLASH_HOME=str(self.home),
            KFLASH_DEV_ROOT=str(self.dev),
            KFLASH_SYS_ROOT=str(self.sys),
            KFLASH_TEST_SANDBOX=str(self.root),
            KFLASH_READY_TIMEOUT_S="10",
            PYTHONPATH=str(ROOT / "python"),
        )
        self.env.pop("KFLASH_HOME_UNUSED", None)
        self.settings(
            klipper_dir=self.klipper,
            katapult_dir=self.katapult,
            service="command",
            stop_command=f"{svc} stop",
            start_command=f"{svc} start",
            moonraker_url="http://127.0.0.1:9",
            linux_mcu_binary=self.root / "klipper_mcu",
            # The sandbox's boards are plain files that only its fake flashtool.py
            # "flashes"; the native flasher is exercised on the bench's virtual boards.
            katapult_flasher="flashtool",
        )

    # --- set-up -----------------------------------------------------------

    def settings(self, **values):
        for key, value in values.items():
            self.ok("settings", "set", key, str(value))

    def start_moonraker(self):
        self.moonraker = SandboxMoonraker(self)
        self.settings(moonraker_url=self.moonraker.url)
        return self.moonraker

    def add_board(self, key, mcu="stm32f446xx", fail_build=False):
        n = len(self.boards)
        serial = f"{key.upper()}{n:04d}"
        board = Board(key, mcu, serial, n, "mcu" if n == 0 else f"mcu {key}")
        tty = f"ttyACM{n}"
        (self.dev / tty).write_text("")
        by_id = self.dev / "serial/by-id" / board.by_id_name
        by_id.symlink_to(f"../../{tty}")
        by_path = self.dev / f"serial/by-path/platform-xhci-usb-0:{n + 1}:1.0"
        by_path.symlink_to(f"../../{tty}")
        usbdev = self.sys / f"devices/usb1/1-{n + 1}"
        intf = usbdev / f"1-{n + 1}:1.0"
        intf.mkdir(parents=True)
        for name, value in (
            ("idVendor", "1d50"),
            ("idProduct", "614e"),
            ("serial", serial),
            ("manufacturer", "Klipper"),
            ("product", mcu),
        ):
            (usbdev / name).write_text(value + "\n")
        cls = self.sys / "class/tty" / tty
        cls.mkdir(parents=True)
        (cls / "device").symlink_to(intf)
        cfg = self.root / f"{key}.config"
        mach = "RPXXXX" if mcu.startswith("rp") else "STM32"
        lines = [f"CONFIG_MACH_{mach}=y", f'CONFIG_MCU="{mcu}"', "CONFIG_USBSERIAL=y"]
        if fail_build:
            lines.append("CONFIG_FIXTURE_FAIL=y")
        cfg.write_text("\n".join(lines) + "\n")
        self.ok(
            "devices",
            "add",
            key,
            "--serial",
            f"/dev/serial/by-id/{board.by_id_name}",
            "--config",
            str(cfg),
            "--section",
            board.section,
        )
        self.boards[key] = board
        return board

    def enter_katapult(self, key):
        """The board re-enumerates in its Katapult bootloader (by-id and USB id change,
        by-path stays)."""
        board = self.boards[key]
        link = self.dev / "serial/by-id" / board.by_id_name
        link.rename(link.with_name(board.by_id_name.replace("Klipper", "katapult")))
        (self.sys / f"devices/usb1/1-{board.n + 1}/idProduct").write_text("6177\n")

    def enter_dfu(self, key):
        """The board falls into the STM32 ROM loader: no tty, DFU on its port."""
        board = self.boards[key]
        by_path = f"serial/by-path/platform-xhci-usb-0:{board.n + 1}:1.0"
        for link in ("serial/by-id/" + board.by_id_name, by_path):
            (self.dev / link).unlink()
        usb = self.sys / f"devices/usb1/1-{board.n + 1}"
        (usb / "idVendor").write_text("0483\n")
        (usb / "idProduct").write_text("df11\n")
        bus = self.sys / "bus/usb/devices"
        bus.mkdir(parents=True, exist_ok=True)
        (bus / f"1-{board.n + 1}").symlink_to(usb)

    def flash_by_hand(self, key, version):
        """Someone flashed the board without kflash (``make flash``): it runs
        ``version`` now, which kflash never verified on it."""
        flashed = self.root / "flashed"
        flashed.mkdir(exist_ok=True)
        (flashed / self.boards[key].by_id_name).write_text(version)

    def write_behaviour(self):
        (self.root / "behaviour.json").write_text(json.dumps(self.behaviour))

    def set_behaviour(self, key, behaviour):
        self.behaviour[self.boards[key].by_id_name] = behaviour
        self.write_behaviour()

    # --- observation ------------------------------------------------------

    def service_events(self):
        if not self.service_log.exists():
            return []
        return self.service_log.read_text().split()

    def service_stopped(self):
        events = self.service_events()
        return bool(events) and events[-1] == "stop"

    def flashed_version(self, board):
        path = self.root / "flashed" / board.by_id_name
        return path.read_text() if path.exists() else None

    def snapshot_state(self):
        files = {}
        for path in sorted(self.home.rglob("*")):
            if path.is_file():
                files[str(path.relative_to(self.home))] = path.read_bytes()
            else:
                files[str(path.relative_to(self.home))] = None
        return files

    # --- running kflash ----------------------------------------------------

    def run(self, *args, timeout=120):
        return subprocess.run(
            [*KFLASH, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, *args):
        result = self.run(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def json(self, *args, code=0):
        result = self.run(*args, "--json")
        assert result.returncode == code, (args, result.stdout, result.stderr)
        return json.loads(result.stdout)

    def spawn(self, *args):
        """kflash running as from a terminal: SIGINT and SIGHUP at their defaults,
        whatever the test runner inherited (under nohup SIGHUP is ignored, and
        kflash keeps a signal ignored at its start ignored)."""
        proc = subprocess.Popen(
            [*KFLASH, *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=terminal_signals,
        )
        self.procs.append(proc)
        return proc

    def wait_for(self, predicate, timeout=30, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        hanging = self.root / "hanging"
        if hanging.exists():
            try:
                os.kill(int(hanging.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        if self.moonraker:
            self.moonraker.close()
