"""The watchdog of one flash run: ``python -m kflash.watchdog --home H --run-id ID``.

The run's process (the CLI or the helper) launches it at pre-flight, out of
its reach (the core's ``LiveWatchdog``). It waits for the run to end; if the
run ended with klipper stopped (its process was killed, or it could not start
klipper again) it starts klipper through the core's service backends with the
run's own settings, and logs what it did to ``<home>/watchdog.log``. All of
that is the core's ``Runs.watch``; this is its entry point. SIGINT, SIGHUP and
SIGPIPE are ignored: a closed terminal must not end it.
"""

import argparse
import signal
import sys

__all__ = ["main"]


def main(argv=None):
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    p = argparse.ArgumentParser(prog="python -m kflash.watchdog",
                                description="Guard one kflash run.")
    p.add_argument("--home", required=True, help="kflash state dir")
    p.add_argument("--run-id", required=True, help="the run to guard")
    a = p.parse_args(argv)
    from kflash import Runs

    return Runs(a.home).watch(a.run_id)


if __name__ == "__main__":
    sys.exit(main())
