"""The ``kflash`` command line.

Human tables by default; ``--json`` prints exactly one JSON document on stdout
and nothing else there (progress always goes to stderr), on every exit path: the
command's result, a run's report, or, when a command fails before it has one,
an error document (``ok: false``, ``exit_code``, ``error``, ``kind`` and the
error's ``device``, ``step``, ``command``, ``exit_status``, ``output_tail``,
``hint``). The exit code is the core's ``ExitStatus`` (DESIGN.md): 0 all good or
nothing to do; 1 some device failed (klipper restarted); 2 usage or
configuration error (nothing stopped); 3 refused by pre-flight (printing, lock
held, no service control, no Moonraker); 4 klipper could not be restarted.

SIGTERM and SIGHUP are turned into an interrupt like Ctrl+C, so a run that is
stopped from outside unwinds the same way. The first interrupt lets the board
being written finish (bounded by its flash time limit), then klipper is started
again and the run is reported; a second one abandons that board and says so. A
signal ignored when kflash starts (SIGHUP under ``nohup``) stays ignored.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys

from kflash import __version__, katapult_cli, status_watch
from kflash._core import ExitStatus, KflashError
from kflash.render import plan_table, report_table, table

DEFAULT_PRINTER_CFG = "~/printer_data/config/printer.cfg"


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised like Ctrl+C so the engine unwinds and restarts klipper."""


def _on_signal(signum, frame):
    raise Terminated(f"received {signal.Signals(signum).name}")


def install_signal_handlers():
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_IGN:
            continue  # started under nohup (or told to ignore it): keep ignoring
        signal.signal(sig, _on_signal)


# ----------------------------------------------------------------------------
# Output helpers


def err(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def emit_json(doc):
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def error_document(exc, status, **extra):
    """The ``--json`` document of a command that failed without a result."""
    doc = {
        "ok": False,
        "exit_code": int(status),
        "error": str(exc),
        "kind": type(exc).__name__,
    }
    doc.update(getattr(exc, "details", None) or {})
    doc.update(extra)
    return doc


def fail(args, exc):
    """Report a failed command (stderr, and the error document for --json)."""
    status = ExitStatus.of(exc)
    err(f"kflash: {exc}")
    if args.json:
        emit_json(error_document(exc, status))
    return status


class UsageError(Exception):
    """A command line that cannot work (e.g. no Klipper tree for ``config``)."""

    details = None


class Progress:
    """Renders engine events on stderr.

    Not a tty (a log, a pipe): one line per event, but a running percentage only
    every 10 %. A tty: milestones (stop, restart, a board built/flashed/verified,
    warnings, errors) stay on screen; chatter (compiler and flashtool output)
    overwrites one status line.
    """

    MARKS = {"info": " ", "warning": "!", "error": "x"}
    MILESTONES = ("flashed", "verified", "nothing to do")

    def __init__(self, quiet=False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.transient = False
        self.tenths = {}  # (stage, device, first word) -> last 10 % step logged

    def line(self, event):
        stage = event.get("stage", "")
        device = event.get("device")
        where = stage + (f" {device}" if device else "")
        fraction = event.get("fraction")
        pct = f" {int(fraction * 100):3d}%" if fraction is not None else ""
        return f"[{where}]{pct} {event.get('message', '')}"

    def milestone(self, event):
        return (
            event.get("level", "info") != "info"
            or event.get("fraction") == 1.0
            or event.get("stage") in ("preflight", "stop", "restart", "plan")
            or event.get("device") is None
            or event.get("message") in self.MILESTONES
        )

    def __call__(self, event):
        if self.quiet:
            return
        level = event.get("level", "info")
        if not self.tty:
            if self.repeats_a_step(event):
                return
            err(f"{level[0].upper()} {self.line(event)}")
            return
        text = f"{self.MARKS.get(level, ' ')} {self.line(event)}"
        if self.milestone(event):
            sys.stderr.write("\r\033[K" + text + "\n")
            self.transient = False
        else:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            sys.stderr.write("\r\033[K" + text[:width])
            self.transient = True
        sys.stderr.flush()

    def repeats_a_step(self, event):
        """A progress line within the same 10 % as the last one logged."""
        fraction = event.get("fraction")
        if fraction is None or event.get("level", "info") != "info":
            return False
        words = event.get("message", "").split()
        key = (event.get("stage"), event.get("device"), words[0] if words else "")
        step = int(fraction * 10)
        if self.tenths.get(key) == step and fraction < 1.0:
            return True
        self.tenths[key] = step
        return False

    def close(self):
        if self.tty and self.transient:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.transient = False


def start_hint(settings):
    kind = settings.get("service", "moonraker")
    unit = settings.get("klipper_service") or "klipper"
    if kind == "command" and settings.get("start_command"):
        return f"run:  {settings['start_command']}"
    return (
        f"run:  sudo systemctl start {unit}\n"
        "   or in Mainsail/Fluidd: Machine > Services > klipper > Start"
    )


def shout_not_restarted(report, settings):
    svc = report.get("service", {})
    bar = "!" * 72
    err(bar)
    err("!!! KLIPPER IS NOT RUNNING: kflash stopped it and could not start it again.")
    if svc.get("error"):
        err(f"!!! reason: {svc['error']}")
    err("!!! Start it by hand now:")
    for line in start_hint(settings).splitlines():
        err(f"!!!   {line}")
    err(bar)


# ----------------------------------------------------------------------------
# Commands


def cmd_settings(engine, args):
    if args.settings_cmd == "set":
        settings = engine.set_setting(args.key, args.value)
        if args.json:
            emit_json(settings)
        else:
            print(f"{args.key} = {settings[args.key]}")
        return ExitStatus.SUCCESS
    settings = engine.settings()
    if args.json:
        emit_json({"state_dir": engine.state_dir, "settings": settings})
        return ExitStatus.SUCCESS
    print(f"state dir: {engine.state_dir}")
    print(table([[k, v] for k, v in settings.items()], ["SETTING", "VALUE"]))
    return ExitStatus.SUCCESS


def device_rows(devices):
    rows = []
    for d in devices:
        config = "ok" if d.get("config_present") else "missing"
        if d.get("config_present") and d.get("problem"):
            config = "invalid"
        rows.append(
            [
                d["key"],
                d.get("mcu_section"),
                d.get("endpoint"),
                d.get("method"),
                d.get("mcu"),
                d.get("interface"),
                config,
            ]
        )
    return rows


DEVICE_HEADERS = [
    "DEVICE",
    "SECTION",
    "ENDPOINT",
    "METHOD",
    "MCU",
    "INTERFACE",
    "CONFIG",
]


def cmd_devices(engine, args):
    sub = args.devices_cmd or "list"
    if sub == "list":
        devices = engine.devices()
        if args.json:
            emit_json(devices)
        elif not devices:
            print(
                "No devices registered. Add one with `kflash devices add` or import "
                "them from printer.cfg with `kflash devices import`."
            )
        else:
            print(table(device_rows(devices), DEVICE_HEADERS))
            for d in devices:
                if d.get("problem"):
                    print(f"{d['key']}: {d['problem']}")
        return ExitStatus.SUCCESS
    if sub == "add":
        dev = engine.add_device(
            args.key,
            serial=args.serial,
            can_uuid=args.can_uuid,
            interface=args.interface,
            linux=args.linux,
            method=args.method,
            config=os.path.expanduser(args.config) if args.config else None,
            name=args.name,
            mcu_section=args.section,
            baud=args.baud,
        )
        if args.json:
            emit_json(dev)
        else:
            print(f"added {dev['key']} ({dev['endpoint']}, method {dev['method']})")
            if not dev.get("config_present"):
                print(
                    f"next: `kflash config {dev['key']}` to choose its firmware options"
                )
        return ExitStatus.SUCCESS
    if sub == "remove":
        dev = engine.remove_device(args.key)
        if args.json:
            emit_json(dev)
        else:
            print(f"removed {dev['key']} (its config {dev['config']} is kept)")
        return ExitStatus.SUCCESS
    if sub == "import":
        path = os.path.expanduser(args.printer_cfg)
        result = engine.import_printer_cfg(path)
        if args.json:
            emit_json(result)
        else:
            for d in result["added"]:
                print(f"added {d['key']} ([{d['mcu_section']}], {d['endpoint']})")
            for s in result["skipped"]:
                print(f"skipped {s['key']}: {s['reason']}")
            if not result["added"] and not result["skipped"]:
                print(f"no [mcu] sections found in {path}")
        return ExitStatus.SUCCESS
    raise AssertionError(sub)


def usage_error(args, exc, **extra):
    err(f"kflash: {exc}")
    if args.json:
        emit_json(error_document(exc, ExitStatus.USAGE, **extra))
    return ExitStatus.USAGE


def cmd_config(engine, args):
    path = engine.config_path(args.key)
    if args.from_file:
        dev = engine.set_config(args.key, os.path.expanduser(args.from_file))
        return config_saved(args, dev, path)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return usage_error(
            args,
            UsageError(
                "kflash config runs Klipper's menuconfig, which needs a terminal; "
                f"run it in one, or attach a .config you have with "
                f"`kflash config {args.key} --from FILE`"
            ),
            device=args.key,
        )
    klipper_dir = engine.settings()["klipper_dir"]
    if not os.path.isfile(os.path.join(klipper_dir, "Makefile")):
        return usage_error(
            args,
            UsageError(
                f"no Klipper source tree at {klipper_dir}; "
                "set it with `kflash settings set klipper_dir PATH`"
            ),
        )
    command = engine.menuconfig_command(args.key)
    rc = subprocess.call(command, cwd=klipper_dir)
    if rc != 0:
        exc = UsageError(f"`make menuconfig` exited with {rc}")
        err(f"kflash: {exc}")
        if args.json:
            emit_json(
                error_document(
                    exc,
                    ExitStatus.FAILURE,
                    device=args.key,
                    command=" ".join(command),
                    exit_status=rc,
                )
            )
        return ExitStatus.FAILURE
    dev = next(d for d in engine.devices() if d["key"] == args.key)
    return config_saved(args, dev, path)


def config_saved(args, dev, path):
    """The device after its config was saved: what it builds, or its problem."""
    if args.json:
        emit_json(dev)
    elif dev.get("problem"):
        print(f"{args.key}: {dev['problem']}")
    else:
        print(
            f"{args.key}: builds {dev['mcu']} firmware ({dev['interface']});"
            f" saved {path}"
        )
    return ExitStatus.USAGE if dev.get("problem") else ExitStatus.SUCCESS


def cmd_plan(engine, args):
    plan = engine.plan(keys=args.keys or None, only_outdated=args.only_outdated)
    if args.json:
        emit_json(plan)
        return ExitStatus.SUCCESS
    print("\n".join(plan_table(plan)))
    return ExitStatus.SUCCESS


def cmd_build(engine, args):
    from kflash._core import BuildError

    progress = Progress()
    status = ExitStatus.SUCCESS
    try:
        results = engine.build(keys=args.keys or None, on_event=progress)
    except BuildError as exc:
        # Every device's entry comes with the error: show them like a success.
        if exc.report is None:
            raise
        results, status = exc.report, ExitStatus.of(exc)
    finally:
        progress.close()
    if args.json:
        emit_json(results)
    else:
        rows = [[r["key"], r["build"], r.get("version_target")] for r in results]
        print(table(rows, ["DEVICE", "BUILD", "VERSION"]))
        for r in results:
            if r.get("error"):
                print(f"\n{r['key']}: {r['error']}")
    return status


def finish_run(engine, args, report):
    settings = _safe_settings(engine)
    if args.json:
        emit_json(report)
    else:
        print("\n".join(report_table(report)))
    status = ExitStatus.of(report)
    if status == ExitStatus.NOT_RESTARTED:
        shout_not_restarted(report, settings)
    return status


def _safe_settings(engine):
    try:
        return engine.settings()
    except KflashError:  # only for the restart hint
        return {}


def run_guarded(engine, args, call, progress=None):
    try:
        report = call()
    except KeyboardInterrupt as exc:
        if progress is not None:
            progress.close()
        report = getattr(exc, "report", None)
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        status = ExitStatus.of(exc)
        if report is None:
            err(f"kflash: {what}; nothing was stopped")
            if args.json:
                emit_json(error_document(exc, status, error=what, cancelled=True))
            return status
        svc = report.get("service", {})
        if svc.get("stopped"):
            state = "restarted" if svc.get("restarted") else "NOT restarted"
            err(f"kflash: {what}; klipper was {state}")
        else:
            err(f"kflash: {what}; nothing was stopped")
        finish_run(engine, args, report)
        return status
    if progress is not None:
        progress.close()
    return finish_run(engine, args, report)


def cmd_flash(engine, args):
    progress = Progress()
    return run_guarded(
        engine,
        args,
        lambda: engine.flash(args.key, on_event=progress, yes=args.yes),
        progress,
    )


def cmd_flash_all(engine, args):
    progress = Progress()
    return run_guarded(
        engine,
        args,
        lambda: engine.flash_all(
            keys=args.keys or None,
            only_outdated=args.only_outdated,
            yes=args.yes,
            on_event=progress,
        ),
        progress,
    )


def cmd_rollback(engine, args):
    progress = Progress()
    return run_guarded(
        engine,
        args,
        lambda: engine.rollback(
            keys=args.keys or None, yes=args.yes, on_event=progress
        ),
        progress,
    )


def cmd_status(engine, args):
    if args.watch or args.shm:
        # klippy's [status_snapshot] mirror, read without asking klippy.
        if not args.shm:
            args.shm = os.environ.get(status_watch.ENV_SHM, status_watch.DEFAULT_SHM)
        return status_watch.run(args)
    status = engine.status()
    if args.json:
        emit_json(status)
        return ExitStatus.SUCCESS
    if status["moonraker"]:
        print(f"printer: {status.get('print_state')}")
    else:
        print(f"Moonraker unreachable: {status.get('moonraker_error')}")
    rows = [
        [
            d["key"],
            d.get("mcu_section"),
            d.get("version"),
            d.get("target_version"),
            d.get("state"),
        ]
        for d in status["devices"]
    ]
    print(table(rows, ["DEVICE", "SECTION", "MCU VERSION", "TARGET", "STATE"]))
    for d in status["devices"]:
        if d.get("bootloader"):
            print(
                f"{d['key']} is in its bootloader ({d['bootloader']}); "
                "`kflash flash-all` flashes a board in Katapult first"
            )
    last = status.get("last_run")
    if last:
        result = last.get("state")
        if result == "finished":
            result = "ok" if last.get("ok") else "failed"
        elif result == "interrupted":
            result = f"interrupted: {last.get('interrupted')}"
        print(f"last run: {last.get('run_id')}, {last.get('started')} ({result})")
    return ExitStatus.SUCCESS


# ----------------------------------------------------------------------------
# Parser


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kflash",
        description=(
            "Keep every MCU of your Klipper printer on firmware that matches the "
            "host: build every board's firmware (in parallel, cached), stop "
            "klipper once, flash each board, start klipper again, check the "
            "versions."
        ),
        epilog=(
            "Typical start: `kflash devices import` (reads your printer.cfg), "
            "`kflash config KEY` for each board (Klipper's menuconfig), then "
            "`kflash plan` and `kflash flash-all`."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"kflash {__version__}"
    )
    parser.add_argument(
        "--home",
        help="kflash state directory (default: $KFLASH_HOME or ~/printer_data/kflash)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def reporting(p):
        p.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS,
            help="print one JSON document on stdout (progress stays on stderr)",
        )
        return p

    p = reporting(sub.add_parser("settings", help="show or change kflash settings"))
    ssub = p.add_subparsers(dest="settings_cmd", metavar="ACTION")
    ps = reporting(
        ssub.add_parser(
            "set",
            help="change a setting",
            description=(
                "Settings: klipper_dir, katapult_dir, service (moonraker | systemd "
                "| command), klipper_service (unit name), stop_command, "
                "start_command, moonraker_url, linux_mcu_binary, "
                "linux_mcu_service, build_timeout_s, flash_timeout_s, "
                "katapult_flasher, auto_rollback, flash_parallel, prewarm, "
                "klippy_dir, klippy_python."
            ),
        )
    )
    ps.add_argument("key", metavar="KEY")
    ps.add_argument("value", metavar="VALUE")

    p = reporting(sub.add_parser("devices", help="list, add, remove or import MCUs"))
    dsub = p.add_subparsers(dest="devices_cmd", metavar="ACTION")
    reporting(dsub.add_parser("list", help="list registered MCUs"))
    pa = reporting(
        dsub.add_parser(
            "add",
            help="register an MCU",
            description=(
                "Register an MCU by how Klipper reaches it: the serial: path of its "
                "[mcu] section, or its canbus_uuid:, or the linux-process MCU."
            ),
        )
    )
    pa.add_argument("key", metavar="KEY", help="a short name, e.g. octopus or ebb36")
    where = pa.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--serial", metavar="PATH", help="e.g. /dev/serial/by-id/usb-Klipper_..."
    )
    where.add_argument(
        "--can-uuid", metavar="UUID", help="the canbus_uuid from printer.cfg"
    )
    where.add_argument(
        "--linux",
        metavar="PATH",
        help="the linux-process MCU, e.g. /tmp/klipper_host_mcu",
    )
    pa.add_argument("--interface", default="can0", help="CAN interface (default can0)")
    pa.add_argument(
        "--method",
        default="auto",
        choices=["auto", "katapult", "make", "linux"],
        help="how to flash (default auto: Katapult, else make flash)",
    )
    pa.add_argument(
        "--config", metavar="FILE", help="an existing Klipper .config for it"
    )
    pa.add_argument("--name", help="a longer description")
    pa.add_argument(
        "--section", metavar="SECTION", help="printer.cfg section (default: mcu KEY)"
    )
    pa.add_argument("--baud", type=int, help="UART baud rate")
    pr = reporting(dsub.add_parser("remove", help="forget an MCU (its config is kept)"))
    pr.add_argument("key", metavar="KEY")
    pi = reporting(
        dsub.add_parser("import", help="register the [mcu] sections of printer.cfg")
    )
    pi.add_argument(
        "printer_cfg",
        nargs="?",
        default=DEFAULT_PRINTER_CFG,
        metavar="PRINTER_CFG",
        help=f"default {DEFAULT_PRINTER_CFG}",
    )

    p = reporting(
        sub.add_parser(
            "config",
            help="choose a board's firmware options (Klipper's menuconfig)",
            description=(
                "Runs `make menuconfig` in your Klipper tree on this board's "
                "own config file."
            ),
        )
    )
    p.add_argument("key", metavar="KEY")
    p.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="attach an existing Klipper .config instead of running menuconfig",
    )

    p = reporting(
        sub.add_parser(
            "plan",
            help="show what flash-all would do, changing nothing",
        )
    )
    p.add_argument("keys", nargs="*", metavar="KEY", help="devices (default: all)")
    p.add_argument("--only-outdated", action="store_true", help="skip current MCUs")

    p = reporting(
        sub.add_parser("build", help="build firmware (klipper keeps running)")
    )
    p.add_argument("keys", nargs="*", metavar="KEY", help="devices (default: all)")

    p = reporting(
        sub.add_parser(
            "flash",
            help="build and flash one MCU (stops klipper while flashing)",
        )
    )
    p.add_argument("key", metavar="KEY")
    p.add_argument(
        "--yes", action="store_true", help="proceed even when Moonraker is unreachable"
    )

    p = reporting(
        sub.add_parser(
            "flash-all",
            help="build every MCU, stop klipper once, flash all, restart, verify",
        )
    )
    p.add_argument("keys", nargs="*", metavar="KEY", help="devices (default: all)")
    p.add_argument(
        "--only-outdated",
        action="store_true",
        help="flash only MCUs whose version differs from the new build",
    )
    p.add_argument(
        "--yes",
        action="store_true",
        help="proceed even when Moonraker is unreachable (make sure nothing prints)",
    )

    p = reporting(
        sub.add_parser(
            "rollback",
            help="flash each board's last-known-good firmware (klipper restarts)",
            description=(
                "Flashes each selected board with the firmware last flashed to it "
                "AND verified there, inside one stop window, then restarts klipper "
                "and verifies. A board without one is skipped."
            ),
        )
    )
    p.add_argument("keys", nargs="*", metavar="KEY", help="devices (default: all)")
    p.add_argument(
        "--yes",
        action="store_true",
        help="proceed even when Moonraker is unreachable (make sure nothing prints)",
    )

    p = sub.add_parser(
        "status",
        help="MCU versions and the last run (--shm/--watch: klippy's status mirror)",
    )
    status_watch.add_arguments(p)
    p.set_defaults(shm=None)
    katapult_cli.add_parser(sub)
    return parser


COMMANDS = {
    "settings": cmd_settings,
    "devices": cmd_devices,
    "config": cmd_config,
    "plan": cmd_plan,
    "build": cmd_build,
    "flash": cmd_flash,
    "flash-all": cmd_flash_all,
    "rollback": cmd_rollback,
    "status": cmd_status,
    "katapult": katapult_cli.command,
}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    if not args.command:
        parser.print_help(sys.stderr)
        return int(ExitStatus.USAGE)
    install_signal_handlers()
    from kflash._core import Engine

    try:
        engine = Engine(args.home)
        return int(COMMANDS[args.command](engine, args))
    except KflashError as exc:
        return int(fail(args, exc))
    except KeyboardInterrupt as exc:
        status = ExitStatus.of(exc)
        err("kflash: interrupted")
        if args.json:
            emit_json(
                error_document(exc, status, error="interrupted", cancelled=True)
            )
        return int(status)


if __name__ == "__main__":
    sys.exit(main())
