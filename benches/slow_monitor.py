# A system-monitor-like printer object for the homing benchmark (not for users)
#
# [slow_monitor]
# cost: 0.004        # seconds one get_status takes (reads /proc, then spins)
#
# Linked into klippy/extras by benches/bench_homing.py (tests/snapshot_printer.py).
"""[slow_monitor]: a status whose get_status costs a few milliseconds, like a
system monitor that reads /proc and summarises it on every call."""

import os
import time


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class SlowMonitor:
    def __init__(self, config):
        self.cost = config.getfloat("cost", 0.004, minval=0.0, maxval=0.1)
        self.calls = 0

    def get_status(self, eventtime):
        end = time.perf_counter() + self.cost
        self.calls += 1
        cpu = _read("/proc/stat").split("\n", 1)[0].split()[1:5]
        meminfo = dict(
            line.split(":", 1)
            for line in _read("/proc/meminfo").splitlines()
            if ":" in line
        )
        status = {
            "calls": self.calls,
            "load": list(os.getloadavg()),
            "cpu_ticks": [int(x) for x in cpu],
            "mem_available": meminfo.get("MemAvailable", "").strip(),
        }
        while time.perf_counter() < end:  # the rest of what a heavy monitor costs
            pass
        return status


def load_config(config):
    return SlowMonitor(config)
