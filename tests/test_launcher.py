"""Where the detached helper is started, and that it survives its parent.

The systemd branch is exercised with fakes (a fake cgroup file and systemd
dir through KFLASH_CGROUP_FILE / KFLASH_SYSTEMD_DIR, a fake sudo and
systemd-run on PATH recording their arguments, a fake Moonraker); the
session branch for real.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kflash import launcher
from kflash.helper import pid_alive


def write_exe(path, body):
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


@pytest.fixture
def systemd_env(tmp_path):
    """klippy inside klipper.service on a systemd host (faked)."""
    sd = tmp_path / "run-systemd-system"
    sd.mkdir()
    cg = tmp_path / "cgroup"
    cg.write_text("0::/system.slice/klipper.service\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
           "KFLASH_SYSTEMD_DIR": str(sd), "KFLASH_CGROUP_FILE": str(cg)}
    return env, bin_dir


def test_detect_reads_the_cgroup_of_klipper(systemd_env, tmp_path):
    env, _ = systemd_env
    ctx = launcher.detect(env)
    assert ctx.systemd and ctx.unit == "klipper" and ctx.in_service
    assert launcher.choose("auto", env) == ["systemd-run", "moonraker"]
    # a login session or the user manager is not a service we die with
    cg = tmp_path / "cgroup"
    cg.write_text("0::/user.slice/user-1000.slice/session-3.scope\n")
    assert not launcher.detect(env).in_service
    assert launcher.choose("auto", env) == ["session"]
    cg.write_text("0::/user.slice/user-1000.slice/user@1000.service/app\n")
    assert launcher.choose("auto", env) == ["session"]
    # cgroup v1 layout, multi-instance unit name
    cg.write_text("12:cpu:/\n1:name=systemd:/system.slice/klipper-1.service\n")
    assert launcher.detect(env).unit == "klipper-1"
    # no systemd at all (supervisord, containers)
    env = dict(env, KFLASH_SYSTEMD_DIR=str(tmp_path / "absent"))
    assert launcher.choose("auto", env) == ["session"]
    with pytest.raises(ValueError):
        launcher.choose("nohup", env)


def test_systemd_branch_uses_sudo_systemd_run(systemd_env, tmp_path):
    env, bin_dir = systemd_env
    rec = tmp_path / "systemd-run.args"
    write_exe(bin_dir / "sudo", """\
        [ "$1" = "-n" ] || exit 99
        shift
        exec "$@"
        """)
    write_exe(bin_dir / "systemd-run", f"""\
        for a in "$@"; do echo "$a"; done > {rec}
        """)
    home = tmp_path / "state"
    got = launcher.launch("/usr/bin/python3", home, only_outdated=True,
                          env=env, run_id="R1")
    assert got.method == "systemd-run"
    args = rec.read_text().splitlines()
    assert "--unit=kflash-helper" in args and "--collect" in args
    assert "--property=KillMode=process" in args
    assert f"--uid={os.getuid()}" in args
    assert f"--setenv=KFLASH_HOME={home}" in args
    tail = args[args.index("--") + 1:]
    assert tail == ["/usr/bin/python3", "-m", "kflash.helper", "--home",
                    str(home), "--only-outdated", "--run-id", "R1"]


class FakeMoonraker(BaseHTTPRequestHandler):
    services = ["klipper", "moonraker"]
    started = []

    def _json(self, doc):
        body = json.dumps({"result": doc}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/machine/system_info":
            self._json({"system_info": {
                "available_services": list(self.services)}})
        else:
            self.send_error(404)

    def do_POST(self):  # noqa: N802
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}")
        if self.path == "/machine/services/start":
            self.started.append(body.get("service"))
            self._json("ok")
        else:
            self.send_error(404)

    def log_message(self, *a):
        pass


@pytest.fixture
def moonraker():
    FakeMoonraker.started = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeMoonraker)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def no_sudo(bin_dir):
    write_exe(bin_dir / "sudo", """\
        echo "sudo: a password is required" >&2
        exit 1
        """)
    write_exe(bin_dir / "systemd-run", "exit 0\n")


def test_systemd_without_sudo_uses_the_unit_through_moonraker(
        systemd_env, tmp_path, moonraker):
    env, bin_dir = systemd_env
    no_sudo(bin_dir)
    srv, url = moonraker
    FakeMoonraker.services = ["klipper", "kflash-run"]
    home = tmp_path / "state"
    got = launcher.launch("/usr/bin/python3", home, device="EBB36",
                          moonraker_url=url, env=env, run_id="R2")
    assert got.method == "moonraker"
    assert FakeMoonraker.started == ["kflash-run"]
    req = json.loads((home / "helper" / "request.json").read_text())
    assert req == {"version": 1, "only_outdated": False, "device": "EBB36",
                   "run_id": "R2"}


def test_inside_klipper_cgroup_with_no_way_out_refuses(
        systemd_env, tmp_path, moonraker):
    env, bin_dir = systemd_env
    no_sudo(bin_dir)
    srv, url = moonraker
    FakeMoonraker.services = ["klipper"]  # unit not in moonraker.asvc
    home = tmp_path / "state"
    with pytest.raises(launcher.LaunchRefused) as e:
        launcher.launch("/usr/bin/python3", home, moonraker_url=url,
                        env=env)
    msg = str(e.value)
    assert "klipper.service" in msg
    assert "password is required" in msg
    assert "moonraker.asvc" in msg and "install.sh" in msg
    assert "Nothing was stopped" in msg
    assert FakeMoonraker.started == []
    assert not (home / "helper" / "request.json").exists()
    # Moonraker down altogether: same refusal, naming why
    with pytest.raises(launcher.LaunchRefused) as e:
        launcher.launch("/usr/bin/python3", home,
                        moonraker_url="http://127.0.0.1:9", env=env)
    assert "Moonraker at http://127.0.0.1:9" in str(e.value)


def test_session_helper_survives_its_parent_group_and_keeps_no_fds(
        tmp_path):
    """Outside systemd: a new session; killing klippy's process group (what
    supervisord's stopasgroup does) leaves the helper running, and a caller
    capturing the parent's output is not held up by the helper."""
    marks = tmp_path / "marks"
    marks.mkdir()
    # stands in for the interpreter: records its fds, waits for "go"
    fake_python = tmp_path / "fake-python"
    fake_python.write_text(f"""#!{sys.executable}
import os, time
fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
open("{marks}/fds", "w").write(" ".join(map(str, fds)))
open("{marks}/pid.tmp", "w").write(str(os.getpid()))
os.rename("{marks}/pid.tmp", "{marks}/pid")
while not os.path.exists("{marks}/go"):
    time.sleep(0.05)
open("{marks}/done", "w").write("survived")
""")
    fake_python.chmod(0o755)
    code = textwrap.dedent(f"""\
        import sys, time
        from kflash import launcher
        env = {{"PATH": "/usr/bin:/bin",
               "KFLASH_SYSTEMD_DIR": "{tmp_path}/no-systemd"}}
        got = launcher.launch("{fake_python}", "{tmp_path}/state", env=env,
                              log_path="{tmp_path}/helper.log")
        print(got.method, got.pid, flush=True)
        time.sleep(60)
        """)
    parent = subprocess.Popen([sys.executable, "-c", code],
                              stdout=subprocess.PIPE, start_new_session=True)
    method, pid = parent.stdout.readline().decode().split()
    assert method == "session"
    deadline = time.monotonic() + 10
    while not (marks / "pid").exists():
        assert time.monotonic() < deadline, "helper never started"
        time.sleep(0.02)
    assert int((marks / "pid").read_text()) == int(pid)
    os.killpg(parent.pid, signal.SIGKILL)
    parent.wait()
    # the parent's stdout pipe reaches EOF: the helper did not inherit it
    assert parent.stdout.read() == b""
    parent.stdout.close()
    assert pid_alive(int(pid))
    assert os.getpgid(int(pid)) != parent.pid
    # only stdin, stdout, stderr (+ the one listdir itself opens)
    fds = [int(f) for f in (marks / "fds").read_text().split()]
    assert fds[:3] == [0, 1, 2] and len(fds) <= 4, fds
    (marks / "go").write_text("")
    deadline = time.monotonic() + 10
    while not (marks / "done").exists():
        assert time.monotonic() < deadline, "helper died with its parent"
        time.sleep(0.02)
