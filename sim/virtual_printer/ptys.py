"""Pseudo-terminals for virtual MCUs: raw mode, symlinks, hang-up aware I/O.

`Pty` owns one pty pair: the master (non-blocking, used by the MCU) and optionally the
slave fd. Virtual USB boards do NOT keep a slave fd (flash tools such as Katapult's
flashtool.py refuse a tty that any process holds open), so their master reports
hang-up while no host has the port open: `Pty` treats EIO/POLLHUP as "port closed"
and the caller polls again later. The linux-process MCU keeps its slave fd, like the
real one. Raw mode is set with TCSANOW (tty.setraw's TCSAFLUSH would drop input).
Not thread-safe.
"""

from __future__ import annotations

import errno
import os
import select
import termios
from typing import Optional


def _make_raw(fd: int) -> None:
    attrs = termios.tcgetattr(fd)
    attrs[0] &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
    )
    attrs[1] &= ~termios.OPOST
    attrs[2] &= ~(termios.CSIZE | termios.PARENB)
    attrs[2] |= termios.CS8
    attrs[3] &= ~(
        termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN
    )
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def symlink_atomic(target: str, link: str) -> None:
    """Point ``link`` at ``target``, replacing any existing link atomically."""
    tmp = f"{link}.tmp{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Pty:
    """A raw pty pair; ``name`` is the slave's /dev/pts/N."""

    def __init__(self, keep_slave: bool) -> None:
        self.master, slave = os.openpty()
        _make_raw(slave)
        self.name = os.ttyname(slave)
        self.slave: Optional[int] = slave
        if not keep_slave:
            os.close(slave)
            self.slave = None
        os.set_blocking(self.master, False)
        self._poll = select.poll()
        self._poll.register(self.master, select.POLLIN)

    def host_attached(self) -> bool:
        """True while some process (other than us) may have the slave open."""
        if self.slave is not None:
            return True
        for _fd, ev in self._poll.poll(0):
            if ev & select.POLLHUP:
                return False
        return True

    def read(self) -> Optional[bytes]:
        """Bytes from the host; b"" when none; None when the port is closed."""
        try:
            return os.read(self.master, 4096)
        except BlockingIOError:
            return b""
        except OSError as e:
            if e.errno == errno.EIO:
                return None
            raise

    def write(self, data: bytes) -> None:
        """Send to the host; dropped when nobody reads (an undrained USB FIFO)."""
        try:
            os.write(self.master, data)
        except OSError:
            pass

    def speed(self) -> int:
        """The slave's output speed (termios on the master reports the slave's)."""
        try:
            return termios.tcgetattr(self.master)[5]
        except termios.error:
            return 0

    def close(self) -> None:
        for fd in (self.master, self.slave):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.slave = None
        self.master = -1
