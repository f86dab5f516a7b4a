"""The virtual linux-process MCU (`klipper_mcu`): Klipper's app protocol on a pty.

Its "firmware" is a binary file (the tree's linux build output ``klipper.elf``, which
embeds the data dictionary): the process reads the dictionary and version from it at
start. Flashing it is what kflash does for a real host MCU: replace the file (remove,
then copy) and restart the service (supervisord program ``klipper_mcu``). Like the
real one it keeps its own slave fd open, publishes the pty through a symlink (a
``/tmp/klipper_host_...`` path, which klippy treats as a pipe) and re-executes itself
on ``config_reset`` (same pid, new pty, firmware re-read). Single-threaded.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from typing import Any

from virtual_printer import proto
from virtual_printer.app import KlipperApp
from virtual_printer.ptys import Pty, symlink_atomic, unlink_quiet


def read_firmware(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        d = proto.find_dictionary(f.read())
    if d is None:
        raise SystemExit(f"{path}: no data dictionary in this firmware")
    return d


def run_linux_mcu(firmware: str, serial: str) -> int:
    """Serve until SIGTERM/SIGINT; ``config_reset`` re-executes this process."""
    dictionary = read_firmware(firmware)
    pty = Pty(keep_slave=True)
    symlink_atomic(pty.name, serial)
    reset = []
    stop = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app = KlipperApp(dictionary, pty.write, on_reset=lambda: reset.append(1))
    app.send_starting()
    poller = select.poll()
    poller.register(pty.master, select.POLLIN)
    while not stop and not reset:
        try:
            events = poller.poll(1000)
        except InterruptedError:
            continue
        if events:
            data = pty.read()
            if data:
                app.feed(data)
    if reset:
        # Like the real linux MCU: execv ourselves, new pty, symlink replaced.
        pty.close()
        argv = [sys.executable, "-m", "virtual_printer", *sys.argv[1:]]
        os.execv(sys.executable, argv)
    if os.path.islink(serial) and os.readlink(serial) == pty.name:
        unlink_quiet(serial)
    pty.close()
    return 0
