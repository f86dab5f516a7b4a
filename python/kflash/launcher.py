"""Start the detached helper so that it survives ``stop klipper``.

A G-code command cannot flash: klippy holds the ttys, and stopping klipper
kills klippy. The ``[kflash]`` extra therefore starts ``python -m
kflash.helper`` out of klippy's reach, in one of three ways:

``systemd-run``
    ``sudo -n systemd-run --unit=kflash-helper --collect ...``: a transient
    unit of its own, outside klipper.service's cgroup (systemd's default
    ``KillMode=control-group`` kills every process of that cgroup on stop, so
    a ``setsid`` child of klippy dies with it).
``moonraker``
    the ``kflash-run.service`` unit that ``scripts/install.sh`` installs,
    started through Moonraker's ``/machine/services/start`` (no sudo; the unit
    must be listed in ``moonraker.asvc``). The unit's command reads the run's
    options from ``<home>/helper/request.json``.
``session``
    a new session (``start_new_session=True``): enough outside systemd
    (supervisord with ``stopasgroup``, a shell, the tests).

``auto`` picks ``session`` unless klippy runs inside a systemd service's
cgroup; there it tries ``systemd-run`` and then Moonraker, and when neither
works it REFUSES (``LaunchRefused`` with instructions) before anything is
stopped: kflash never starts a run it cannot protect.

Detection reads ``/run/systemd/system`` and ``/proc/self/cgroup``; the
environment variables ``KFLASH_SYSTEMD_DIR`` and ``KFLASH_CGROUP_FILE``
override both paths (tests). Detached processes keep none of the parent's
file descriptors: ``close_fds``, stdin from /dev/null, stdout and stderr to a
log file.

Pure Python, stdlib only; safe to call from klippy's reactor thread only for
the ``session`` path (the others run commands or HTTP requests that may take
a second: call ``launch`` from a worker thread there).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

from kflash.helper import write_json_atomic

__all__ = [
    "HELPER_UNIT",
    "INSTALLED_UNIT",
    "LaunchRefused",
    "Launched",
    "SystemdContext",
    "choose",
    "detect",
    "helper_argv",
    "launch",
    "write_request",
]

#: The transient unit ``sudo systemd-run`` makes for a run.
HELPER_UNIT = "kflash-helper"
#: The unit ``scripts/install.sh`` installs and Moonraker starts. Not
#: HELPER_UNIT: a transient unit cannot take the name of a unit file.
INSTALLED_UNIT = "kflash-run"

METHODS = ("auto", "systemd-run", "moonraker", "session")

_SERVICE_RE = re.compile(r"([^/]+)\.service$")


class LaunchRefused(Exception):
    """The helper cannot be started where it would survive ``stop klipper``.

    The message says why and what to do; nothing has been stopped.
    """


class SystemdContext:
    """Where this process runs, as far as systemd is concerned.

    ``systemd``: systemd is the init system; ``unit``: the service unit whose
    cgroup holds this process (``klipper.service``), or None.
    """

    def __init__(self, systemd, unit):
        self.systemd = systemd
        self.unit = unit

    @property
    def in_service(self):
        """True when stopping ``unit`` would kill this process's children."""
        return self.systemd and self.unit is not None

    def __repr__(self):
        return f"SystemdContext(systemd={self.systemd!r}, unit={self.unit!r})"


def detect(env=None):
    """Read whether systemd runs this host and which service unit holds us.

    Paths: ``$KFLASH_SYSTEMD_DIR`` (default ``/run/systemd/system``) and
    ``$KFLASH_CGROUP_FILE`` (default ``/proc/self/cgroup``).
    """
    env = os.environ if env is None else env
    sd_dir = env.get("KFLASH_SYSTEMD_DIR") or "/run/systemd/system"
    cg_file = env.get("KFLASH_CGROUP_FILE") or "/proc/self/cgroup"
    systemd = os.path.isdir(sd_dir)
    unit = None
    try:
        with open(cg_file, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        # "0::/system.slice/klipper.service" (v2) or
        # "1:name=systemd:/system.slice/klipper.service" (v1)
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] not in ("", "name=systemd"):
            continue
        for comp in reversed(parts[2].strip().split("/")):
            m = _SERVICE_RE.match(comp)
            if m:
                # user@1000.service is the user's manager, not a service
                # that `stop klipper` would take down with us.
                if not m.group(1).startswith("user@"):
                    unit = m.group(1)
                break
        if unit:
            break
    return SystemdContext(systemd, unit)


class Launched:
    """A started helper: how (``method``), and its pid when known."""

    def __init__(self, method, pid=None, process=None, detail=""):
        self.method = method
        self.pid = pid
        self.process = process
        self.detail = detail

    def __repr__(self):
        return f"Launched(method={self.method!r}, pid={self.pid!r})"


def helper_argv(python, home, only_outdated=False, device=None,
                run_id=None):
    """The helper's command line for one run."""
    argv = [python, "-m", "kflash.helper", "--home", str(home)]
    if only_outdated:
        argv.append("--only-outdated")
    if device:
        argv += ["--device", device]
    if run_id:
        argv += ["--run-id", run_id]
    return argv


def write_request(home, only_outdated=False, device=None, run_id=None):
    """Write ``<home>/helper/request.json`` (atomically) for the unit path.

    The installed ``kflash-run.service`` runs ``kflash.helper --pending``,
    which takes its options from this file.
    """
    d = os.path.join(str(home), "helper")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "request.json")
    doc = {"version": 1, "only_outdated": bool(only_outdated),
           "device": device, "run_id": run_id}
    write_json_atomic(path, doc)
    return path


def _refusal(ctx, tried):
    unit = ctx.unit or "klipper"
    lines = [
        "kflash cannot start a flash run that would survive "
        f"`systemctl stop {unit}`: klippy runs inside {unit}.service, "
        "and stopping it kills every process started from it.",
    ]
    if tried:
        lines.append("Tried: " + "; ".join(tried) + ".")
    lines += [
        "Fix one of:",
        "  - run scripts/install.sh (installs kflash-run.service and "
        "lists it in moonraker.asvc), then restart Moonraker;",
        "  - allow `sudo -n systemd-run` for this user;",
        "  - or run `kflash flash-all` from a shell.",
        "Nothing was stopped.",
    ]
    return LaunchRefused("\n".join(lines))


def choose(method="auto", env=None):
    """The launch methods to try, in order, for ``method`` here.

    Raises ``ValueError`` for an unknown method. ``auto`` returns
    ``["session"]`` outside a systemd service, else
    ``["systemd-run", "moonraker"]``.
    """
    if method not in METHODS:
        choices = ", ".join(METHODS)
        raise ValueError(f"unknown launcher {method!r} (choose from "
                         f"{choices})")
    if method != "auto":
        return [method]
    ctx = detect(env)
    if ctx.in_service:
        return ["systemd-run", "moonraker"]
    return ["session"]


def _open_log(log_path):
    if log_path is None:
        return subprocess.DEVNULL
    os.makedirs(os.path.dirname(str(log_path)) or ".", exist_ok=True)
    return open(log_path, "ab")


def _launch_session(argv, env, cwd, log_path):
    log = _open_log(log_path)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, close_fds=True,
            start_new_session=True, env=env, cwd=cwd)
    finally:
        if log is not subprocess.DEVNULL:
            log.close()
    return Launched("session", proc.pid, proc)


_PASS_ENV = ("PATH", "HOME", "USER", "LANG", "PYTHONPATH", "VIRTUAL_ENV")


def _launch_systemd_run(argv, env, cwd, timeout):
    exe = shutil.which("systemd-run", path=env.get("PATH"))
    sudo = shutil.which("sudo", path=env.get("PATH"))
    if not exe or not sudo:
        return None, "systemd-run or sudo not found"
    # KillMode=process: when the helper dies, the engine's watchdog (a
    # process of the same unit) must live on to start klipper again.
    cmd = [sudo, "-n", exe, "--unit=" + HELPER_UNIT, "--collect", "--quiet",
           "--property=KillMode=process",
           f"--uid={os.getuid()}", f"--gid={os.getgid()}"]
    if cwd:
        cmd.append("--working-directory=" + str(cwd))
    for k in sorted(env):
        if k in _PASS_ENV or k.startswith("KFLASH_"):
            cmd.append(f"--setenv={k}={env[k]}")
    cmd.append("--")
    cmd += list(argv)
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           close_fds=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"sudo -n systemd-run: {e}"
    if r.returncode != 0:
        out = r.stdout.decode("utf-8", "replace").strip().splitlines()
        tail = out[-1] if out else f"exit status {r.returncode}"
        return None, f"sudo -n systemd-run: {tail}"
    return Launched("systemd-run", detail=f"unit {HELPER_UNIT}"), None


def _http_json(url, data=None, timeout=5.0):
    body = None
    headers = {}
    if data is not None:
        body = json.dumps(data).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=body, headers=headers,
                                 method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


def _launch_moonraker(home, only_outdated, device, run_id, url, timeout):
    if not url:
        return None, "no moonraker_url"
    base = url.rstrip("/")
    try:
        info = _http_json(base + "/machine/system_info", timeout=timeout)
        services = info["result"]["system_info"].get(
            "available_services", [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"Moonraker at {base}: {e}"
    if INSTALLED_UNIT not in services:
        return None, (f"Moonraker does not list {INSTALLED_UNIT} in "
                      "available_services (add it to moonraker.asvc)")
    write_request(home, only_outdated, device, run_id)
    try:
        _http_json(base + "/machine/services/start",
                   {"service": INSTALLED_UNIT}, timeout=timeout)
    except (OSError, ValueError) as e:
        return None, f"Moonraker could not start {INSTALLED_UNIT}: {e}"
    return Launched("moonraker", detail=f"unit {INSTALLED_UNIT}"), None


def launch(python, home, only_outdated=False, device=None, method="auto",
           moonraker_url=None, env=None, log_path=None, timeout=10.0,
           run_id=None):
    """Start the helper for one run; return ``Launched``.

    Raises ``LaunchRefused`` (with instructions) when the helper could not be
    started somewhere it survives ``stop klipper``, ``ValueError`` for an
    unknown method.
    """
    env = dict(os.environ if env is None else env)
    env["KFLASH_HOME"] = str(home)
    os.makedirs(str(home), exist_ok=True)
    argv = helper_argv(python, home, only_outdated, device, run_id)
    tried = []
    methods = choose(method, env)
    for m in methods:
        if m == "session":
            return _launch_session(argv, env, str(home), log_path)
        if m == "systemd-run":
            got, why = _launch_systemd_run(argv, env, str(home), timeout)
        else:
            got, why = _launch_moonraker(home, only_outdated, device,
                                         run_id, moonraker_url, timeout)
        if got is not None:
            return got
        tried.append(why)
    ctx = detect(env)
    if not ctx.in_service:
        raise LaunchRefused("kflash could not start its helper ({}): {}. "
                            "Nothing was stopped.".format(method,
                                                      "; ".join(tried)))
    raise _refusal(ctx, tried)


if __name__ == "__main__":  # pragma: no cover - manual diagnosis
    print(detect(), choose())
    sys.exit(0)
