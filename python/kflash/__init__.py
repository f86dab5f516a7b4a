"""kflash: build and flash every MCU of a Klipper printer in one action.

The heavy lifting lives in the Rust core, ``kflash._core``; this package re-exports
its public names and holds the Python front ends (the ``kflash`` CLI, the detached
helper, the virtual printer bench).
"""

from kflash._core import (
    BuildError,
    BuildTimeout,
    CommandTimeout,
    ConfigError,
    DeviceNotFound,
    Engine,
    ExitStatus,
    FlashError,
    FlashTimeout,
    KflashError,
    MoonrakerError,
    MoonrakerUnavailable,
    PreflightRefused,
    RegistryError,
    ServiceError,
    ServiceUnavailable,
    SnapshotReader,
    SnapshotStore,
    __version__,
    compare_versions,
    katapult_decode,
    katapult_encode,
    katapult_flash,
    katapult_status,
    validate_key,
    wait_klippy_ready,
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
