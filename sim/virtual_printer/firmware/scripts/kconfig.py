#!/usr/bin/env python3
"""A tiny stand-in for Klipper's kconfiglib scripts (this tree has no Kconfig files).

kconfig.py olddefconfig FILE   fill in every symbol the chosen machine needs
kconfig.py menuconfig FILE     a plain line editor (no curses): SYMBOL=value lines
kconfig.py autoconf FILE OUT   write the C header (#define CONFIG_...)
"""

import os
import sys

# Symbols per machine, in the order they are written, with their defaults.
COMMON = [
    ("LOW_LEVEL_OPTIONS", "y"),
]
MACHINES = {
    "MACH_STM32": [
        ("BOARD_DIRECTORY", '"stm32"'),
        ("MCU", '"stm32f446xx"'),
        ("CLOCK_FREQ", "180000000"),
        ("USBSERIAL", "y"),
        ("FLASH_SIZE", "0x80000"),
        ("FLASH_BOOT_ADDRESS", "0x8000000"),
        ("RAM_START", "0x20000000"),
        ("RAM_SIZE", "0x20000"),
        ("STACK_SIZE", "512"),
        ("FLASH_APPLICATION_ADDRESS", "0x8008000"),
        ("STM32_SELECT", "y"),
        ("MACH_STM32F446", "y"),
        ("STM32_FLASH_START_8000", "y"),
        ("STM32_CLOCK_REF_12M", "y"),
        ("STM32_USB_PA11_PA12", "y"),
        ("USB_VENDOR_ID", "0x1d50"),
        ("USB_DEVICE_ID", "0x614e"),
        ("USB_SERIAL_NUMBER_CHIPID", "y"),
    ],
    "MACH_RPXXXX": [
        ("BOARD_DIRECTORY", '"rp2040"'),
        ("MCU", '"rp2040"'),
        ("CLOCK_FREQ", "12000000"),
        ("USBSERIAL", "y"),
        ("FLASH_SIZE", "0x200000"),
        ("FLASH_BOOT_ADDRESS", "0x10000100"),
        ("RAM_START", "0x20000000"),
        ("RAM_SIZE", "0x42000"),
        ("STACK_SIZE", "512"),
        ("FLASH_APPLICATION_ADDRESS", "0x10004000"),
        ("RPXXXX_SELECT", "y"),
        ("MACH_RP2040", "y"),
        ("RPXXXX_FLASH_START_4000", "y"),
        ("USB_VENDOR_ID", "0x1d50"),
        ("USB_DEVICE_ID", "0x614e"),
        ("USB_SERIAL_NUMBER_CHIPID", "y"),
    ],
    "MACH_LINUX": [
        ("BOARD_DIRECTORY", '"linux"'),
        ("CLOCK_FREQ", "50000000"),
        ("LINUX_SELECT", "y"),
    ],
}
TAIL = [
    ("STATS_SUMSQ_BASE", "256"),
    ("HAVE_GPIO", "y"),
    ("WANT_STEPPER", "y"),
]


def read_config(path):
    values, order = {}, []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("CONFIG_") and "=" in line:
                    k, v = line[7:].split("=", 1)
                    values[k] = v
                    order.append(k)
                elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                    k = line[9:-11]
                    values[k] = "n"
                    order.append(k)
    return values, order


def machine_of(values):
    for mach in MACHINES:
        if values.get(mach) == "y":
            return mach
    return None


def unchanged(path, text):
    """True when ``path`` already holds ``text``. Then it is not rewritten, so make
    sees no newer config (Kconfig's own tools behave the same)."""
    try:
        with open(path) as f:
            return f.read() == text
    except OSError:
        return False


def write_config(path, values, order):
    lines = [
        "# Automatically generated file; DO NOT EDIT.",
        "# Klipper-like firmware configuration (kflash bench tree)",
    ]
    for k in order:
        v = values[k]
        lines.append(f"# CONFIG_{k} is not set" if v == "n" else f"CONFIG_{k}={v}")
    text = "\n".join(lines) + "\n"
    if unchanged(path, text):
        print(f"No change to configuration in '{path}'")
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):
        with open(path) as old, open(path + ".old", "w") as bak:
            bak.write(old.read())
    os.replace(tmp, path)


def olddefconfig(path):
    values, order = read_config(path)
    mach = machine_of(values)
    if mach is None:
        sys.stderr.write(
            "{}: no machine selected (set one of {})\n".format(
                path, ", ".join("CONFIG_" + m + "=y" for m in MACHINES)
            )
        )
        return 1
    wanted = COMMON + [(mach, "y")] + MACHINES[mach] + TAIL
    new_order = []
    for k, default in wanted:
        values.setdefault(k, default)
        if k not in new_order:
            new_order.append(k)
    for k in order:
        if k not in new_order:
            new_order.append(k)
    write_config(path, values, new_order)
    return 0


def menuconfig(path):
    values, order = read_config(path)
    print(f"kflash bench tree: no curses menuconfig; editing {path}")
    for k in order:
        print(f"  CONFIG_{k}={values[k]}")
    if not sys.stdin.isatty():
        print("(stdin is not a terminal: nothing changed)")
        return 0
    print("Type SYMBOL=value lines (CONFIG_ prefix optional); an empty line saves.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if "=" not in line:
            print("expected SYMBOL=value")
            continue
        k, v = line.split("=", 1)
        k = k.strip()
        if k.startswith("CONFIG_"):
            k = k[7:]
        if k not in values:
            order.append(k)
        values[k] = v.strip()
    write_config(path, values, order)
    return olddefconfig(path)


def autoconf(path, out):
    values, order = read_config(path)
    if machine_of(values) is None:
        sys.stderr.write(f"{path}: no machine selected; run make olddefconfig\n")
        return 1
    lines = [f"/* Automatically generated from {path} */"]
    for k in order:
        v = values[k]
        if v == "n":
            continue
        lines.append("#define CONFIG_{} {}".format(k, "1" if v == "y" else v))
    text = "\n".join(lines) + "\n"
    if not unchanged(out, text):
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, out)
    return 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "olddefconfig":
        return olddefconfig(argv[1])
    if len(argv) >= 2 and argv[0] == "menuconfig":
        return menuconfig(argv[1])
    if len(argv) >= 3 and argv[0] == "autoconf":
        return autoconf(argv[1], argv[2])
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
