"""Type stubs for the native core ``kflash._core`` (hand-written)."""

from typing import Any, Callable, Dict, List, Optional

class KflashError(Exception): ...
class RegistryError(KflashError): ...
class DeviceNotFound(KflashError): ...
class ConfigError(KflashError): ...
class BuildError(KflashError): ...
class FlashError(KflashError): ...
class ServiceError(KflashError): ...
class CommandTimeout(KflashError): ...
class PreflightRefused(KflashError): ...
class MoonrakerError(KflashError): ...

def compare_versions(mcu: str, target: str) -> str:
    """Compare an MCU's version with the firmware kflash would build.

    Returns "current", "outdated", "newer" or "unknown".
    """

Event = Dict[str, Any]

class Engine:
    """A kflash state directory: devices, settings, configs, builds and runs."""

    def __init__(self, home: Optional[str] = None) -> None: ...
    @property
    def state_dir(self) -> str: ...
    def settings(self) -> Dict[str, str]: ...
    def set_setting(self, key: str, value: str) -> Dict[str, str]: ...
    def devices(self) -> List[Dict[str, Any]]: ...
    def add_device(
        self,
        key: str,
        *,
        serial: Optional[str] = None,
        can_uuid: Optional[str] = None,
        interface: str = "can0",
        linux: Optional[str] = None,
        method: str = "auto",
        config: Optional[str] = None,
        name: Optional[str] = None,
        mcu_section: Optional[str] = None,
        baud: Optional[int] = None,
    ) -> Dict[str, Any]: ...
    def remove_device(self, key: str) -> Dict[str, Any]: ...
    def import_printer_cfg(self, path: str) -> Dict[str, Any]: ...
    def config_path(self, key: str) -> str: ...
    def plan(
        self, keys: Optional[List[str]] = None, only_outdated: bool = False
    ) -> Dict[str, Any]: ...
    def build(
        self,
        keys: Optional[List[str]] = None,
        on_event: Optional[Callable[[Event], None]] = None,
    ) -> List[Dict[str, Any]]: ...
    def flash(
        self,
        key: str,
        on_event: Optional[Callable[[Event], None]] = None,
        yes: bool = False,
    ) -> Dict[str, Any]: ...
    def flash_all(
        self,
        keys: Optional[List[str]] = None,
        only_outdated: bool = False,
        yes: bool = False,
        on_event: Optional[Callable[[Event], None]] = None,
    ) -> Dict[str, Any]: ...
    def status(self) -> Dict[str, Any]: ...
# Native Katapult flasher (src/py/katapult.rs).
import os as _os  # noqa: E402
from typing import Any as _Any  # noqa: E402
from typing import Callable as _Callable  # noqa: E402

def katapult_flash(
    device: str | _os.PathLike[str],
    firmware: str | _os.PathLike[str],
    baud: int | None = None,
    on_event: _Callable[[dict[str, _Any]], object] | None = None,
) -> dict[str, _Any]: ...
def katapult_status(
    device: str | _os.PathLike[str],
    baud: int | None = None,
    on_event: _Callable[[dict[str, _Any]], object] | None = None,
) -> dict[str, _Any]: ...
