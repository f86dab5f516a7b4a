"""The kflash CLI: devices, settings, build, and bad input (exit 2, nothing lost)."""

import json
import os
import pty
import subprocess
import sys
import time

import pytest

from sandbox import KFLASH

PRINTER_CFG = """
[include extra.cfg]
[mcu]
serial: /dev/serial/by-id/usb-Klipper_stm32f446xx_MAIN-if00

[printer]
kinematics: corexy
"""

EXTRA_CFG = """
[mcu EBB36]
canbus_uuid: 0A1B2C3D4E5F

[mcu host]
serial: /tmp/klipper_host_mcu
"""


def test_devices_import_list_remove(sandbox, tmp_path):
    cfg = tmp_path / "printer.cfg"
    cfg.write_text(PRINTER_CFG)
    (tmp_path / "extra.cfg").write_text(EXTRA_CFG)
    result = sandbox.json("devices", "import", str(cfg))
    # Klipper's order: the include comes first.
    assert [d["key"] for d in result["added"]] == ["EBB36", "host", "mcu"]
    again = sandbox.json("devices", "import", str(cfg))
    assert again["added"] == [] and len(again["skipped"]) == 3
    devices = sandbox.json("devices", "list")
    by_key = {d["key"]: d for d in devices}
    assert by_key["EBB36"]["identity"] == {
        "type": "can",
        "uuid": "0a1b2c3d4e5f",
        "interface": "can0",
    }
    assert by_key["host"]["method"] == "linux"
    assert by_key["mcu"]["config_present"] is False
    human = sandbox.ok("devices", "list").stdout
    assert "EBB36" in human and "missing" in human
    sandbox.ok("devices", "remove", "EBB36")
    assert [d["key"] for d in sandbox.json("devices", "list")] == ["host", "mcu"]


def test_settings_show_and_set(sandbox):
    doc = sandbox.json("settings")
    assert doc["settings"]["service"] == "command"
    assert doc["state_dir"] == str(sandbox.home)
    sandbox.ok("settings", "set", "klipper_service", "klipper-1")
    assert sandbox.json("settings")["settings"]["klipper_service"] == "klipper-1"


def test_build_then_cached(sandbox):
    sandbox.add_board("octopus")
    first = sandbox.json("build")
    assert first[0]["build"] == "pass"
    assert sandbox.json("build", "octopus")[0]["build"] == "cached"
    assert sandbox.service_events() == []


@pytest.mark.parametrize(
    "args, words",
    [
        (["devices", "add", "a/b", "--serial", "/dev/x"], ["a/b", "path separators"]),
        (["devices", "add", "", "--serial", "/dev/x"], ["empty"]),
        (["devices", "add", "tête", "--serial", "/dev/x"], ["ASCII"]),
        (["devices", "add", "octopus", "--serial", "/dev/x"], ["already exists"]),
        (["devices", "add", "ebb", "--can-uuid", "xyz"], ["12 hex digits"]),
        (["devices", "remove", "nope"], ["nope", "octopus"]),
        (["flash", "nope"], ["nope", "octopus"]),
        (["flash-all", "nope*"], ["nope*", "octopus"]),
        (["settings", "set", "service", "init.d"], ["moonraker, systemd, command"]),
        (["settings", "set", "colour", "red"], ["colour", "klipper_dir"]),
        (["devices", "add", "x"], ["--serial"]),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(sandbox, args, words):
    sandbox.add_board("octopus")
    registry = sandbox.home / "devices.json"
    before = registry.read_bytes()
    result = sandbox.run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    for word in words:
        assert word in result.stderr, result.stderr
    assert registry.read_bytes() == before
    assert sandbox.service_events() == []


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"version": 1, "devices": [}', ["devices.json", "line 1", "column"]),
        ('{"version": 7, "devices": []}', ["devices.json", "newer kflash"]),
    ],
)
def test_broken_registry_is_named_and_never_overwritten(sandbox, text, words):
    registry = sandbox.home / "devices.json"
    registry.write_text(text)
    for args in (["devices", "list"], ["devices", "add", "x", "--serial", "/dev/x"]):
        result = sandbox.run(*args)
        assert result.returncode == 2
        for word in words:
            assert word in result.stderr, result.stderr
    assert registry.read_text() == text


def test_missing_config_is_exit_2_and_stops_nothing(sandbox):
    sandbox.add_board("octopus")
    sandbox.start_moonraker()
    (sandbox.home / "configs" / "octopus.config").unlink()
    result = sandbox.run("flash-all")
    assert result.returncode == 2
    assert "octopus" in result.stderr and "kflash config octopus" in result.stderr
    assert sandbox.service_events() == []


def test_config_for_another_interface_is_exit_2(sandbox, tmp_path):
    cfg = tmp_path / "usb.config"
    cfg.write_text('CONFIG_MCU="stm32g0b1xx"\nCONFIG_USBSERIAL=y\n')
    sandbox.ok(
        "devices", "add", "ebb", "--can-uuid", "0a1b2c3d4e5f", "--config", str(cfg)
    )
    sandbox.start_moonraker()
    result = sandbox.run("flash-all")
    assert result.returncode == 2
    assert "CAN" in result.stderr
    assert sandbox.service_events() == []


def test_not_a_klipper_config_is_refused(sandbox, tmp_path):
    cfg = tmp_path / "notes.txt"
    cfg.write_text("hello\n")
    result = sandbox.run(
        "devices", "add", "x", "--serial", "/dev/x", "--config", str(cfg)
    )
    assert result.returncode == 2
    assert "CONFIG_" in result.stderr
    assert sandbox.json("devices", "list") == []


def test_help_speaks_klipper():
    out = subprocess.run(
        [sys.executable, "-m", "kflash.cli", "--help"], capture_output=True, text=True
    ).stdout
    for word in ("flash-all", "printer.cfg", "klipper"):
        assert word in out


def test_devices_list_starts_fast(sandbox):
    sandbox.add_board("octopus")
    best = min(_timed(sandbox) for _ in range(3))
    # 150 ms on an idle machine; leave room for a loaded CI box.
    assert best < 1.0, best


def _timed(sandbox):
    started = time.monotonic()
    result = sandbox.run("devices", "list", "--json")
    assert json.loads(result.stdout)[0]["key"] == "octopus"
    return time.monotonic() - started


def test_status_shm_reads_klippys_mirror(tmp_path):
    import kflash

    shm = tmp_path / "kflash_status"
    store = kflash.SnapshotStore(shm_path=str(shm))
    store.publish({"homed_axes": "xyz"}, 12.5)
    result = subprocess.run(
        [sys.executable, "-m", "kflash.cli", "status", "--shm", str(shm), "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert "xyz" in json.dumps(doc)


def test_progress_in_a_log_keeps_one_line_per_ten_percent(capsys):
    from kflash.cli import Progress

    progress = Progress()
    progress.tty = False  # as under a pipe, a log file or the detached helper
    for block in range(1, 795):
        progress(
            {
                "stage": "flash",
                "device": "mcu",
                "fraction": block / 794,
                "level": "info",
                "message": f"write {block}/794 blocks",
            }
        )
    progress({"stage": "flash", "device": "mcu", "level": "info", "message": "flashed"})
    lines = capsys.readouterr().err.splitlines()
    assert 10 <= len(lines) <= 13, lines
    assert "794/794" in lines[-2] and lines[-1].endswith("flashed")


def test_config_without_a_terminal_says_so_and_from_attaches_a_config(
    sandbox, tmp_path
):
    sandbox.ok("devices", "add", "pico", "--serial", "/dev/serial/by-id/usb-x")
    result = sandbox.run("config", "pico")
    assert result.returncode == 2, result.stderr
    assert "needs a terminal" in result.stderr
    assert "kflash config pico --from FILE" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (sandbox.klipper / "out").exists()
    bad = tmp_path / "notes.txt"
    bad.write_text("just notes\n")
    result = sandbox.run("config", "pico", "--from", str(bad))
    assert result.returncode == 2 and "CONFIG_" in result.stderr, result.stderr
    good = tmp_path / "pico.config"
    good.write_text('CONFIG_MACH_RPXXXX=y\nCONFIG_MCU="rp2040"\nCONFIG_USBSERIAL=y\n')
    dev = sandbox.json("config", "pico", "--from", str(good))
    assert (dev["mcu"], dev["config_present"]) == ("rp2040", True)
    assert (sandbox.home / "configs" / "pico.config").read_text() == good.read_text()


def test_config_in_a_terminal_runs_menuconfig_with_its_own_out(sandbox, tmp_path):
    tree = tmp_path / "menuconfig-tree"
    tree.mkdir()
    (tree / "Makefile").write_text(
        "menuconfig:\n"
        "\tprintf 'CONFIG_MCU=\"rp2040\"\\nCONFIG_USBSERIAL=y\\n' > $(KCONFIG_CONFIG)\n"
        "\techo $(OUT) > $(KCONFIG_CONFIG).out\n"
    )
    sandbox.settings(klipper_dir=tree)
    sandbox.ok("devices", "add", "pico", "--serial", "/dev/serial/by-id/usb-x")
    main, sub = pty.openpty()
    proc = subprocess.run(
        [*KFLASH, "config", "pico"],
        env=sandbox.env,
        stdin=sub,
        stdout=sub,
        stderr=subprocess.PIPE,
        timeout=60,
    )
    os.close(sub)
    os.close(main)
    assert proc.returncode == 0, proc.stderr
    config = sandbox.home / "configs" / "pico.config"
    assert 'CONFIG_MCU="rp2040"' in config.read_text()
    out = (sandbox.home / "configs" / "pico.config.out").read_text().strip()
    assert out == str(sandbox.home / "builds" / "pico" / "menuconfig") + "/"
    assert not (tree / "out").exists()


def test_devices_import_creates_the_configs_dir(sandbox, tmp_path):
    cfg = tmp_path / "printer.cfg"
    cfg.write_text("[mcu]\nserial: /dev/serial/by-id/usb-Klipper_stm32f446xx_A-if00\n")
    sandbox.ok("devices", "import", str(cfg))
    assert (sandbox.home / "configs").is_dir()


def test_keys_follow_one_rule_everywhere(sandbox, tmp_path):
    import kflash

    for bad in ("_probe", ".hidden"):
        result = sandbox.run("devices", "add", bad, "--serial", "/dev/x")
        assert result.returncode == 2, result.stderr
        assert "start with a letter or a digit" in result.stderr
        with pytest.raises(kflash.RegistryError, match="start with a letter"):
            kflash.validate_key(bad)
    with pytest.raises(kflash.RegistryError, match="start with a letter"):
        kflash.validate_key("-x")
    kflash.validate_key("EBB36")
    cfg = tmp_path / "printer.cfg"
    cfg.write_text("[mcu -probe]\nserial: /dev/x\n[mcu _tool]\nserial: /dev/y\n")
    added = sandbox.json("devices", "import", str(cfg))["added"]
    assert [d["key"] for d in added] == ["mcu_-probe", "mcu__tool"]


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_an_include_that_is_not_a_regular_file_is_a_clear_error(
    sandbox, tmp_path, target
):
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
    cfg = tmp_path / "printer.cfg"
    cfg.write_text(f"[mcu]\nserial: /dev/x\n\n[include {target}]\n")
    started = time.monotonic()
    result = sandbox.run("devices", "import", str(cfg), timeout=30)
    assert time.monotonic() - started < 10
    assert result.returncode == 2, result.stderr
    assert "not a regular file" in result.stderr
    assert "printer.cfg:4:" in result.stderr
    assert sandbox.json("devices", "list") == []


def test_an_include_cycle_names_the_including_line(sandbox, tmp_path):
    (tmp_path / "printer.cfg").write_text("[include a.cfg]\n")
    (tmp_path / "a.cfg").write_text("# a\n[include printer.cfg]\n")
    result = sandbox.run("devices", "import", str(tmp_path / "printer.cfg"))
    assert result.returncode == 2
    assert "a.cfg:2:" in result.stderr and "cycle" in result.stderr, result.stderr


def test_new_settings_are_validated(sandbox):
    sandbox.ok("settings", "set", "auto_rollback", "true")
    sandbox.ok("settings", "set", "linux_mcu_service", "klipper_mcu")
    settings = sandbox.json("settings")["settings"]
    assert (settings["auto_rollback"], settings["linux_mcu_service"]) == (
        "true",
        "klipper_mcu",
    )
    result = sandbox.run("settings", "set", "auto_rollback", "maybe")
    assert result.returncode == 2 and "true or false" in result.stderr
