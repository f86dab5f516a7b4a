"""Start the klipper service again if the kflash runner dies while it is stopped.

The runner (``kflash._core``'s ``Watchdog.arm``) starts this in a new session with
stdin a pipe from the runner and stdout/stderr appended to ``watchdog.log`` in the
state dir. It sends one JSON line::

    {"version": 1, "runner_pid": 123, "service": {"backend": "command",
     "unit": "klipper", "moonraker_url": "http://127.0.0.1:7125",
     "stop_command": "...", "start_command": "..."}}

then ``done`` once the service is running again. If stdin reaches EOF without
``done`` (the runner was SIGKILLed, OOM-killed, ...), the service is started
through the same backend, with a few retries, and every step is logged.

Pure standard library on purpose: it must work even when the native module
cannot be loaded. Run it as ``python -m kflash.watchdog`` or by file path.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

ATTEMPTS = 3
RETRY_PAUSE = 2.0
COMMAND_TIMEOUT = 120.0
HTTP_TIMEOUT = 10.0
STATE_TIMEOUT = 60.0


def log(message):
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    sys.stdout.write(f"{stamp} kflash watchdog {os.getpid()}: {message}\n")
    sys.stdout.flush()


def describe(service):
    backend = service.get("backend", "moonraker")
    if backend == "command":
        return "klipper via `{}`".format(service.get("start_command"))
    if backend == "systemd":
        return "{} via sudo -n systemctl".format(service.get("unit", "klipper"))
    return "{} via Moonraker at {}".format(
        service.get("unit") or "klipper",
        service.get("moonraker_url"),
    )


def _http(url, body=None):
    data = None
    headers = {"Accept": "application/json"}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
        return json.loads(resp.read().decode("utf-8", "replace"))["result"]


def _moonraker_unit(base, unit):
    if unit:
        return unit
    info = _http(base + "/machine/system_info")["system_info"]
    return (info.get("instance_ids") or {}).get("klipper") or "klipper"


def start_moonraker(service):
    base = (service.get("moonraker_url") or "http://127.0.0.1:7125").rstrip("/")
    unit = _moonraker_unit(base, (service.get("unit") or "").strip())
    _http(base + "/machine/services/start", {"service": unit})
    deadline = time.monotonic() + STATE_TIMEOUT
    state = None
    while time.monotonic() < deadline:
        info = _http(base + "/machine/system_info")["system_info"]
        state = (info.get("service_state") or {}).get(unit) or {}
        if state.get("active_state") == "active":
            return
        time.sleep(0.5)
    raise RuntimeError(f"{unit} is not active after start (state {state!r})")


def _run(argv):
    log("running {}".format(" ".join(shlex.quote(a) for a in argv)))
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    output = proc.stdout.decode("utf-8", "replace").strip()
    if output:
        log(f"output: {output}")
    if proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}")


def start_systemd(service):
    unit = (service.get("unit") or "klipper").strip()
    # The same binary the runner used (first on PATH): sudoers rules name exact paths.
    argv = [shutil.which("systemctl") or "systemctl", "start", unit]
    if os.geteuid() != 0:
        argv = ["sudo", "-n"] + argv
    _run(argv)


def start_command(service):
    command = service.get("start_command") or ""
    argv = shlex.split(command)
    if not argv:
        raise RuntimeError("no start_command configured")
    _run(argv)


STARTERS = {
    "moonraker": start_moonraker,
    "systemd": start_systemd,
    "command": start_command,
}


def start_service(service):
    """Start the service, retrying; return True when it started."""
    starter = STARTERS.get(service.get("backend", "moonraker"))
    if starter is None:
        log(
            "unknown backend {!r}: cannot start the service".format(
                service.get("backend")
            )
        )
        return False
    for attempt in range(1, ATTEMPTS + 1):
        try:
            starter(service)
        except (
            OSError,
            ValueError,
            KeyError,
            RuntimeError,
            urllib.error.URLError,
            subprocess.SubprocessError,
        ) as err:
            log(
                f"starting {describe(service)} failed "
                f"(attempt {attempt}/{ATTEMPTS}): {err}"
            )
            if attempt < ATTEMPTS:
                time.sleep(RETRY_PAUSE)
            continue
        log(f"{describe(service)} started again")
        return True
    log(f"!!! {describe(service)} IS STILL STOPPED: start it by hand")
    return False


def main(stdin=None):
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    stdin = stdin if stdin is not None else sys.stdin.buffer
    first = stdin.readline()
    if not first.strip():
        log("no settings received; nothing to guard")
        return 2
    try:
        message = json.loads(first.decode("utf-8"))
        service = message["service"]
    except (ValueError, KeyError, TypeError) as err:
        log(f"unreadable settings line {first[:200]!r}: {err}")
        return 2
    log(
        "armed for {} (runner pid {})".format(
            describe(service), message.get("runner_pid")
        )
    )
    while True:
        line = stdin.readline()
        if not line:
            break
        if line.strip() == b"done":
            log("disarmed: the runner finished; standing down")
            return 0
    log(f"the runner went away without finishing: starting {describe(service)}")
    return 0 if start_service(service) else 1


if __name__ == "__main__":
    sys.exit(main())
