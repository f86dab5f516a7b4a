"""A Debian root booted with a real systemd as PID 1, in a systemd-nspawn container.

`Container(lower, workdir)` mounts an overlay (the cached, unpacked root read-only
below, a fresh upper dir per container), so every container starts from the same root
in no time and the root below is never written. `boot()` starts
``systemd-nspawn -b --register=no --keep-unit --private-network`` (no host systemd
needed) with ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``: the container sees a cgroup2-only
hierarchy, as on Raspberry Pi OS bookworm. It waits until ``systemctl
is-system-running`` says ``running`` (``degraded`` fails with the failed units).

Commands run inside with ``nsenter -t <container PID 1> -a`` and a clean environment:
`run` as root, `login` as a user through a login shell (``runuser -l``: /etc/profile and
~/.profile are read, as over SSH), `in_unit` inside a real transient unit (``systemd-run
--wait --pipe``). `http` calls an HTTP API on the container's loopback (Moonraker) from
the host's Python inside the container's network namespace only. `reboot()` is a real
one: ``systemctl reboot`` inside, nspawn exits, the same root boots again. `halt()`
powers off, waits, and checks that no process of the container and no mount of its
root is left; `remove()` also deletes the upper dir.

One container per object; not thread-safe. Needs root, systemd-nspawn and nsenter.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from host_bed.root import BedError

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def wait_for(cond: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
    """Poll ``cond`` until it returns something truthy; TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _mounts_under(path: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4]
            if target == path or target.startswith(path + "/"):
                out.append(target)
    return out


class Result:
    """A finished command inside the container."""

    def __init__(self, argv: list[str], code: int, out: str, err: str) -> None:
        self.argv = argv
        self.code = code
        self.out = out
        self.err = err

    def __repr__(self) -> str:
        return (f"Result(code={self.code}, out={self.out[-500:]!r}, "
                f"err={self.err[-500:]!r})")


class Container:
    """A booted (or bootable) container over ``lower`` (see module docs)."""

    def __init__(self, lower: str, workdir: str, name: str = "kflash-bed",
                 log: Callable[[str], None] = lambda _m: None,
                 overlay: bool = True) -> None:
        self.lower = lower
        self.overlay = overlay
        self.dir = os.path.abspath(workdir)
        # overlay=False boots ``lower`` itself (building the cached printer host)
        self.root = (os.path.join(self.dir, "root") if overlay
                     else os.path.abspath(lower))
        self.upper = os.path.join(self.dir, "upper")
        self.work = os.path.join(self.dir, "work")
        self.console = os.path.join(self.dir, "console.log")
        self.name = name
        self.log = log
        self.nspawn: Optional[subprocess.Popen[bytes]] = None
        self.pid1 = 0
        self.boots = 0

    # ----------------------------------------------------------- the root

    def mount(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        if not self.overlay:
            return
        for d in (self.root, self.upper, self.work):
            os.makedirs(d, exist_ok=True)
        if _mounts_under(self.root):
            return
        opts = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, self.root],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise BedError("cannot mount the container's overlay root: "
                           + r.stderr.strip())

    def unmount(self) -> None:
        if self.overlay and _mounts_under(self.root):
            subprocess.run(["umount", self.root], check=True)

    def path(self, inside: str) -> str:
        """Host path of a path inside the container (the overlay's merged view)."""
        return os.path.join(self.root, inside.lstrip("/"))

    # ------------------------------------------------------ boot and halt

    def boot(self, timeout: float = 60.0) -> None:
        self.mount()
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        console = open(self.console, "ab")
        try:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "-D", self.root, "--boot",
                 "--register=no", "--keep-unit", "--private-network",
                 f"--machine={self.name}", "--console=read-only"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)
        finally:
            console.close()
        self.boots += 1
        try:
            self.pid1 = wait_for(self._find_pid1, 20, "the container's PID 1")
            self.wait_running(timeout)
        except BaseException:
            self._diagnose_and_stop()
            raise

    def _find_pid1(self) -> int:
        if self.nspawn is None or self.nspawn.poll() is not None:
            raise BedError("systemd-nspawn exited while booting:\n"
                           + self.console_tail())
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    status = f.read()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines()
                          if ":\t" in line)
            if (fields.get("PPid", "").strip() == str(self.nspawn.pid)
                    and fields.get("NSpid", "").split()[-1:] == ["1"]):
                return int(entry)
        return 0

    def wait_running(self, timeout: float) -> None:
        def state() -> Optional[str]:
            r = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
            s = r.out.strip()
            return s if s in ("running", "degraded") else None

        got = wait_for(state, timeout, "systemd inside to reach `running`", 0.1)
        if got == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend"], check=False)
            raise BedError(f"the container booted degraded; failed units:\n{failed.out}"
                           + self.journal_tail())

    def console_tail(self, size: int = 3000) -> str:
        try:
            with open(self.console, "rb") as f:
                return f.read()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def journal_tail(self, lines: int = 60, unit: Optional[str] = None) -> str:
        argv = ["journalctl", "--no-pager", "-n", str(lines)]
        if unit:
            argv += ["-u", unit]
        r = self.run(argv, check=False, timeout=20)
        return f"\n--- journal{' ' + unit if unit else ''}\n{r.out}"

    def _wait_exit(self, timeout: float) -> bool:
        assert self.nspawn is not None
        try:
            self.nspawn.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def reboot(self, timeout: float = 60.0) -> None:
        """``systemctl reboot`` inside; the same root boots again."""
        self.run(["systemctl", "reboot"], check=False)
        if not self._wait_exit(60):
            raise BedError("the container did not shut down for the reboot:\n"
                           + self.console_tail())
        self._check_gone()
        self.boot(timeout)

    def halt(self, timeout: float = 30.0) -> None:
        """Power off; leave no process and no mount of the container behind."""
        if self.nspawn is None:
            self.unmount()
            return
        if self.nspawn.poll() is None:
            self.run(["systemctl", "poweroff"], check=False, timeout=10)
            if not self._wait_exit(timeout):
                os.killpg(self.nspawn.pid, signal.SIGTERM)
                if not self._wait_exit(10):
                    os.killpg(self.nspawn.pid, signal.SIGKILL)
                    self._wait_exit(10)
                    # A killed nspawn leaves the container's systemd running (seen:
                    # user@1000.service stuck in final-sigkill for its 90 s stop
                    # timeout); SIGKILL to the namespace's init ends every process.
                    self._kill_pid1()
        self._check_gone()
        self.nspawn = None
        self.pid1 = 0
        self.unmount()
        left = _mounts_under(self.root) if self.overlay else []
        if left:
            raise BedError(f"mounts left behind: {left}")

    def _kill_pid1(self) -> None:
        if not self.pid1:
            return
        try:
            os.kill(self.pid1, signal.SIGKILL)
        except ProcessLookupError:
            return
        try:
            wait_for(lambda: not os.path.exists(f"/proc/{self.pid1}"), 10,
                     "the container's PID 1 to go after SIGKILL")
        except TimeoutError:
            pass  # _check_gone names it

    def _check_gone(self) -> None:
        if self.pid1 and os.path.exists(f"/proc/{self.pid1}"):
            raise BedError(f"the container's PID 1 ({self.pid1}) is still there")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/root") == self.root:
                    raise BedError(f"process {entry} of the container is still running")
            except OSError:
                continue

    def _diagnose_and_stop(self) -> None:
        sys.stderr.write(self.console_tail())
        try:
            self.halt(10)
        except Exception as e:  # noqa: BLE001 - the boot error is the one to raise
            sys.stderr.write(f"host bed: halting after a failed boot: {e}\n")

    def remove(self) -> None:
        """Halt if needed and delete the container's own files."""
        try:
            self.halt()
        finally:
            if not _mounts_under(self.root):
                shutil.rmtree(self.dir, ignore_errors=True)

    # ---------------------------------------------------------- commands

    def _nsenter(self, *namespaces: str) -> list[str]:
        if not self.pid1:
            raise BedError("the container is not running")
        return ["nsenter", "-t", str(self.pid1), *(namespaces or ("-a",)), "--"]

    def run(self, argv: list[str], check: bool = True, timeout: float = 120.0,
            input: Optional[str] = None,
            env: Optional[dict[str, str]] = None) -> Result:
        """Run ``argv`` inside as root, in no unit, with a clean environment."""
        base = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
        base.update(env or {})
        full = self._nsenter() + ["env", "-i", *(f"{k}={v}" for k, v in base.items()),
                                  *argv]
        try:
            p = subprocess.run(full, input=input, capture_output=True, text=True,
                               timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise BedError(f"inside the container, `{shlex.join(argv)}` took more "
                           f"than {timeout:.0f} s; output: {e.stdout!r}") from None
        res = Result(argv, p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise BedError(f"inside the container, `{shlex.join(argv)}` failed "
                           f"(exit {p.returncode}):\n{p.stdout[-3000:]}"
                           f"{p.stderr[-3000:]}")
        return res

    def sh(self, script: str, **kw: Any) -> Result:
        """A bash script as root."""
        return self.run(["bash", "-euo", "pipefail", "-c", script], **kw)

    def login(self, user: str, script: str, **kw: Any) -> Result:
        """A bash script in ``user``'s login shell (``runuser -l``)."""
        return self.run(["runuser", "-l", user, "-c", script], **kw)

    def in_unit(self, argv: list[str], user: Optional[str] = None, **kw: Any) -> Result:
        """``argv`` inside a real transient unit (``systemd-run --wait --pipe``)."""
        unit = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect"]
        if user:
            unit.append(f"--uid={user}")
        return self.run(unit + ["--"] + argv, **kw)

    def read(self, inside: str) -> str:
        with open(self.path(inside), encoding="utf-8", errors="replace") as f:
            return f.read()

    def exists(self, inside: str) -> bool:
        return os.path.lexists(self.path(inside))

    # -------------------------------------------------------------- HTTP

    _HTTP = """
import json, sys, urllib.error, urllib.request
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
data = body.encode() if body else None
req = urllib.request.Request(url, data=data, method=method,
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=float(sys.argv[4])) as r:
        out = {"status": r.status, "body": r.read().decode("utf-8", "replace")}
except urllib.error.HTTPError as e:
    out = {"status": e.code, "body": e.read().decode("utf-8", "replace")}
except OSError as e:
    out = {"status": 0, "body": str(e)}
print(json.dumps(out))
"""

    def http(self, method: str, url: str, body: Any = None,
             timeout: float = 15.0) -> tuple[int, Any]:
        """(status, decoded JSON or text); status 0 when nothing answered."""
        data = "" if body is None else json.dumps(body)
        argv = self._nsenter("--net") + [sys.executable, "-I", "-c", self._HTTP, method,
                                          url, data, str(timeout)]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10,
                           check=False)
        if p.returncode != 0:
            raise BedError(f"HTTP through the container's network failed: {p.stderr}")
        got = json.loads(p.stdout)
        try:
            return got["status"], json.loads(got["body"])
        except ValueError:
            return got["status"], got["body"]
