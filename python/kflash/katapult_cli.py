"""``kflash katapult flash|status``: the native Katapult flasher on its own.

A drop-in for flashtool.py's serial use: ``-d DEV``, ``-f FILE``, ``-b BAUD`` (UART
boards only). Human progress by default; ``--json`` prints one JSON document on
stdout and sends progress to stderr. The last human line on success matches
flashtool.py's (``Programming Complete`` / ``Status Request Complete``), so scripts
that grep for it keep working.

Plugs into the ``kflash`` CLI with two lines::

    katapult_cli.add_parser(sub)                  # next to the other sub.add_parser
    COMMANDS["katapult"] = katapult_cli.command   # (engine, args) -> exit code
"""

import json
import os
import sys

DEFAULT_FIRMWARE = "~/klipper/out/klipper.bin"


def add_parser(subparsers):
    """Add ``katapult`` (with ``flash`` and ``status``) to ``subparsers``."""
    parser = subparsers.add_parser(
        "katapult",
        help="flash or query a board's Katapult bootloader natively",
        description="Talk to a board's Katapult bootloader over its serial port.",
    )
    sub = parser.add_subparsers(dest="katapult_command", metavar="{flash,status}")
    sub.required = True
    flash = sub.add_parser(
        "flash",
        help="flash a klipper.bin through Katapult and verify it",
        description="Enter the bootloader if needed (USB: 1200-baud touch; UART: "
        "request string), refuse an image for another MCU, write, read back "
        "every block, and start the new firmware.",
    )
    status = sub.add_parser(
        "status",
        help="connect to Katapult, print what it reports, flash nothing",
    )
    for p in (flash, status):
        p.add_argument(
            "-d", "--device", required=True, help="serial device (by-id path)"
        )
        p.add_argument(
            "-b",
            "--baud",
            type=int,
            default=None,
            help="UART baud rate (only for boards on a UART, e.g. 250000)",
        )
        p.add_argument(
            "--json", action="store_true", help="print one JSON document on stdout"
        )
    flash.add_argument(
        "-f",
        "--firmware",
        default=DEFAULT_FIRMWARE,
        help=f"firmware image (default {DEFAULT_FIRMWARE})",
    )
    parser.set_defaults(func=run)
    return parser


class _Progress:
    """Renders progress events: a bar on a terminal, a line per 10% otherwise."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream.isatty()
        self.last_decile = -1
        self.bar_open = False

    def __call__(self, event):
        fraction = event.get("fraction")
        message = event.get("message", "")
        if fraction is None:
            self._end_bar()
            prefix = "warning: " if event.get("level") == "warning" else ""
            print(prefix + message, file=self.stream, flush=True)
            return
        if self.tty:
            filled = int(fraction * 30)
            bar = "#" * filled + " " * (30 - filled)
            self.stream.write(f"\r[{bar}] {fraction * 100:5.1f}% {message}\x1b[K")
            self.stream.flush()
            self.bar_open = True
        else:
            decile = int(fraction * 10)
            if decile != self.last_decile:
                self.last_decile = decile
                print(f"{fraction * 100:5.1f}% {message}", file=self.stream, flush=True)

    def _end_bar(self):
        if self.bar_open:
            self.stream.write("\n")
            self.bar_open = False

    def close(self):
        self._end_bar()


def _human_flash(result):
    return [
        f"Flashed {result['bytes']} bytes ({result['blocks']} blocks of "
        f"{result['block_size']}) to {result['device']} in "
        f"{result['duration_s']:.2f} s ({result['rate_bps'] / 1024:.1f} KiB/s)",
        f"MCU: {result['mcu']}, firmware version: {result['firmware_version'] or '?'}",
        "Programming Complete",
    ]


def _human_status(result):
    return [
        f"Katapult on {result['device']}",
        f"Software Version: {result['bootloader_version'] or '?'}",
        f"Protocol Version: {result['proto_version']}",
        f"Block Size: {result['block_size']} bytes",
        f"Application Start: 0x{result['app_start']:08X}",
        f"MCU type: {result['mcu']}",
        "Status Request Complete",
    ]


def run(args):
    """Run ``kflash katapult flash|status``; returns the exit code (0, 1 or 2)."""
    import kflash

    out = sys.stdout
    progress = _Progress(sys.stderr if args.json else sys.stdout)
    try:
        if args.katapult_command == "flash":
            firmware = os.path.expanduser(args.firmware)
            if not os.path.isfile(firmware):
                print(f"error: firmware {firmware} does not exist", file=sys.stderr)
                return 2
            result = kflash.katapult_flash(
                args.device, firmware, baud=args.baud, on_event=progress
            )
            lines = _human_flash(result)
        else:
            result = kflash.katapult_status(
                args.device, baud=args.baud, on_event=progress
            )
            lines = _human_status(result)
    except kflash.KflashError as err:
        progress.close()
        if args.json:
            json.dump({"ok": False, "error": str(err)}, out)
            out.write("\n")
        else:
            print(f"error: {err}", file=sys.stderr)
        return 1
    progress.close()
    if args.json:
        json.dump({"ok": True, **result}, out)
        out.write("\n")
    else:
        for line in lines:
            print(line, file=out)
    return 0


def command(engine, args):
    """``run`` with the signature of the ``kflash`` CLI's COMMANDS table."""
    del engine
    return run(args)
