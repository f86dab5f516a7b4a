"""``python -m host_bed`` (from tests/): the host bed by hand.

build    build (or find) the cached root and printer host; print where they are
shell    boot a fresh printer host with this checkout in ~/kflash and its wheel in
         ~/, open a login shell as pi in it (root: --root); halt and remove it after
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from host_bed import printer as bed
from host_bed.container import Container


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m host_bed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    sh = sub.add_parser("shell")
    sh.add_argument("--root", action="store_true", help="a root shell instead")
    args = p.parse_args(argv)
    start = time.monotonic()
    lower = bed.ensure_printer_root()
    print(f"printer host: {lower} ({time.monotonic() - start:.1f} s)")
    if args.cmd == "build":
        return 0
    with tempfile.TemporaryDirectory(prefix="host-bed-") as tmp:
        wheel = bed.build_kflash_wheel(os.path.join(tmp, "wheel"))
        c = Container(lower, os.path.join(tmp, "container"), name="printer")
        try:
            c.mount()
            inside = bed.put_checkout(c, wheel)
            c.boot()
            bed.wait_ready(c)
            bed.init_checkout(c)
            print(f"booted; install with: cd ~/kflash && scripts/install.sh "
                  f"--wheel {inside}\nMoonraker: {bed.MOONRAKER_URL} (inside only)")
            login = ["bash", "-l"] if args.root else ["runuser", "-l", "pi"]
            term = "TERM=" + os.environ.get("TERM", "vt100")
            return subprocess.call(["nsenter", "-t", str(c.pid1), "-a", "--",
                                    "env", "-i", term,
                                    "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *login])
        finally:
            c.remove()


if __name__ == "__main__":
    sys.exit(main())
