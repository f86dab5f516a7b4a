"""Interrupted runs, wrong images and the way back, on the bench: real klippy and
Moonraker under supervisord, virtual boards with Katapult.

The matrix: `kflash flash-all --yes` gets SIGINT, SIGTERM, SIGHUP or SIGKILL in four
phases (building, just after klipper stopped, while the mainboard is being written,
while verify waits for klippy). Whatever happens, the printer must be usable within
10 s after the signal, or after the bounded finish of the board being written: klippy
ready, and every MCU reporting through Moonraker the version of the image that is on it,
one kflash built (the run's target or what it ran before). One printer serves every
cell; a cell that leaves it unusable is repaired by the next `kflash flash-all` (which
recovers a board left in Katapult first) so the other cells still run.

The SIGKILL cells rely on the watchdog: it writes the recorded image onto a board it
finds in Katapult before it starts klipper (`commands::Context::watch`). When the
watchdog is gone too (a power cut), the next run finishes the board first.
"""

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from kflash import Runs
from sandbox import terminal_signals
from virtual_printer import tree, wait_for
from virtual_printer.demo import flash_all, kflash_command, kflash_json, registered

pytestmark = pytest.mark.usefixtures("bench_tools")

#: Seconds the printer may take to be usable after the signal (or the bounded finish).
USABLE_WITHIN = 10.0
#: How long the mainboard's build sleeps (CONFIG_FIXTURE_SLEEP): the build phase.
BUILD_SLEEP = 2
#: Seconds per written block on the mainboard in the mid-flash cells (~4 s in all).
SLOW_ERASE = 0.005

TIMINGS = {}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    with registered(
        str(tmp_path_factory.mktemp("interrupts")),
        build_cache=str(tmp_path_factory.getbasetemp() / "sim-build-cache"),
    ) as (p, env):
        with open(os.path.join(env["KFLASH_HOME"], "configs", "mcu.config"), "a") as f:
            f.write(f"CONFIG_FIXTURE_SLEEP={BUILD_SLEEP}\n")
        started = time.monotonic()
        yield p, env
        TIMINGS["module_s"] = round(time.monotonic() - started, 1)
        with open(os.path.join(p.dir, "timings.json"), "w") as f:
            json.dump(TIMINGS, f, indent=1)
        print("\ninterrupt matrix timings:", json.dumps(TIMINGS, indent=1))


class Run:
    """`kflash flash-all --yes --json` running; its stderr read as it comes."""

    def __init__(self, env, *args):
        self.lines = []
        self.seen = threading.Condition()
        self.proc = subprocess.Popen(
            [*kflash_command(), "flash-all", "--yes", "--json", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Ctrl+C and SIGHUP as in a terminal, whatever pytest inherited.
            preexec_fn=terminal_signals,
        )
        self.out = []
        self.readers = [
            threading.Thread(target=self._read_err, daemon=True),
            threading.Thread(
                target=lambda: self.out.append(self.proc.stdout.read()), daemon=True
            ),
        ]
        for t in self.readers:
            t.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """Kill a runner still there, read its output to the end, close the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for t in self.readers:
            t.join(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def _read_err(self):
        for line in self.proc.stderr:
            with self.seen:
                self.lines.append(line)
                self.seen.notify_all()

    def wait_line(self, pred, timeout=180, what="a line"):
        deadline = time.monotonic() + timeout
        with self.seen:
            while not any(pred(line) for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"no {what} in the run's output:\n{''.join(self.lines)}"
                    )
                self.seen.wait(min(left, 0.5))

    def report(self):
        try:
            return json.loads(self.out[0]) if self.out and self.out[0] else None
        except ValueError:
            return None


def line_of(stage, device=None, *words):
    tag = f"[{stage} {device}]" if device else f"[{stage}]"
    return lambda line: tag in line and all(w in line for w in words)


PHASES = {
    "build": line_of("build", None, "building"),
    "after_stop": line_of("stop", None, "stopping klipper"),
    "mid_flash": line_of("flash", "mcu", "write", "blocks"),
    "verify": line_of("verify", None, "waiting for klippy"),
}
SIGNALS = {
    "INT": signal.SIGINT,
    "TERM": signal.SIGTERM,
    "HUP": signal.SIGHUP,
    "KILL": signal.SIGKILL,
}


def no_orphan_builds(p):
    """A runner killed mid-build leaves its `make` running: wait until it is done."""

    def none_left():
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"make" in cmd.split(b"\0")[0] and p.dir.encode() in cmd:
                return False
        return True

    wait_for(none_left, 60, "orphaned builds to end")


def ready_within(p, seconds):
    """When the printer became usable (monotonic), or None within ``seconds``."""
    try:
        wait_for(p.is_ready, seconds, "klippy ready", 0.2)
    except TimeoutError:
        return None
    return time.monotonic()


def repair(p, env):
    """What a user does next: run flash-all again (it recovers boards left behind)."""
    _, _, res = flash_all(env)
    p.wait_ready(60)
    return res


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("name", list(SIGNALS))
def test_an_interrupted_run_leaves_the_printer_usable(bench, name, phase):
    p, env = bench
    cell_started = time.monotonic()
    p.wait_ready(60)
    before = {b.name: p.installed_version(b) for b in p.boards}
    spawns = p.klipper_spawns()
    tree.git(p.tree, "commit", "-q", "--allow-empty", "-m", f"{name} {phase}")
    target = tree.describe(p.tree)
    if phase == "mid_flash":
        p.set_faults("mainboard", erase_delay=SLOW_ERASE)
    with Run(env) as run:
        run_cell(p, run, name, phase)
        ended, signalled, ready_at = run.ended, run.signalled, run.ready_at
    cell = {
        "exit": run.proc.returncode,
        "finish_s": round(ended - signalled, 1),
        "usable_after_s": None if ready_at is None else round(ready_at - ended, 1),
    }
    TIMINGS[f"{name}-{phase}"] = cell
    try:
        assert ready_at is not None and ready_at - ended <= USABLE_WITHIN, (
            f"not usable within {USABLE_WITHIN} s: {cell}\n{''.join(run.lines)[-3000:]}"
        )
        versions = p.versions()
        for b in p.boards:
            on_it = p.installed_version(b)
            assert versions[b.section] == on_it, (b.name, versions, on_it)
            assert on_it in (before[b.name], target), (b.name, on_it, before, target)
        if phase == "build":
            assert p.klipper_spawns() == spawns, "klipper was stopped during the build"
        if name != "KILL":
            doc = run.report()
            assert doc is not None and doc["cancelled"] is True, run.out
            assert run.proc.returncode == 1, run.proc.returncode
            if phase != "build":
                assert doc["service"]["stopped"] and doc["service"]["restarted"], doc
    finally:
        if not p.is_ready():
            res = repair(p, env)
            cell["repaired_by_next_run"] = json.loads(res.stdout).get("recovered")
        # A killed run's watchdog holds the run lock until klipper's start returns.
        runs = Runs(env["KFLASH_HOME"])
        wait_for(lambda: runs.busy() is None, 30, "the run's watchdog to end")
        cell["cell_s"] = round(time.monotonic() - cell_started, 1)


def run_cell(p, run, name, phase):
    """Signal the run in its phase; note when, when it ended, when the printer was
    usable again (`run.signalled`, `run.ended`, `run.ready_at`)."""
    try:
        run.wait_line(PHASES[phase], what=f"{phase} phase")
        if phase == "after_stop":
            wait_for(
                lambda: p.program_state("klipper") == "STOPPED", 30, "klipper stopped"
            )
        run.signalled = time.monotonic()
        run.proc.send_signal(SIGNALS[name])
        run.proc.wait(timeout=300)
        run.ended = time.monotonic()
        p.clear_faults()
        if name == "KILL" and phase == "build":
            no_orphan_builds(p)
        # Measured from the end of the bounded finish (the runner exits right after
        # it started klipper again); SIGKILL ends the runner at the signal.
        run.ready_at = ready_within(p, USABLE_WITHIN + 5)
    finally:
        p.clear_faults()


def watchdogs(home):
    """The pids of the watchdogs guarding runs of the kflash state dir ``home``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"kflash.watchdog" in argv and home.encode() in b" ".join(argv):
            found.append(int(pid))
    return found


def test_after_a_power_cut_mid_flash_the_next_run_finishes_the_board_first(bench):
    p, env = bench
    p.wait_ready(60)
    tree.git(p.tree, "commit", "-q", "--allow-empty", "-m", "power cut mid-flash")
    target = tree.describe(p.tree)
    p.set_faults("mainboard", erase_delay=SLOW_ERASE)
    try:
        with Run(env) as run:
            run.wait_line(PHASES["mid_flash"], what="the mainboard's write")
            # Runner and watchdog die at once, as in a power cut: nobody finishes it.
            dogs = watchdogs(env["KFLASH_HOME"])
            assert dogs, "the run has no watchdog"
            for pid in dogs:
                os.kill(pid, signal.SIGKILL)
            run.proc.kill()
    finally:
        p.clear_faults()
    # The write was cut short: the mainboard sits in Katapult under another by-id name.
    main = p.board("mainboard")
    wait_for(
        lambda: os.path.exists(p.by_id(main, katapult=True)), 10, "Katapult's by-id"
    )
    rc, plan, res = kflash_json(env, "plan")
    assert rc == 0, res.stderr
    mcu = plan["devices"][0]
    assert "mcu is in its bootloader" in mcu["reason"], mcu
    res = repair(p, env)
    report = json.loads(res.stdout)
    assert report["recovered"][0]["key"] == "mcu", report["recovered"]
    assert report["recovered"][0]["outcome"] == "flashed"
    assert report["ok"], res.stderr[-3000:]
    assert set(p.wait_ready(30).values()) == {target}
    assert not os.path.exists(os.path.join(env["KFLASH_HOME"], "pending.json"))


def edit_config(env, key, old, new):
    path = os.path.join(env["KFLASH_HOME"], "configs", f"{key}.config")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    return path, text


def test_a_config_for_another_chip_stops_nothing(bench):
    p, env = bench
    p.wait_ready(60)
    path, saved = edit_config(
        env, "mcu", 'CONFIG_MCU="stm32f446xx"', 'CONFIG_MCU="stm32f407xx"'
    )
    spawns = p.klipper_spawns()
    try:
        rc, doc, res = flash_all(env)
    finally:
        with open(path, "w") as f:
            f.write(saved)
    assert rc == 2, res.stderr
    assert "stm32f407xx" in doc["error"] and "stm32f446xx" in doc["error"], doc
    assert "kflash config mcu" in doc["error"]
    assert p.klipper_spawns() == spawns
    assert p.program_state("klipper") == "RUNNING"


def test_a_config_for_another_bootloader_offset_writes_nothing(bench):
    p, env = bench
    p.wait_ready(60)
    main = p.board("mainboard")
    on_board = p.installed_version(main)
    tree.git(p.tree, "commit", "-q", "--allow-empty", "-m", "offset")
    target = tree.describe(p.tree)
    # The board's Katapult starts the application at 0x8008000 (a 32 KiB bootloader).
    path, saved = edit_config(
        env,
        "mcu",
        "CONFIG_FLASH_APPLICATION_ADDRESS=0x8008000",
        "CONFIG_FLASH_APPLICATION_ADDRESS=0x8002000",
    )
    try:
        rc, report, res = flash_all(env)
    finally:
        with open(path, "w") as f:
            f.write(saved)
    assert rc == 1, res.stderr
    mcu = next(d for d in report["devices"] if d["key"] == "mcu")
    assert mcu["flash"] == "fail"
    assert "nothing was written" in mcu["error"], mcu
    assert '"32KiB bootloader"' in mcu["hint"] and "kflash config mcu" in mcu["hint"]
    assert p.installed_version(main) == on_board, "the old image is intact"
    assert report["service"]["restarted"]
    versions = p.wait_ready(30)
    assert versions["mcu"] == on_board
    assert versions["mcu toolhead"] == target and versions["mcu host"] == target


def test_rollback_puts_back_what_was_verified_on_the_board(bench):
    p, env = bench
    p.wait_ready(60)
    rc, first, res = flash_all(env)
    assert rc == 0, res.stderr[-3000:]
    good = first["target_version"]
    # A newer build whose flash goes wrong: the mainboard never comes back by itself.
    tree.git(p.tree, "commit", "-q", "--allow-empty", "-m", "newer, then regretted")
    p.set_faults("mainboard", after_complete="never")
    try:
        rc, second, res = flash_all(dict(env, KFLASH_READY_TIMEOUT_S="10"))
    finally:
        p.clear_faults()
    assert rc == 1 and second["devices"][0]["flash"] == "fail", second
    # Replugged, it runs the new image, which was never verified on it.
    p.power_cycle("mainboard")
    p.wait_app(p.board("mainboard"), 10)
    p.stop_klipper()
    assert p.start_klipper()["mcu"] == second["target_version"] != good
    rc, report, res = kflash_json(env, "rollback", "mcu", "--yes")
    assert rc == 0, res.stderr[-3000:]
    assert [d["key"] for d in report["devices"]] == ["mcu"]
    assert report["devices"][0]["version_after"] == good
    versions = p.wait_ready(30)
    assert versions["mcu"] == good
    assert versions["mcu toolhead"] == second["target_version"]
