"""``kflash status --watch``: follow klippy's status without asking klippy.

Reads the shared-memory mirror that ``[status_snapshot]`` writes when it has a
``shm_path`` (see the README). Reading it never touches klippy's reactor, so a
watcher can poll as often as it likes, even during homing.

Plug into the CLI with::

    from kflash import status_watch
    status_watch.add_parser(subparsers)   # dispatch: args.func(args)
"""

import json
import os
import sys
import time

from kflash import snapshot
from kflash._core import KflashError

DEFAULT_SHM = "/dev/shm/kflash_status"
ENV_SHM = "KFLASH_STATUS_SHM"
# A mirror not updated for this long means klippy stopped publishing.
STALE_AFTER = 5.0
# Fields shown for an object in the human line, when present.
SHOWN_FIELDS = ("homed_axes", "position", "state", "temperature", "target")


def add_arguments(parser):
    """Adds the status mirror options to an existing ``status`` parser."""
    parser.add_argument(
        "--watch", action="store_true", help="keep printing each new status"
    )
    parser.add_argument(
        "--shm",
        metavar="PATH",
        default=os.environ.get(ENV_SHM, DEFAULT_SHM),
        help=f"the [status_snapshot] shm_path (default: ${ENV_SHM} or {DEFAULT_SHM})",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="how often --watch reads the mirror (default 0.5)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=0,
        metavar="N",
        help="with --watch, stop after N statuses (default: until Ctrl+C)",
    )
    parser.add_argument(
        "--json", action="store_true", help="JSON (one document per line)"
    )


def add_parser(subparsers):
    """Registers ``status`` (with ``--watch``) on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "status",
        help="printer status from klippy's status snapshot mirror",
        description="Show the status [status_snapshot] mirrors to shared memory.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _format_value(value):
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, list):
        return "(" + ", ".join(_format_value(v) for v in value) + ")"
    return str(value)


def format_line(doc):
    """One human line for a mirror document (see kflash.snapshot.read)."""
    if not doc["version"]:
        return "no status published yet"
    age = doc["age"]
    parts = [f"#{doc['version']}", f"age {age:.2f}s"]
    if age > STALE_AFTER:
        parts.append("(stale: klippy is not publishing)")
    for name, status in doc["status"].items():
        if not isinstance(status, dict):
            continue
        shown = [
            f"{key}={_format_value(status[key])}"
            for key in SHOWN_FIELDS
            if key in status
        ]
        if not shown:
            shown = [f"{len(status)} fields"]
        parts.append(f"{name}: " + " ".join(shown))
    return "  ".join(parts)


def _emit(doc, args, out):
    if args.json:
        out.write(json.dumps(doc, sort_keys=True) + "\n")
    else:
        out.write(format_line(doc) + "\n")
    out.flush()


def run(args, out=None, err=None):
    """Prints the mirror once, or every new version with ``--watch``. Returns
    the exit code: 0, or 2 when the mirror cannot be read (not configured)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        reader = snapshot.Reader(args.shm)
    except KflashError as e:
        err.write(
            f"kflash: {e}\nSet shm_path in [status_snapshot] and pass it with "
            f"--shm (or ${ENV_SHM}).\n"
        )
        return 2
    if not args.watch:
        _emit(reader.read(), args, out)
        return 0
    shown = 0
    last_version = None
    try:
        while True:
            doc = reader.read()
            if doc["version"] != last_version:
                last_version = doc["version"]
                _emit(doc, args, out)
                shown += 1
                if args.count and shown >= args.count:
                    return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    except KflashError as e:
        err.write(f"kflash: {e}\n")
        return 2
