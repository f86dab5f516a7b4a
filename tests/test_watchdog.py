"""The SIGKILL watchdog as a process: EOF without `done` starts the service."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

WATCHDOG = Path(__file__).resolve().parent.parent / "python" / "kflash" / "watchdog.py"


def settings(marker, start_command=None):
    if start_command is None:
        start_command = f"sh -c 'echo started >> \"$0\"' '{marker}'"
    return {
        "version": 1,
        "runner_pid": 1,
        "service": {
            "backend": "command",
            "unit": "klipper",
            "moonraker_url": "http://127.0.0.1:7125",
            "stop_command": "true",
            "start_command": start_command,
        },
    }


def run_watchdog(tmp_path, lines, timeout=20):
    """Run the watchdog by file path (no native module needed), feed it lines."""
    log = tmp_path / "watchdog.log"
    with open(log, "ab") as out:
        proc = subprocess.run(
            [sys.executable, str(WATCHDOG)],
            input="".join(lines).encode(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    return proc.returncode, log.read_text()


def test_eof_without_done_starts_the_service(tmp_path):
    marker = tmp_path / "started"
    started = time.monotonic()
    code, log = run_watchdog(tmp_path, [json.dumps(settings(marker)) + "\n"])
    assert code == 0, log
    assert marker.read_text() == "started\n"
    assert time.monotonic() - started < 10
    assert "armed for" in log
    assert "started again" in log


def test_done_starts_nothing(tmp_path):
    marker = tmp_path / "started"
    code, log = run_watchdog(tmp_path, [json.dumps(settings(marker)) + "\n", "done\n"])
    assert code == 0, log
    assert not marker.exists()
    assert "disarmed" in log


def test_failing_start_is_retried_and_logged(tmp_path):
    marker = tmp_path / "attempts"
    command = f"sh -c 'echo x >> \"$0\"; exit 1' '{marker}'"
    code, log = run_watchdog(
        tmp_path, [json.dumps(settings(marker, command)) + "\n"], timeout=30
    )
    assert code == 1
    assert marker.read_text().count("x") == 3
    assert "IS STILL STOPPED" in log


@pytest.mark.parametrize("first", ["", "not json\n", '{"no": "service"}\n'])
def test_bad_settings_are_reported(tmp_path, first):
    code, log = run_watchdog(tmp_path, [first])
    assert code == 2
    assert "settings" in log
