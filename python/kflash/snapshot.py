"""Reading the status snapshot mirror from any process.

klippy's ``[status_snapshot]`` extra can mirror the latest status of the objects it
serves into a shared-memory file (``shm_path``). This module reads that file through
the Rust core without ever touching klippy's reactor: a seqlock read of a few
microseconds, retried if it overlapped a publish.
"""

import json
from typing import Any, Dict, Optional

from kflash._core import SnapshotReader

__all__ = ["Reader", "SnapshotReader", "read"]


class Reader:
    """Keeps the mirror file mapped for repeated reads (``kflash status --watch``)."""

    def __init__(self, path: str) -> None:
        self._reader = SnapshotReader(path)

    @property
    def path(self) -> str:
        return str(self._reader.path)

    def read(self) -> Dict[str, Any]:
        """The latest snapshot as ``{"version", "eventtime", "age", "status"}``.

        ``version`` is 0 (and ``status`` empty) until the first publish; ``age`` is in
        seconds since the publish, by the wall clock.
        """
        reading = self._reader.read()
        if reading is None:
            return {"version": 0, "eventtime": None, "age": None, "status": {}}
        version, eventtime, age, payload = reading
        return {
            "version": version,
            "eventtime": eventtime,
            "age": age,
            "status": json.loads(payload),
        }


def read(path: str) -> Dict[str, Any]:
    """Reads the mirror at ``path`` once; see :meth:`Reader.read`."""
    return Reader(path).read()


def read_status(path: str) -> Optional[Dict[str, Any]]:
    """Only the status part of the mirror, or None before the first publish."""
    doc = read(path)
    return doc["status"] if doc["version"] else None
