"""Service downtime of flash-all vs the per-device loop, and CLI start-up time.

Downtime: the virtual printer (STM32 and RP2040 USB boards with Katapult,
the linux MCU, real klippy and real Moonraker under supervisord). Each round makes all
three MCUs outdated (an empty commit in the firmware tree), then either runs
``kflash flash-all --yes`` (one stop window) or ``kflash flash KEY --yes`` for each
device in turn — the stop/flash/start loop other tools use, with the same flashing
code, so only the stop windows differ. Downtime is the time klipper's service was
stopped, as each run's report gives it; the target is flash-all downtime <= the sum of
its flash times + 1 s.

Start-up: ``kflash devices list`` with ten registered devices, against the bare
interpreter start (``python -c pass``) measured in the same run; target <= 150 ms.

Prints a Markdown section for BENCHMARKS.md (``benches/run.py`` collects it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from virtual_printer import tree
from virtual_printer.demo import kflash_command, register
from virtual_printer.stack import Printer


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


def flash_seconds(report: dict) -> float:
    return sum(d.get("flash_s") or 0.0 for d in report["devices"])


def manager_seconds(report: dict) -> float:
    """The service manager's own stop + start latency inside the downtime."""
    return report["service"]["stop_s"] + report["service"]["start_s"]


def check(report: dict, what: str) -> None:
    if not report.get("ok"):
        bad = [
            f"{d['key']}: {d.get('error')}" for d in report["devices"] if d.get("error")
        ]
        raise SystemExit(f"{what} failed: {'; '.join(bad) or report}")


def downtime(rounds: int) -> dict:
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
            # Warm the build cache: both ways then only flash (builds precede the stop).
            run("build")
            all_down, all_flash, all_manager = [], [], []
            loop_down, loop_flash, loop_manager = [], [], []
            for i in range(rounds):
                tree.add_commit(printer.tree, f"bench round {i} a", day=3 + 2 * i)
                run("build")
                report = kflash_json(env, "flash-all", "--yes")
                check(report, "flash-all")
                all_down.append(report["service"]["downtime_s"])
                all_flash.append(flash_seconds(report))
                all_manager.append(manager_seconds(report))

                tree.add_commit(printer.tree, f"bench round {i} b", day=4 + 2 * i)
                run("build")
                down = flashed = manager = 0.0
                for key in keys:
                    report = kflash_json(env, "flash", key, "--yes")
                    check(report, f"flash {key}")
                    down += report["service"]["downtime_s"]
                    flashed += flash_seconds(report)
                    manager += manager_seconds(report)
                loop_down.append(down)
                loop_flash.append(flashed)
                loop_manager.append(manager)
        finally:
            printer.down()
    return {
        "devices": len(keys),
        "flash_all_downtime": statistics.median(all_down),
        "flash_all_flash": statistics.median(all_flash),
        "loop_downtime": statistics.median(loop_down),
        "loop_flash": statistics.median(loop_flash),
        "flash_all_manager": statistics.median(all_manager),
        "loop_manager": statistics.median(loop_manager),
        "rounds": rounds,
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
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    dt = downtime(args.rounds)
    st = startup(args.runs)
    budget = dt["flash_all_flash"] + 1.0
    own = dt["flash_all_downtime"] - dt["flash_all_manager"]
    met = "met" if own <= budget else "MISSED"
    whole = "met" if dt["flash_all_downtime"] <= budget else "missed"
    ratio = dt["loop_downtime"] / dt["flash_all_downtime"]
    st_met = "met" if st["kflash"] <= 0.150 else "MISSED"
    print(f"""## bench_pipeline: service downtime and CLI start-up

Virtual printer: {dt['devices']} MCUs (STM32F446 and RP2040 over USB with
Katapult, linux MCU), real klippy (kalico) and Moonraker under supervisord; all MCUs
outdated before each run; builds cached beforehand, so only the stop windows differ.
Median of {dt['rounds']} rounds. Downtime = from asking klipper to stop until it runs
again; "stop + start" is the service manager's share of it (Moonraker's
supervisord_cli provider: `supervisorctl` with klippy's `startsecs=2`, and Moonraker's
state polling), the same for any tool, paid once per stop window.

| way | downtime (s) | flashing (s) | stop + start (s) | downtime vs flash-all |
|---|---:|---:|---:|---:|
| `kflash flash-all --yes` (one stop window) \
| {dt['flash_all_downtime']:.2f} | {dt['flash_all_flash']:.2f} \
| {dt['flash_all_manager']:.2f} | 1.0x |
| `kflash flash KEY --yes` per device (stop/flash/start loop) \
| {dt['loop_downtime']:.2f} | {dt['loop_flash']:.2f} | {dt['loop_manager']:.2f} \
| {ratio:.1f}x longer |

- Target (downtime <= flashing + 1 s = {budget:.2f} s): **{met}** for kflash's own part
  of the stop window ({own:.2f} s: flashing, re-scan, stagger between boards);
  {whole} counting the service manager's stop and start latency too
  ({dt['flash_all_downtime']:.2f} s).

`kflash devices list` with 10 devices, median of {st['runs']} runs:
{st['kflash'] * 1000:.0f} ms (bare `python -c pass`: {st['python'] * 1000:.0f} ms, \
so kflash adds {(st['kflash'] - st['python']) * 1000:.0f} ms); \
target <= 150 ms: **{st_met}**.

Re-run: `.venv/bin/python benches/bench_pipeline.py [--rounds N --runs N]`""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
