#!/usr/bin/env python3
"""A status display that never sends klippy a request: it reads the shared-memory
mirror [status_snapshot] writes (shm_path), the way a KlipperScreen-like display or
a system monitor could.

    python examples/status_display.py [/dev/shm/kflash_status] [--count N]

Prints one line per new snapshot (the toolhead's position and homed axes, and the
snapshot's age); with --count, stops after N snapshots.
"""

import argparse
import sys
import time

from kflash import KflashError
from kflash.snapshot import Reader


def line(doc):
    toolhead = doc["status"].get("toolhead", {})
    x, y, z = (toolhead.get("position") or [0.0, 0.0, 0.0])[:3]
    homed = toolhead.get("homed_axes") or "-"
    where = f"X{x:.2f} Y{y:.2f} Z{z:.2f}"
    return f"#{doc['version']} {where} homed {homed} age {doc['age']:.2f}s"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="/dev/shm/kflash_status")
    parser.add_argument("--count", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        reader = Reader(args.path)  # open once; every read is a few microseconds
        shown, lines = None, 0
        while not args.count or lines < args.count:
            doc = reader.read()  # never blocks, never asks klippy
            if doc["version"] and doc["version"] != shown:
                shown = doc["version"]
                print(line(doc), flush=True)
                lines += 1
            time.sleep(0.1)
    except KflashError as e:  # no mirror yet, mirror off, unreadable file
        print(f"no status: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
