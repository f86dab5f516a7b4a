"""``kflash status [--watch]`` over the status snapshot mirror."""

import argparse
import io
import json
import threading

import kflash
from kflash import status_watch


def parse(*argv):
    parser = argparse.ArgumentParser(prog="kflash")
    subparsers = parser.add_subparsers(dest="command")
    status_watch.add_parser(subparsers)
    return parser.parse_args(["status", *argv])


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    args = parse(*argv)
    code = args.func(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_status_prints_the_mirrored_toolhead(tmp_path):
    path = tmp_path / "status"
    store = kflash.SnapshotStore(path)
    code, out, _ = run("--shm", str(path))
    assert (code, out) == (0, "no status published yet\n")
    store.publish(
        {"toolhead": {"position": (10.0, 20.5, 3.0, 0.0), "homed_axes": "xyz"}}, 5.0
    )
    code, out, _ = run("--shm", str(path))
    assert code == 0
    assert "#1" in out
    assert "homed_axes=xyz" in out
    assert "position=(10.00, 20.50, 3.00, 0.00)" in out
    code, out, _ = run("--shm", str(path), "--json")
    doc = json.loads(out)
    assert doc["version"] == 1
    assert doc["status"]["toolhead"]["position"] == [10.0, 20.5, 3.0, 0.0]


def test_watch_prints_each_new_version(tmp_path):
    path = tmp_path / "status"
    store = kflash.SnapshotStore(path)
    store.publish({"print_stats": {"state": "standby"}}, 1.0)
    printed = threading.Event()

    class Out(io.StringIO):
        def write(self, text):
            n = super().write(text)
            printed.set()
            return n

    out = Out()
    args = parse("--shm", str(path), "--watch", "--interval", "0.01", "--count", "2")
    worker = threading.Thread(target=lambda: args.func(args, out=out))
    worker.start()
    assert printed.wait(10)
    store.publish({"print_stats": {"state": "printing"}}, 2.0)
    worker.join(10)
    assert not worker.is_alive()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "state=standby" in lines[0] and "state=printing" in lines[1]


def test_a_missing_mirror_says_how_to_set_it_up(tmp_path):
    code, out, err = run("--shm", str(tmp_path / "nothing"))
    assert code == 2 and out == ""
    assert "shm_path" in err and "nothing" in err


def test_the_example_display_reads_the_mirror_without_klippy(tmp_path):
    """examples/status_display.py, the README's consumer: one line per snapshot."""
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).resolve().parent.parent / "examples"
    path = tmp_path / "status"
    store = kflash.SnapshotStore(path)
    store.publish(
        {"toolhead": {"position": (10.0, 20.5, 3.0, 0.0), "homed_axes": "xyz"}}, 5.0
    )
    run = subprocess.run(
        [sys.executable, str(example / "status_display.py"), str(path), "--count", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("#1 X10.00 Y20.50 Z3.00 homed xyz age ")
    missing = subprocess.run(
        [sys.executable, str(example / "status_display.py"), str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "no status" in missing.stderr
