"""``python -m virtual_printer``: the virtual printer bench from the command line.

up --dir D [--boards mainboard,toolhead,host]   start the printer, wait for ready
down --dir D                                     stop it, leave no process behind
demo [--dir D]                                   the `make demo` walk-through
boards --spec FILE                               (supervisord program) the USB boards
linux-mcu --firmware F --serial PATH             (supervisord program) klipper_mcu
tree DIR [--commits-after-tag N]                 the firmware tree alone (a git repo)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m virtual_printer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a virtual printer")
    up.add_argument("--dir", required=True)
    up.add_argument("--boards", default="mainboard,toolhead,host")
    down = sub.add_parser("down", help="stop a virtual printer")
    down.add_argument("--dir", required=True)
    demo = sub.add_parser("demo", help="flash-all on a virtual printer")
    demo.add_argument("--dir", default="demo-sandbox")
    demo.add_argument("--keep", action="store_true", help="leave the printer running")
    boards = sub.add_parser("boards")
    boards.add_argument("--spec", required=True)
    lm = sub.add_parser("linux-mcu")
    lm.add_argument("--firmware", required=True)
    lm.add_argument("--serial", required=True)
    tr = sub.add_parser("tree", help="write the bench's firmware tree")
    tr.add_argument("dir")
    tr.add_argument("--commits-after-tag", type=int, default=1)
    args = p.parse_args(argv)

    if args.cmd == "tree":
        from virtual_printer import tree

        tree.materialise(args.dir, commits_after_tag=args.commits_after_tag)
        return 0

    if args.cmd == "boards":
        from virtual_printer.board import run_boards

        return run_boards(args.spec)
    if args.cmd == "linux-mcu":
        from virtual_printer.linux_mcu import run_linux_mcu

        return run_linux_mcu(args.firmware, args.serial)
    if args.cmd == "demo":
        from virtual_printer.demo import run_demo

        return run_demo(args.dir, keep=args.keep)

    from virtual_printer.stack import Printer, default_boards

    if args.cmd == "up":
        wanted = [n for n in args.boards.split(",") if n]
        specs = [b for b in default_boards() if b.name in wanted]
        printer = Printer(args.dir, boards=specs, log=print)
        printer.up()
        for section, version in printer.versions().items():
            print(f"[{section}] {version}")
        print(f"Moonraker: {printer.url}")
        print(f"KFLASH_DEV_ROOT={printer.dev_root} KFLASH_SYS_ROOT={printer.sys_root}")
        return 0
    if args.cmd == "down":
        Printer(args.dir).down()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
