import pytest

import kflash


@pytest.mark.parametrize(
    "name",
    [
        "RegistryError",
        "DeviceNotFound",
        "ConfigError",
        "BuildError",
        "FlashError",
        "ServiceError",
        "CommandTimeout",
        "PreflightRefused",
        "MoonrakerError",
    ],
)
def test_every_error_is_a_kflash_error(name):
    cls = getattr(kflash, name)
    assert issubclass(cls, kflash.KflashError)
    assert cls.__module__ == "kflash._core"
