"""Runs INSIDE the host bed's root, as the user pi: the virtual printer's hardware.

Lays out what a KIAUH-installed Pi holds for the bench printer (kflash's
sim/virtual_printer, copied to /opt/virtual-printer): the Klipper-like source tree at
~/klipper (a git repository at v0.13.0-1), the firmware the boards start with (built
from the tag: outdated against HEAD), the boards' spec and control file and the linux
MCU's binary under /var/lib/virtual-printer, ~/printer_data/config/printer.cfg with the
boards' serial paths, and moonraker.conf for the systemd_dbus provider. Processes are
not started here: systemd units run the boards, the linux MCU, klippy and Moonraker.

    python3 pi_layout.py        # as pi, PYTHONPATH=/opt/virtual-printer
"""

from __future__ import annotations

import os
import shutil

from virtual_printer import stack
from virtual_printer.katapult import write_atomic

HOME = "/home/pi"
BENCH = "/var/lib/virtual-printer"
MOONRAKER_PORT = 7125

MOONRAKER_CONF = f"""\
# Moonraker's installer writes this shape (provider systemd_dbus when dbus runs).
[server]
host: 0.0.0.0
port: {MOONRAKER_PORT}
klippy_uds_address: {HOME}/printer_data/comms/klippy.sock

[authorization]
trusted_clients:
    127.0.0.0/8
    ::1/128

[machine]
provider: systemd_dbus

# No internet in the bed: no announcement feeds.
[announcements]
dev_mode: True
"""


class PiPrinter(stack.Printer):
    """The bench printer with a Pi's paths; systemd runs it (no supervisord)."""

    def __init__(self) -> None:
        super().__init__(BENCH, build_cache=os.path.join(BENCH, "build-cache"))
        self.tree = os.path.join(HOME, "klipper")
        self.data = os.path.join(HOME, "printer_data")
        self.config_dir = os.path.join(self.data, "config")
        self.printer_cfg = os.path.join(self.config_dir, "printer.cfg")
        self.klippy_log = os.path.join(self.data, "logs", "klippy.log")
        self.klippy_sock = os.path.join(self.data, "comms", "klippy.sock")
        self.linux_binary = os.path.join(BENCH, "bin", "klipper_mcu")
        self.linux_serial = "/tmp/klipper_host_mcu"

    def _write_supervisord_conf(self) -> None:
        """systemd units run the printer here (written by the host bed)."""


def main() -> int:
    printer = PiPrinter()
    printer.prepare()
    # Moonraker's own config and data layout instead of the bench's supervisord ones.
    write_atomic(os.path.join(printer.config_dir, "moonraker.conf"),
                 MOONRAKER_CONF.encode())
    for name in ("moonraker.port",):
        path = os.path.join(BENCH, name)
        if os.path.exists(path):
            os.unlink(path)
    for d in ("gcodes", "systemd", "logs", "comms"):
        os.makedirs(os.path.join(printer.data, d), exist_ok=True)
    shutil.rmtree(printer.build_cache, ignore_errors=True)
    for b in printer.boards:
        print(f"{b.section}: {printer.installed_version(b)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
