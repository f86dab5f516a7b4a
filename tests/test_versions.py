import pytest

import kflash

TARGET = "v0.13.0-730-g84104bbbd"


@pytest.mark.parametrize(
    ("mcu", "target", "expected"),
    [
        (TARGET, TARGET, "current"),
        ("v0.13.0-730-g84104bbbd-dirty", TARGET, "current"),
        ("v0.13.0-730-g84104bbbd-20260801_120102-pi", TARGET, "current"),
        ("v0.13.0-700-gaaaaaaaaa", TARGET, "outdated"),
        ("v0.12.0-900-gaaaaaaaaa", TARGET, "outdated"),
        ("v0.13.0-731-gbbbbbbbbb", TARGET, "newer"),
        ("v2026.07.00-30-gf2532ee34", "v2026.08.00-2-g0123456", "outdated"),
        ("", TARGET, "unknown"),
        ("?", TARGET, "unknown"),
        ("not a version", TARGET, "unknown"),
    ],
)
def test_compare_versions(mcu, target, expected):
    assert kflash.compare_versions(mcu, target) == expected


def test_compare_versions_is_exported():
    assert "compare_versions" in kflash.__all__
    with pytest.raises(TypeError):
        kflash.compare_versions(None, TARGET)
