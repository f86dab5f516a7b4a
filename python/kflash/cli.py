"""The ``kflash`` command line (filled in by the engine work)."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kflash")
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
