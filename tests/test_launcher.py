"""Where the core starts the detached helper (`kflash.Runs.start_helper`), and
that it survives its parent.

The helper is the real one and runs a real flash run on the CLI sandbox. The
systemd host is imitated: klippy's cgroup (``KFLASH_CGROUP_FILE``) and
systemd's runtime dir (``KFLASH_SYSTEMD_DIR``), a ``sudo`` and a
``systemd-run`` on PATH (systemd-run records its arguments and starts the
unit's command in a new session with only the ``--setenv`` environment, as
systemd does, in a cgroup of its own), a Moonraker that starts
``kflash-run.service``'s command (``--pending``) or answers as Moonraker does
without its PolicyKit rule. A user that may not make units: sudo wants a
password, and systemd-run itself (run directly by root, as these tests are)
answers as systemd does without polkit's consent. The host bed
(test_host_bed.py) does the same as user pi on a real systemd.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fake_moonraker import Answer
from kflash import PreflightRefused, Runs
from sandbox import SandboxMoonraker

HELPER = [sys.executable, "-m", "kflash.helper"]

SYSTEMD_RUN = '''#!{python}
"""systemd-run as kflash uses it: a transient unit runs the command."""
import os, subprocess, sys
args = sys.argv[1:]
if os.path.exists({denied!r}):
    sys.exit("Failed to start transient service unit: Interactive "
             "authentication required.")
open({record!r}, "w").write("\\n".join(args))
cut = args.index("--")
env = dict(a[len("--setenv="):].split("=", 1) for a in args[:cut]
           if a.startswith("--setenv="))
cwd = [a.split("=", 1)[1] for a in args[:cut]
       if a.startswith("--working-directory=")][0]
unit = [a.split("=", 1)[1] for a in args[:cut] if a.startswith("--unit=")][0]
cgroup = os.path.join({root!r}, unit + ".cgroup")
open(cgroup, "w").write("0::/system.slice/%s.service\\n" % unit)
env["KFLASH_CGROUP_FILE"] = cgroup
subprocess.Popen(args[cut + 1:], env=env, cwd=cwd, start_new_session=True,
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
'''


def write_exe(path, body):
    path.write_text(body)
    path.chmod(0o755)
    return path


class Host:
    """klippy inside klipper.service on a systemd host (imitated)."""

    def __init__(self, sandbox, monkeypatch):
        self.sandbox = sandbox
        root = sandbox.root / "host"
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        (root / "run-systemd-system").mkdir()
        self.cgroup = root / "klippy.cgroup"
        self.cgroup.write_text("0::/system.slice/klipper.service\n")
        self.systemd_run_args = root / "systemd-run.args"
        self.denied = root / "denied"
        write_exe(self.bin / "systemd-run", SYSTEMD_RUN.format(
            python=sys.executable, record=str(self.systemd_run_args),
            root=str(root), denied=str(self.denied)))
        self.sudo(allowed=True)
        env = dict(sandbox.env, PATH=f"{self.bin}:{os.environ['PATH']}",
                   KFLASH_SYSTEMD_DIR=str(root / "run-systemd-system"),
                   KFLASH_CGROUP_FILE=str(self.cgroup))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        self.runs = Runs(sandbox.home)

    def sudo(self, allowed):
        """Whether this user may make units (sudo, or as root systemd-run)."""
        if allowed:
            write_exe(self.bin / "sudo", '#!/bin/sh\n[ "$1" = "-n" ] || exit 99\n'
                      'shift\nexec "$@"\n')
            if self.denied.exists():
                self.denied.unlink()
        else:
            write_exe(self.bin / "sudo", "#!/bin/sh\necho 'sudo: a password "
                      "is required' >&2\nexit 1\n")
            self.denied.write_text("")

    def start(self, run_id, **kw):
        kw.setdefault("moonraker_url", self.sandbox.moonraker.url)
        return self.runs.start_helper(run_id, **kw)

    def wait_finished(self, run_id):
        self.sandbox.wait_for(
            lambda: (self.runs.get(run_id) or {}).get("state") == "finished",
            timeout=120, what=f"run {run_id} to finish")
        return self.runs.get(run_id)


class UnitMoonraker(SandboxMoonraker):
    """Moonraker with kflash-run in available_services (or not); starting it
    runs the unit's command, or fails as without Moonraker's polkit rule."""

    def __init__(self, sandbox, services=("klipper", "kflash-run"),
                 polkit=True):
        self.services = list(services)
        self.polkit = polkit
        self.started = []
        self.units = []
        super().__init__(sandbox)

    def answer(self, method, target, raw):
        result = super().answer(method, target, raw)
        if target == "/server/info" and not self.polkit:
            result["warnings"] = [
                "Moonraker not authorized for PolicyKit action: "
                "[org.freedesktop.systemd1.manage-units]"]
        return result

    def route(self, method, path, args, body):
        if (method, path) == ("GET", "/machine/system_info"):
            return {"system_info": {"available_services": self.services}}
        if (method, path) == ("POST", "/machine/services/start"):
            self.started.append(body.get("service"))
            if not self.polkit:
                raise Answer(500, "DBusError: Interactive authentication "
                             "required.")
            env = dict(self.sandbox.env, KFLASH_HOME=str(self.sandbox.home))
            self.units.append(subprocess.Popen(
                [*HELPER, "--home", str(self.sandbox.home), "--pending"],
                env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            return "ok"
        return super().route(method, path, args, body)

    def close(self):
        for unit in self.units:
            unit.wait(120)
        super().close()


def printer(sandbox, **kw):
    sandbox.add_board("octopus")
    sandbox.moonraker = UnitMoonraker(sandbox, **kw)
    sandbox.settings(moonraker_url=sandbox.moonraker.url)
    return sandbox.moonraker


def test_sudo_systemd_run_makes_a_unit_of_its_own(sandbox, monkeypatch):
    printer(sandbox)
    host = Host(sandbox, monkeypatch)
    got = host.start("R-SD", only_outdated=True, python=sys.executable)
    assert got["method"] == "systemd-run" and got["unit"] == "kflash-helper"
    args = host.systemd_run_args.read_text().splitlines()
    assert "--unit=kflash-helper" in args and "--collect" in args
    assert "--property=KillMode=process" in args
    assert f"--uid={os.getuid()}" in args
    assert f"--setenv=KFLASH_HOME={sandbox.home}" in args
    assert args[args.index("--") + 1:] == [
        *HELPER, "--home", str(sandbox.home), "--run-id", "R-SD",
        "--only-outdated"]
    rec = host.wait_finished("R-SD")
    assert rec["pid"] == got["pid"] and rec["ok"] is True, rec
    assert rec["options"]["only_outdated"] is True
    assert sandbox.service_events() == ["stop", "start"]
    # inside its own unit the helper's watchdog needs no second unit
    log = (sandbox.home / "watchdog.log").read_text()
    assert "armed for" in log and "standing down" in log
    assert sandbox.moonraker.started == []


def test_without_sudo_moonraker_starts_the_installed_unit(sandbox, monkeypatch):
    moonraker = printer(sandbox)
    host = Host(sandbox, monkeypatch)
    host.sudo(allowed=False)
    got = host.start("R-MR", device="octopus")
    assert got["method"] == "moonraker" and got["unit"] == "kflash-run"
    assert moonraker.started == ["kflash-run"]
    rec = host.wait_finished("R-MR")
    assert rec["options"]["keys"] == ["octopus"] and rec["ok"] is True, rec
    assert not (sandbox.home / "runs" / "pending.json").exists()
    assert not host.systemd_run_args.exists()  # sudo refused before it ran


def refused(host, run_id, **kw):
    with pytest.raises(PreflightRefused) as e:
        host.start(run_id, **kw)
    assert e.value.exit_code == 3
    return str(e.value)


def assert_nothing_started(sandbox, run_id):
    assert sandbox.service_events() == []
    assert not (sandbox.home / "runs" / f"{run_id}.json").exists()
    assert not (sandbox.home / "runs" / f"{run_id}.log").exists()
    assert not (sandbox.home / "runs" / "pending.json").exists()


def test_no_way_out_of_klipper_names_each_missing_piece(sandbox, monkeypatch):
    moonraker = printer(sandbox, services=("klipper",))
    host = Host(sandbox, monkeypatch)
    host.sudo(allowed=False)
    msg = refused(host, "R-NO")
    assert msg.splitlines()[0].startswith("kflash cannot start a flash run")
    assert "klipper.service" in msg
    said = ("a password is required" if os.geteuid() else
            "Interactive authentication required")
    assert said in msg and "sudoers" in msg and "systemd-run" in msg
    # kflash's unit is not installed on this machine: install.sh adds both
    assert "moonraker.asvc" in msg and "install.sh" in msg
    assert msg.endswith("Nothing was stopped.")
    assert moonraker.started == []
    assert_nothing_started(sandbox, "R-NO")
    # Moonraker away altogether: said so
    msg = refused(host, "R-NO", moonraker_url="http://127.0.0.1:9")
    assert "Moonraker is unreachable at http://127.0.0.1:9" in msg


def test_moonraker_without_its_polkit_rule_is_named(sandbox, monkeypatch):
    moonraker = printer(sandbox, polkit=False)
    host = Host(sandbox, monkeypatch)
    host.sudo(allowed=False)
    msg = refused(host, "R-PK")
    assert moonraker.started == ["kflash-run"]
    assert "Interactive authentication required" in msg
    assert "PolicyKit rule is missing" in msg
    assert "org.freedesktop.systemd1.manage-units" in msg
    assert "set-policykit-rules.sh" in msg
    assert "install.sh" not in msg
    assert_nothing_started(sandbox, "R-PK")


def test_an_explicit_session_inside_klipper_is_refused_untried(
        sandbox, monkeypatch):
    moonraker = printer(sandbox)
    host = Host(sandbox, monkeypatch)
    msg = refused(host, "R-SS", launcher="session")
    assert "`launcher: session`" in msg and "klipper.service" in msg
    assert "Nothing was stopped" in msg
    assert not host.systemd_run_args.exists() and moonraker.started == []
    assert_nothing_started(sandbox, "R-SS")
    with pytest.raises(ValueError):
        host.start("R-SS", launcher="nohup")


def test_a_session_helper_survives_its_parent_and_keeps_no_fds(sandbox):
    """Outside systemd: a new session. Killing klippy's process group (what
    supervisord's stopasgroup does) leaves the helper running, and a caller
    capturing the parent's output is not held up by the helper or its
    watchdog."""
    sandbox.add_board("octopus")
    sandbox.start_moonraker()
    sandbox.settings(flash_timeout_s=8)  # SIGTERM finishes the board: bounded
    sandbox.set_behaviour("octopus", "hang")
    fds = sandbox.root / "fds"
    # the interpreter the helper is started with: notes its fds, then is
    # the real one
    python = write_exe(sandbox.root / "python", textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys
        seen = sorted(os.listdir("/proc/self/fd"), key=int)
        open({str(fds)!r}, "w").write(" ".join(seen))
        os.execv({sys.executable!r}, [{sys.executable!r}] + sys.argv[1:])
        """))
    code = textwrap.dedent(f"""\
        import json, sys, time
        from kflash import Runs
        got = Runs({str(sandbox.home)!r}).start_helper(
            "R-SESSION", python={str(python)!r})
        print(json.dumps(got), flush=True)
        time.sleep(120)
        """)
    env = dict(sandbox.env, KFLASH_SYSTEMD_DIR=str(sandbox.root / "none"))
    parent = subprocess.Popen([sys.executable, "-c", code], env=env,
                              stdout=subprocess.PIPE, start_new_session=True)
    got = json.loads(parent.stdout.readline())
    assert got["method"] == "session" and got["unit"] is None
    sandbox.wait_for(lambda: (sandbox.root / "hanging").exists(), timeout=60,
                     what="the flash to block")
    os.killpg(parent.pid, signal.SIGKILL)
    parent.wait()
    # the parent's stdout reaches EOF: neither helper nor watchdog holds it
    assert parent.stdout.read() == b""
    parent.stdout.close()
    rec = Runs(sandbox.home).get("R-SESSION")
    assert rec["state"] == "running" and rec["pid"] == got["pid"]
    assert os.getpgid(got["pid"]) != parent.pid
    # stdin, stdout, stderr (+ the one listdir opens)
    seen = [int(f) for f in fds.read_text().split()]
    assert seen[:3] == [0, 1, 2] and len(seen) <= 4, seen
    os.kill(got["pid"], signal.SIGTERM)
    sandbox.wait_for(lambda: Runs(sandbox.home).get("R-SESSION")["state"]
                     == "finished", timeout=30, what="the helper to unwind")
    assert sandbox.service_events() == ["stop", "start"]
