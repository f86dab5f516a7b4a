"""``make demo``: kflash flash-all on a virtual printer, start to finish.

Brings up the bench printer (STM32F446 mainboard and RP2040 toolhead over USB with
Katapult, the host's linux MCU) running OUTDATED firmware (built from the tree's
tag), registers it in a sandbox KFLASH_HOME the way a user would (``kflash devices
import`` of printer.cfg, settings, one config per device), runs ``kflash plan`` and
``kflash flash-all --yes`` with their output on the terminal, shows what klippy
reports afterwards, tears the printer down and says what to try next. It builds no
firmware for kflash: kflash builds HEAD of the tree itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from virtual_printer import tree
from virtual_printer.stack import Printer


def kflash_command() -> list[str]:
    """The ``kflash`` console script next to this Python, else the module."""
    script = os.path.join(os.path.dirname(sys.executable), "kflash")
    if os.path.exists(script):
        return [script]
    return [
        sys.executable,
        "-c",
        "import sys; from kflash.cli import main; sys.exit(main())",
    ]


def kflash_json(
    env: dict[str, str], *args: str, timeout: float = 300
) -> tuple[int, Any, subprocess.CompletedProcess[str]]:
    """``kflash ARGS --json``, quietly: exit code, JSON document, the process."""
    res = subprocess.run(
        [*kflash_command(), *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return res.returncode, json.loads(res.stdout), res


def flash_all(
    env: dict[str, str], **extra: str
) -> tuple[int, Any, subprocess.CompletedProcess[str]]:
    """``kflash flash-all --yes --json`` with ``extra`` added to the environment."""
    return kflash_json(dict(env, **extra), "flash-all", "--yes")


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def register(printer: Printer, env: dict[str, str], run: Any) -> None:
    """What a user does once: import printer.cfg, settings, a config per device."""
    run("devices", "import", printer.printer_cfg)
    settings = {
        "klipper_dir": printer.tree,
        "service": "moonraker",
        "moonraker_url": printer.url,
        "linux_mcu_binary": printer.linux_binary,
    }
    for key, value in settings.items():
        run("settings", "set", key, value)
    out = subprocess.run(
        [*kflash_command(), "devices", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    devices = json.loads(out)
    home = env["KFLASH_HOME"]
    by_section = {b.section: b for b in printer.boards}
    for d in devices:
        b = by_section.get(d.get("mcu_section") or "")
        if b is None:
            continue
        dest = d.get("config") or os.path.join(home, "configs", f"{d['key']}.config")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(printer.sample_config(b), dest)
        print(f"    config for {d['key']}: {tree.SAMPLE_CONFIGS[b.kind]} -> {dest}")


@contextmanager
def registered(
    directory: str, build_cache: str | None = None
) -> Iterator[tuple[Printer, dict[str, str]]]:
    """The bench printer up and registered with kflash in ``<directory>/kflash``
    (quietly, as the tests use it): ``(printer, env)``; brought down afterwards."""
    printer = Printer(directory, build_cache=build_cache)
    printer.up()
    try:
        env = dict(printer.env(), KFLASH_HOME=os.path.join(directory, "kflash"))

        def run(*args: str) -> int:
            return subprocess.run(
                [*kflash_command(), *args], env=env, capture_output=True, text=True
            ).returncode

        register(printer, env, run)
        yield printer, env
    finally:
        printer.down()


def run_demo(directory: str, keep: bool = False) -> int:
    directory = os.path.abspath(directory)
    old = Printer(directory)
    if old.supervisord_pid() is not None:
        say(f"stopping the previous demo printer in {directory}")
        old.down()
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    printer = Printer(directory, log=lambda m: print(f"    {m}", flush=True))

    say("building the OUTDATED firmware the virtual boards start with (tag v0.13.0)")
    printer.ensure_tree()
    say("starting the virtual printer: boards, klipper_mcu, klippy, Moonraker")
    printer.up()
    print(f"    Moonraker at {printer.url}; klippy is ready with:")
    for section, version in printer.versions().items():
        print(f"      [{section}] {version}")
    print(f"    the Klipper tree ({printer.tree}) is at {tree.describe(printer.tree)}")

    env = dict(printer.env(), KFLASH_HOME=os.path.join(directory, "kflash"))
    rc = 0

    def run(*args: str) -> int:
        print(f"$ kflash {' '.join(args)}", flush=True)
        return subprocess.run([*kflash_command(), *args], env=env).returncode

    try:
        say("registering the printer's MCUs with kflash")
        register(printer, env, run)
        say("what flash-all would do")
        run("plan")
        say("flash-all: build in parallel, stop klipper once, flash, restart, verify")
        rc = run("flash-all", "--yes")
        say("what klippy reports now (through Moonraker)")
        try:
            for section, version in printer.wait_ready(60).items():
                print(f"      [{section}] {version}")
        except TimeoutError as e:
            print(f"    klippy is not ready: {e}")
            rc = rc or 1
    finally:
        if keep:
            say(
                f"the printer keeps running; stop it with: "
                f"python -m virtual_printer down --dir {directory}"
            )
        else:
            say("stopping the virtual printer")
            printer.down()
    say("try next")
    print(f"""    python -m virtual_printer up --dir {directory}     # the printer again
    export KFLASH_HOME={env["KFLASH_HOME"]} KFLASH_DEV_ROOT={printer.dev_root} \\
           KFLASH_SYS_ROOT={printer.sys_root}
    kflash status; kflash plan                  # everything current now
    kflash flash-all --only-outdated --yes       # nothing to do
    (cd {printer.tree} && git commit --allow-empty -m bump)
    kflash plan                                  # a version-only change
    python -m virtual_printer down --dir {directory}""")
    return rc
