"""The watchdog (`python -m kflash.watchdog`, the core's `Runs.watch`) guarding
real runs of `kflash flash-all` on the CLI sandbox (command-backed service
control): it starts klipper again when the run ends with klipper stopped, and
only then, and says what it did in watchdog.log."""

import re
import subprocess
import sys

from kflash import Runs


def two_boards(sandbox):
    sandbox.add_board("octopus")
    sandbox.add_board("ebb", mcu="rp2040")
    return sandbox.start_moonraker()


def log_of(sandbox):
    path = sandbox.home / "watchdog.log"
    return path.read_text() if path.exists() else ""


def test_a_killed_run_gets_klipper_started_and_is_marked_interrupted(sandbox):
    two_boards(sandbox)
    sandbox.set_behaviour("octopus", "hang")
    proc = sandbox.spawn("flash-all", "--json")
    sandbox.wait_for(lambda: (sandbox.root / "hanging").exists(), timeout=60,
                     what="the flash to block")
    run = Runs(sandbox.home).latest()
    assert run["state"] == "running" and run["watchdog"] == "armed"
    armed = re.findall(r"kflash watchdog (\d+): armed for klipper \(via .*\) "
                       rf"\(run {run['run_id']}, runner pid {proc.pid}\)",
                       log_of(sandbox))
    assert len(armed) == 1, log_of(sandbox)
    proc.kill()
    proc.communicate()
    sandbox.wait_for(lambda: sandbox.service_events() == ["stop", "start"],
                     timeout=10, what="the watchdog to start klipper")
    sandbox.wait_for(lambda: "started again" in log_of(sandbox), timeout=10,
                     what="the watchdog's log")
    dog = armed[0]
    log = log_of(sandbox)
    assert (f"kflash watchdog {dog}: the runner went away without finishing: "
            "starting klipper") in log
    assert f"kflash watchdog {dog}: klipper (via " in log
    run = Runs(sandbox.home).get(run["run_id"])
    assert run["state"] == "interrupted"
    assert "during flash of octopus" in run["interrupted"]
    last = sandbox.json("status")["last_run"]
    assert last["state"] == "interrupted" and last["run_id"] == run["run_id"]


def test_a_run_that_could_not_restart_klipper_leaves_it_to_the_watchdog(
        sandbox):
    """The run's own three attempts fail (exit 4); the watchdog's next one
    works."""
    two_boards(sandbox)
    count = sandbox.root / "starts"
    svc = sandbox.root / "svc.sh"
    sandbox.settings(start_command=(
        f"sh -c 'n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); "
        f"echo $n > {count}; [ $n -gt 3 ] && exec {svc} start; exit 1'"))
    r = sandbox.run("flash-all", timeout=180)
    assert r.returncode == 4, r.stderr
    assert "KLIPPER IS NOT RUNNING" in r.stderr
    sandbox.wait_for(lambda: sandbox.service_events() == ["stop", "start"],
                     timeout=30, what="the watchdog to start klipper")
    sandbox.wait_for(lambda: "started again" in log_of(sandbox), timeout=10,
                     what="the watchdog's log")
    assert count.read_text().strip() == "4"
    assert "the run ended with klipper still stopped" in log_of(sandbox)


def test_a_run_killed_before_the_stop_starts_nothing(sandbox):
    two_boards(sandbox)
    cfg = sandbox.root / "octopus.config"
    cfg.write_text(cfg.read_text() + "CONFIG_FIXTURE_SLEEP=60\n")
    proc = sandbox.spawn("flash-all")
    sandbox.wait_for(lambda: "armed for" in log_of(sandbox), timeout=60,
                     what="the watchdog")
    proc.kill()
    proc.communicate()
    sandbox.wait_for(lambda: "nothing to start" in log_of(sandbox),
                     timeout=10, what="the watchdog to stand down")
    assert sandbox.service_events() == []
    assert Runs(sandbox.home).latest()["state"] == "interrupted"


def test_a_finished_run_stands_its_watchdog_down(sandbox):
    two_boards(sandbox)
    report = sandbox.json("flash-all")
    assert report["ok"] is True
    sandbox.wait_for(lambda: "standing down" in log_of(sandbox), timeout=10,
                     what="the watchdog to stand down")
    assert sandbox.service_events() == ["stop", "start"]
    assert "disarmed" in log_of(sandbox)


def test_nothing_to_guard(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kflash.watchdog", "--home",
                        str(tmp_path), "--run-id", "NOPE"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "no run record NOPE" in (tmp_path / "watchdog.log").read_text()
