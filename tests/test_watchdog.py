"""The SIGKILL watchdog as a process: EOF without `done` starts the service."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_moonraker import FakeMoonraker

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


def test_systemd_backend_runs_sudo_systemctl_start(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    for name in ("sudo", "systemctl"):
        fake = bindir / name
        fake.write_text(
            '#!/bin/sh\necho "{} $*" >> "{}"\n{}\n'.format(
                name, calls, 'exec "$@"' if name == "sudo" else "exit 0"
            )
        )
        fake.chmod(0o755)
    message = settings(tmp_path / "unused")
    message["service"]["backend"] = "systemd"
    message["service"]["unit"] = "klipper-1"
    env = dict(os.environ, PATH="{}:{}".format(bindir, os.environ["PATH"]))
    proc = subprocess.run(
        [sys.executable, str(WATCHDOG)],
        input=(json.dumps(message) + "\n").encode(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout
    lines = calls.read_text().splitlines()
    assert lines[-1] == "systemctl start klipper-1"
    if os.geteuid() != 0:
        assert lines[0] == "sudo -n %s start klipper-1" % (bindir / "systemctl")


class WatchdogMoonraker(FakeMoonraker):
    """klipper-2 is the klipper unit; a start POST makes it active."""

    def __init__(self):
        self.active = False
        self.posted = []
        super().__init__()

    def route(self, method, path, args, body):
        if method == "POST":
            self.posted.append((path, body))
            self.active = True
            return "ok"
        if path == "/machine/system_info":
            state = "active" if self.active else "inactive"
            return {
                "system_info": {
                    "instance_ids": {"klipper": "klipper-2"},
                    "service_state": {
                        "klipper-2": {"active_state": state, "sub_state": "x"}
                    },
                }
            }
        return super().route(method, path, args, body)


def test_moonraker_backend_posts_start_for_the_resolved_unit(tmp_path):
    server = WatchdogMoonraker()
    try:
        message = settings(tmp_path / "unused")
        message["service"]["backend"] = "moonraker"
        message["service"]["unit"] = ""
        message["service"]["moonraker_url"] = server.url + "/"
        code, log = run_watchdog(tmp_path, [json.dumps(message) + "\n"])
    finally:
        server.close()
    assert code == 0, log
    assert server.posted == [
        ("/machine/services/start", {"service": "klipper-2"})
    ]
    assert "started again" in log
