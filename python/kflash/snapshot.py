"""Status snapshots: the read-only containers of a published status, and reading the
shared-memory mirror from any process.

``kflash.SnapshotStore`` publishes a copy of a status in which every nested dict and
list is a :class:`ReadOnlyDict` / :class:`ReadOnlyList`: they are ``dict`` and ``list``
(``isinstance``, ``json.dumps``, ``==``, iteration, ``dict(...)``, ``.copy()``,
``copy.deepcopy`` and Jinja all work as on the originals) but refuse any change with
``TypeError``, so no reader can alter what the next one sees. Copies (``dict(x)``,
``x.copy()``, ``copy.copy``, ``copy.deepcopy``, pickling) are ordinary, mutable
dicts and lists.

klippy's ``[status_snapshot]`` extra can mirror the latest status of the objects it
serves into a shared-memory file (``shm_path``). :class:`Reader` reads that file
through the Rust core without ever touching klippy's reactor: a seqlock read of a few
microseconds, retried if it overlapped a publish. Every failure is a
``kflash.KflashError`` naming the file.
"""

import copy
import json
from typing import Any, Dict, NoReturn, Optional

from kflash._core import KflashError, SnapshotReader

__all__ = ["ReadOnlyDict", "ReadOnlyList", "Reader", "SnapshotReader", "read"]

_REFUSED = (
    "a published status is read-only (other readers share it): "
    "change a copy, e.g. dict(status) or list(values)"
)


def _refuse(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(_REFUSED)


class ReadOnlyDict(dict):  # type: ignore[type-arg]
    """A dict of a published status: reads like a dict, refuses every change."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> Dict[Any, Any]:
        return dict(self)

    def __deepcopy__(self, memo: Dict[int, Any]) -> Dict[Any, Any]:
        out: Dict[Any, Any] = {}
        memo[id(self)] = out
        for key, value in self.items():
            out[copy.deepcopy(key, memo)] = copy.deepcopy(value, memo)
        return out

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


class ReadOnlyList(list):  # type: ignore[type-arg]
    """A list of a published status: reads like a list, refuses every change."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __copy__(self) -> Any:
        return list(self)

    def __deepcopy__(self, memo: Dict[int, Any]) -> Any:
        out: Any = []
        memo[id(self)] = out
        out.extend(copy.deepcopy(value, memo) for value in self)
        return out

    def __reduce__(self) -> Any:
        return (list, (list(self),))


class Reader:
    """Keeps the mirror file open for repeated reads (``kflash status --watch``)."""

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
        try:
            status = json.loads(payload.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
            raise KflashError(
                f"status snapshot file {self.path}: the payload of version {version} "
                f"is not UTF-8 JSON ({e})"
            ) from e
        return {
            "version": version,
            "eventtime": eventtime,
            "age": age,
            "status": status,
        }


def read(path: str) -> Dict[str, Any]:
    """Reads the mirror at ``path`` once; see :meth:`Reader.read`."""
    return Reader(path).read()


def read_status(path: str) -> Optional[Dict[str, Any]]:
    """Only the status part of the mirror, or None before the first publish."""
    doc = read(path)
    return doc["status"] if doc["version"] else None
