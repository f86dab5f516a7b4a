"""kflash: build and flash every MCU of a Klipper printer in one action.

The heavy lifting lives in the Rust core, ``kflash._core``; this package re-exports
its public names and holds the Python front ends (the ``kflash`` CLI, the detached
helper, the virtual printer bench).
"""

from kflash._core import (
    BuildError,
    CommandTimeout,
    ConfigError,
    DeviceNotFound,
    Engine,
    FlashError,
    KflashError,
    MoonrakerError,
    PreflightRefused,
    RegistryError,
    ServiceError,
    SnapshotReader,
    SnapshotStore,
    __version__,
    compare_versions,
    katapult_flash,
    katapult_status,
)

__all__ = [
    "BuildError",
    "CommandTimeout",
    "ConfigError",
    "DeviceNotFound",
    "Engine",
    "FlashError",
    "KflashError",
    "MoonrakerError",
    "PreflightRefused",
    "RegistryError",
    "ServiceError",
    "SnapshotReader",
    "SnapshotStore",
    "__version__",
    "compare_versions",
    "katapult_flash",
    "katapult_status",
]
