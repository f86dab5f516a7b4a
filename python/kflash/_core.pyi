"""Type stubs for the native core ``kflash._core`` (hand-written, checked by
``python -m mypy.stubtest kflash._core`` in ``make test``). The JSON shapes the
calls return are the TypedDicts of ``kflash.results``."""

import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, final

from kflash.results import (
    DeviceReport,
    DeviceRow,
    ErrorDetails,
    HelperStarted,
    Imported,
    KatapultFlash,
    KatapultStatus,
    OnEvent,
    Pending,
    Plan,
    ProgressLine,
    Report,
    RunRecord,
    Status,
    VersionState,
)

__all__ = [
    "BuildError",
    "BuildTimeout",
    "CommandTimeout",
    "ConfigError",
    "DeviceNotFound",
    "Engine",
    "ExitStatus",
    "FlashError",
    "FlashTimeout",
    "KflashError",
    "MoonrakerError",
    "MoonrakerUnavailable",
    "PreflightRefused",
    "RegistryError",
    "Runs",
    "ServiceError",
    "ServiceUnavailable",
    "SnapshotReader",
    "SnapshotStore",
    "__version__",
    "compare_versions",
    "katapult_decode",
    "katapult_encode",
    "katapult_flash",
    "katapult_status",
    "validate_key",
    "wait_klippy_ready",
]

__version__: str
"""Cargo.toml's version: the wheel's version."""

# --- Exceptions --------------------------------------------------------------

class KflashError(Exception):
    """Base class of every kflash error."""

    exit_code: int
    details: ErrorDetails
    device: Optional[str]
    step: Optional[str]
    command: Optional[str]
    exit_status: Optional[int]
    output_tail: Optional[str]
    hint: Optional[str]
    report: Any

class RegistryError(KflashError): ...
class DeviceNotFound(KflashError): ...
class ConfigError(KflashError): ...

class BuildError(KflashError):
    report: Optional[list[DeviceReport]]

class FlashError(KflashError): ...
class ServiceError(KflashError): ...
class MoonrakerError(KflashError): ...
class CommandTimeout(KflashError): ...
class PreflightRefused(KflashError): ...
class BuildTimeout(BuildError, CommandTimeout): ...
class FlashTimeout(FlashError, CommandTimeout): ...
class ServiceUnavailable(PreflightRefused, ServiceError): ...
class MoonrakerUnavailable(PreflightRefused, MoonrakerError): ...

# --- Exit status -------------------------------------------------------------

@final
class ExitStatus:
    """How a kflash command ended: ``int(status)`` is the process exit code."""

    SUCCESS: ClassVar[ExitStatus]
    FAILURE: ClassVar[ExitStatus]
    USAGE: ClassVar[ExitStatus]
    REFUSED: ClassVar[ExitStatus]
    NOT_RESTARTED: ClassVar[ExitStatus]
    @staticmethod
    def of(outcome: Report | Mapping[str, Any] | BaseException) -> ExitStatus: ...
    @property
    def name(self) -> str: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    def __hash__(self) -> int: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...
    def __lt__(self, value: ExitStatus | int, /) -> bool: ...
    def __le__(self, value: ExitStatus | int, /) -> bool: ...
    def __gt__(self, value: ExitStatus | int, /) -> bool: ...
    def __ge__(self, value: ExitStatus | int, /) -> bool: ...

# --- Functions and classes ---------------------------------------------------

def compare_versions(mcu: str, target: str) -> VersionState:
    """Compare an MCU's version with the firmware kflash would build."""

def validate_key(key: str) -> None:
    """Check a device key (the one rule of every front end); raise RegistryError."""

@final
class Engine:
    """A kflash state directory: devices, settings, configs, builds and runs."""

    def __new__(cls, home: str | os.PathLike[str] | None = None) -> Engine: ...
    @property
    def state_dir(self) -> str: ...
    def settings(self) -> dict[str, str]: ...
    def set_setting(self, key: str, value: str) -> dict[str, str]: ...
    def devices(self) -> list[DeviceRow]: ...
    def add_device(
        self,
        key: str,
        *,
        serial: Optional[str] = None,
        can_uuid: Optional[str] = None,
        interface: str = "can0",
        linux: Optional[str] = None,
        method: str = "auto",
        config: str | os.PathLike[str] | None = None,
        name: Optional[str] = None,
        mcu_section: Optional[str] = None,
        baud: Optional[int] = None,
    ) -> DeviceRow: ...
    def remove_device(self, key: str) -> DeviceRow: ...
    def import_printer_cfg(self, path: str) -> Imported: ...
    def config_path(self, key: str) -> str: ...
    def set_config(self, key: str, path: str | os.PathLike[str]) -> DeviceRow: ...
    def menuconfig_command(self, key: str) -> list[str]: ...
    def plan(
        self, keys: Optional[list[str]] = None, only_outdated: bool = False
    ) -> Plan: ...
    def build(
        self,
        keys: Optional[list[str]] = None,
        on_event: Optional[OnEvent] = None,
    ) -> list[DeviceReport]: ...
    def flash(
        self,
        key: str,
        on_event: Optional[OnEvent] = None,
        yes: bool = False,
    ) -> Report: ...
    def flash_all(
        self,
        keys: Optional[list[str]] = None,
        only_outdated: bool = False,
        yes: bool = False,
        on_event: Optional[OnEvent] = None,
        run_id: Optional[str] = None,
    ) -> Report: ...
    def rollback(
        self,
        keys: Optional[list[str]] = None,
        yes: bool = False,
        on_event: Optional[OnEvent] = None,
        run_id: Optional[str] = None,
    ) -> Report: ...
    def status(self) -> Status: ...

@final
class Runs:
    """The flash runs of a kflash state directory (``runs/``)."""

    HELPER_UNIT: ClassVar[str]
    INSTALLED_UNIT: ClassVar[str]
    WATCHDOG_UNIT: ClassVar[str]

    def __new__(cls, home: str | os.PathLike[str] | None = None) -> Runs: ...
    @property
    def state_dir(self) -> str: ...
    @staticmethod
    def new_id() -> str: ...
    def latest(self) -> Optional[RunRecord]: ...
    def get(self, run_id: str) -> Optional[RunRecord]: ...
    def events(
        self, run_id: str, offset: int = 0
    ) -> tuple[list[ProgressLine], int]: ...
    def busy(self) -> Optional[str]: ...
    def announce(self, run_id: str) -> None: ...
    def start_helper(
        self,
        run_id: str,
        *,
        only_outdated: bool = False,
        device: Optional[str] = None,
        rollback: bool = False,
        launcher: str = "auto",
        python: str | os.PathLike[str] | None = None,
        moonraker_url: str = "http://127.0.0.1:7125",
    ) -> HelperStarted: ...
    def take_pending(self) -> Optional[Pending]: ...
    def watch(self, run_id: str) -> int: ...

def katapult_flash(
    device: str | os.PathLike[str],
    firmware: str | os.PathLike[str],
    baud: Optional[int] = None,
    on_event: Optional[OnEvent] = None,
) -> KatapultFlash: ...
def katapult_status(
    device: str | os.PathLike[str],
    baud: Optional[int] = None,
    on_event: Optional[OnEvent] = None,
) -> KatapultStatus: ...

# --- The status snapshot store (src/py/snapshot.rs) --------------------------

@final
class SnapshotStore:
    """Latest status of one printer object; get_status is O(1)."""

    def __new__(
        cls,
        shm_path: str | os.PathLike[str] | None = None,
        *,
        fallback: Callable[[float], dict[str, Any] | None] | None = None,
        max_age: float | None = None,
        print_time_clock: object | None = None,
        print_time_field: str = "estimated_print_time",
    ) -> SnapshotStore: ...
    def publish(self, status: dict[str, Any], eventtime: float) -> int: ...
    def get_status(self, eventtime: float | None = None) -> dict[str, Any]: ...
    def invalidate(self) -> None: ...
    @property
    def version(self) -> int: ...
    @property
    def age(self) -> float | None: ...
    @property
    def eventtime(self) -> float | None: ...
    @property
    def current(self) -> bool: ...
    @property
    def shm_path(self) -> Path | None: ...
    @property
    def mirror_error(self) -> str | None: ...

@final
class SnapshotReader:
    """Reads the shared-memory mirror of a SnapshotStore from another process."""

    def __new__(cls, path: str | os.PathLike[str]) -> SnapshotReader: ...
    def read(self) -> tuple[int, float, float, bytes] | None: ...
    @property
    def path(self) -> Path: ...

# --- Katapult's frame codec (src/py/katapult.rs) -----------------------------

def katapult_encode(code: int, payload: Optional[bytes] = None) -> bytes: ...
def katapult_decode(data: bytes) -> list[dict[str, Any]]: ...

# --- Moonraker's ready-wait (src/py/moonraker.rs) ----------------------------

def wait_klippy_ready(moonraker_url: str, timeout: float) -> bool: ...
