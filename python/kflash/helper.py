"""The detached flash run that klippy's ``[kflash]`` extra starts.

``python -m kflash.helper --home H --run-id ID [--only-outdated | --rollback]
[--device KEY]`` (a new session, or ``sudo -n systemd-run``'s ``kflash-helper``
unit), or ``python -m kflash.helper --home H --pending`` (the ``kflash-run``
unit ``scripts/install.sh`` installs and Moonraker starts: the options wait in
``<home>/runs/pending.json``). The core starts it
(``kflash.Runs.start_helper``).

Argument handling only: the run is the core's ``Engine.flash_all`` (or
``Engine.rollback`` with ``--rollback``: each board gets its last-known-good
image), which holds the run lock, writes the run record and its progress
(``<home>/runs/<run id>.json`` and ``.jsonl``) and launches the watchdog.
klipper is started again on every path: SIGTERM, SIGHUP and SIGINT raise
``Interrupted`` here, so the engine unwinds through its stop guard and the
record says why; a SIGKILL is the watchdog's business. The exit code is the
core's ``ExitStatus``: 0 all good, 1 some device failed, 2 usage or
configuration, 3 refused, 4 klipper could not be started again.
"""

import argparse
import signal
import sys

from kflash import Engine, ExitStatus, KflashError, Runs

__all__ = ["Interrupted", "main", "run"]

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Interrupted(BaseException):
    """Raised by the helper's signal handlers so the engine unwinds."""


def _interrupt(signum, _frame):
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def run(home, only_outdated=False, device=None, run_id=None, rollback=False):
    """One run; returns its exit code."""
    for sig in SIGNALS:
        signal.signal(sig, _interrupt)
    keys = [device] if device else None
    try:
        if rollback:
            report = Engine(home).rollback(keys=keys, yes=True, run_id=run_id)
        else:
            report = Engine(home).flash_all(
                keys=keys, only_outdated=bool(only_outdated and not device),
                yes=True, run_id=run_id)
        status = ExitStatus.of(report)
    except (Interrupted, KflashError) as e:
        print(f"kflash helper: {e}", file=sys.stderr)
        status = ExitStatus.of(e)
    finally:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    print(f"kflash helper: run {run_id or ''} ended ({status.name}, exit "
          f"{int(status)})", file=sys.stderr)
    return int(status)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m kflash.helper",
        description="The detached flash run started by klippy's [kflash].")
    p.add_argument("--home", help="kflash state dir (default: the usual)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--only-outdated", action="store_true",
                      help="flash only the devices whose firmware is outdated")
    kind.add_argument("--rollback", action="store_true",
                      help="flash each device's last-known-good firmware")
    p.add_argument("--device", metavar="KEY", help="flash this device only")
    p.add_argument("--run-id", help="the run's id (the extra's)")
    p.add_argument("--pending", action="store_true",
                   help="take the options from <home>/runs/pending.json "
                   "(the kflash-run unit)")
    a = p.parse_args(argv)
    runs = Runs(a.home)
    if a.pending:
        req = runs.take_pending()
        if req is None:
            print(f"kflash helper: no pending run in {runs.state_dir}/runs",
                  file=sys.stderr)
            return int(ExitStatus.USAGE)
        a.only_outdated, a.device = req["only_outdated"], req["device"]
        a.run_id, a.rollback = req["run_id"], req["rollback"]
    return run(runs.state_dir, a.only_outdated, a.device, a.run_id,
               a.rollback)


if __name__ == "__main__":
    sys.exit(main())
