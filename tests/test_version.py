"""One version everywhere: Cargo.toml, the wheel's metadata, the core, the CLI."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import kflash
from kflash import _core

CARGO_TOML = Path(__file__).resolve().parent.parent / "Cargo.toml"


def cargo_version():
    text = CARGO_TOML.read_text()
    package = text.split("[package]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version = "([^"]+)"', package, re.M)[1]


def test_the_installed_version_is_cargo_tomls():
    version = cargo_version()
    assert importlib.metadata.version("kflash-klipper") == version
    assert kflash.__version__ == _core.__version__ == version


def test_kflash_version_prints_it_and_exits_0():
    r = subprocess.run(
        [sys.executable, "-m", "kflash.cli", "--version"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"kflash {cargo_version()}\n"
