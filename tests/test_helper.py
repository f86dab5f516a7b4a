"""The detached helper: its files, its exit codes, its signal handling."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kflash import helper

HERE = Path(__file__).resolve().parent


def wait_file(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture
def run(tmp_path):
    home = tmp_path / "state"
    marks = tmp_path / "marks"
    marks.mkdir()
    procs = []

    def start(*extra):
        p = subprocess.Popen(
            [sys.executable, str(HERE / "fake_engine_run.py"), str(home),
             str(marks), *extra], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        procs.append(p)
        return p

    yield home, marks, start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stderr.close()


def events(home):
    path = home / "helper" / "progress.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_run_leaves_progress_status_and_report(run):
    home, marks, start = run
    p = start("--device", "EBB36")
    wait_file(marks / "stopped")
    st = json.loads((home / "helper" / "status.json").read_text())
    assert st["state"] == "running" and st["pid"] == p.pid
    assert st["run_id"] == "RUN1"
    (marks / "go").touch()
    assert p.wait(10) == 0
    rep = json.loads((home / "helper" / "report.json").read_text())
    assert rep["ok"] is True and rep["exit_code"] == 0
    assert rep["interrupted"] is False and rep["run_id"] == "RUN1"
    assert rep["result"]["keys"] == ["EBB36"] and rep["result"]["yes"]
    assert rep["options"] == {"only_outdated": False, "device": "EBB36"}
    stages = [e["stage"] for e in events(home)]
    assert stages == ["helper", "build", "stop", "helper"]
    assert all(e["run_id"] == "RUN1" for e in events(home))
    st = json.loads((home / "helper" / "status.json").read_text())
    assert st["state"] == "finished" and st["exit_code"] == 0
    # readers see the same through RunFiles
    files = helper.RunFiles(home)
    evs, cur = files.read_events(None)
    assert len(evs) == 4 and cur == files.end_cursor()
    assert files.read_events(cur) == ([], cur)
    assert files.busy() is None and files.interrupted_run() is None
    # the next run's file is a new one: a reader's cursor starts over
    p = start()
    (marks / "go").touch()
    assert p.wait(10) == 0
    evs2, _ = files.read_events(cur)
    assert [e["stage"] for e in evs2] == ["helper", "build", "stop", "helper"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_unwinds_through_the_engine_restart(run, sig):
    home, marks, start = run
    p = start()
    wait_file(marks / "stopped")
    assert not (marks / "restarted").exists()
    p.send_signal(sig)
    assert p.wait(10) == 1
    assert (marks / "restarted").exists()
    rep = json.loads((home / "helper" / "report.json").read_text())
    assert rep["interrupted"] is True and rep["ok"] is False
    assert sig.name in rep["error"]
    assert "klipper was started again" in rep["hint"]
    assert rep["result"]["service"]["restarted"] is True
    assert events(home)[-1]["level"] == "error"


def test_one_helper_at_a_time(run):
    home, marks, start = run
    first = start()
    wait_file(marks / "stopped")
    files = helper.RunFiles(home)
    assert "helper is running" in files.busy()
    before = (home / "helper" / "progress.jsonl").read_bytes()
    second = start()
    assert second.wait(10) == 3
    assert b"another helper is running" in second.stderr.read()
    assert (home / "helper" / "progress.jsonl").read_bytes() == before
    (marks / "go").touch()
    assert first.wait(10) == 0


def test_killed_helper_is_seen_as_interrupted(run):
    home, marks, start = run
    p = start()
    wait_file(marks / "stopped")
    files = helper.RunFiles(home)
    assert files.interrupted_run() is None
    p.kill()
    p.wait()
    st = files.interrupted_run()
    assert st is not None and st["run_id"] == "RUN1"
    assert files.busy() is None


def test_pending_request_and_missing_engine(tmp_path):
    """The unit path: options come from request.json. Without a working
    engine the run fails with a report (no traceback lost)."""
    home = tmp_path / "state"
    (home / "helper").mkdir(parents=True)
    (home / "helper" / "request.json").write_text(json.dumps(
        {"version": 1, "only_outdated": True, "device": None,
         "run_id": "REQ1"}))
    env = dict(os.environ, KFLASH_HOME=str(tmp_path / "elsewhere"))
    r = subprocess.run([sys.executable, "-m", "kflash.helper", "--home",
                        str(home), "--pending"], env=env,
                       capture_output=True, timeout=60)
    assert not (home / "helper" / "request.json").exists()
    rep = json.loads((home / "helper" / "report.json").read_text())
    assert rep["run_id"] == "REQ1"
    assert rep["options"] == {"only_outdated": True, "device": None}
    assert rep["exit_code"] == r.returncode
    if not rep["ok"]:
        assert rep["error"]
    # no request: a usage error, nothing written
    r = subprocess.run([sys.executable, "-m", "kflash.helper", "--home",
                        str(tmp_path / "empty"), "--pending"],
                       capture_output=True, timeout=60)
    assert r.returncode == 2 and b"no request" in r.stderr
