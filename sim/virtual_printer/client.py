"""What a host does to a virtual USB board from outside: the 1200-baud touch.

`touch` is what flash tools do to reboot a Klipper USB board into its bootloader;
the bench uses it to put a board in Katapult by hand. Talking Katapult to the board
is kflash's job (``kflash.katapult_flash``/``katapult_status``, or the frame codec
``kflash.katapult_encode``/``katapult_decode`` for protocol-level tests).
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios


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
