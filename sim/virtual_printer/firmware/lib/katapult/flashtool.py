#!/usr/bin/env python3
"""The bench tree's stand-in for Katapult's flashtool.py (serial only, stdlib only).

Written for kflash's virtual printer bench, not copied from Katapult: same options
(-d DEV -f FILE -b BAUD -r -s -v), same behaviour a caller relies on (1200-baud touch
when the device runs Klipper, wait for Katapult, CONNECT, write, verify by read-back,
COMPLETE, "Programming Complete" as the last line, "Device is not Katapult, exiting..."
and exit 0 when the board comes back as something else). sysfs and /dev lookups honour
KFLASH_SYS_ROOT and KFLASH_DEV_ROOT so it works inside the bench's sandbox.
"""

import argparse
import hashlib
import json
import os
import re
import select
import struct
import sys
import termios
import time
import zlib

SYS = os.environ.get("KFLASH_SYS_ROOT", "/sys")
DEV = os.environ.get("KFLASH_DEV_ROOT", "/dev")
REQUEST = b"~ \x1c Request Serial Bootloader!! ~"


class FlashError(Exception):
    pass


def crc16(data):
    crc = 0xFFFF
    for b in data:
        x = (b ^ (crc & 0xFF)) & 0xFF
        x = (x ^ (x << 4)) & 0xFF
        crc = (((x << 8) | (crc >> 8)) ^ (x >> 4) ^ (x << 3)) & 0xFFFF
    return crc


def frame(cmd, payload=b""):
    body = bytes([cmd, len(payload) // 4]) + payload
    return b"\x01\x88" + body + struct.pack("<H", crc16(body)) + b"\x99\x03"


def usb_dir(device):
    name = os.path.basename(os.readlink(device)) if os.path.islink(device) else None
    name = name or os.path.basename(device)
    iface = os.path.join(SYS, "class", "tty", name, "device")
    if not os.path.exists(iface):
        return None
    return os.path.dirname(os.path.realpath(iface))


def usb_info(path):
    info = {}
    for key in ("idVendor", "idProduct", "manufacturer"):
        try:
            with open(os.path.join(path, key)) as f:
                info[key] = f.read().strip().lower()
        except OSError:
            info[key] = ""
    info["usb_id"] = "{}:{}".format(info["idVendor"], info["idProduct"])
    return info


def image_dictionary(data):
    for m in re.finditer(rb"\x78[\x01\x5e\x9c\xda]", data):
        try:
            d = json.loads(zlib.decompressobj().decompress(data[m.start() :]))
        except (zlib.error, ValueError):
            continue
        if isinstance(d, dict) and "version" in d:
            return d
    return None


class Port:
    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        attrs = termios.tcgetattr(self.fd)
        attrs[0] = attrs[1] = attrs[3] = 0
        attrs[2] = termios.CS8 | termios.CREAD | termios.CLOCAL
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        self.buf = bytearray()

    def command(self, cmd, payload=b"", tries=5, timeout=2.0):
        for _ in range(tries):
            os.write(self.fd, frame(cmd, payload))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                i = self.buf.find(b"\x01\x88")
                if i >= 0 and len(self.buf) >= i + 8:
                    size = self.buf[i + 3] * 4 + 8
                    if len(self.buf) >= i + size:
                        fr = bytes(self.buf[i : i + size])
                        del self.buf[: i + size]
                        body = fr[2:-4]
                        if struct.unpack("<H", fr[-4:-2])[0] != crc16(body):
                            break
                        if body[0] == 0xA0 and struct.unpack("<I", body[2:6])[0] == cmd:
                            return body[6:]
                        break  # NACK, command error: retry
                r, _, _ = select.select([self.fd], [], [], 0.05)
                if r:
                    try:
                        self.buf += os.read(self.fd, 4096)
                    except BlockingIOError:
                        pass
            time.sleep(0.05)
        raise FlashError(f"Error sending command 0x{cmd:02x} to device")

    def close(self):
        os.close(self.fd)


def request_usb_bootloader(device, usb):
    start = usb_info(usb)["usb_id"]
    print(f"Requesting USB bootloader for {device}...", flush=True)
    fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    attrs = termios.tcgetattr(fd)
    attrs[4] = attrs[5] = termios.B1200
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    os.close(fd)
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        time.sleep(0.1)
        info = usb_info(usb)
        if info["idVendor"] and info["usb_id"] != start:
            ttys = []
            tdir = os.path.join(usb, os.path.basename(usb) + ":1.0", "tty")
            if os.path.isdir(tdir):
                ttys = os.listdir(tdir)
            if info["manufacturer"] == "katapult" or info["usb_id"] == "1d50:6177":
                if ttys:
                    print(f"Katapult detected on {DEV}/{ttys[0]}")
                    return os.path.join(DEV, ttys[0])
                continue
            print(
                "Detected new USB Device: {} {}".format(
                    info["usb_id"], info["manufacturer"]
                )
            )
            print("Device is not Katapult, exiting...")
            return None
    raise FlashError("timed out waiting for the bootloader")


def main():
    p = argparse.ArgumentParser(description="Katapult flash tool (kflash bench)")
    p.add_argument("-d", "--device", required=True)
    p.add_argument("-b", "--baud", type=int, default=250000)
    p.add_argument("-f", "--firmware", default="~/klipper/out/klipper.bin")
    p.add_argument("-r", "--request-bootloader", action="store_true")
    p.add_argument("-s", "--status", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    fw_path = os.path.expanduser(args.firmware)
    try:
        firmware = b""
        fw_dict = None
        if not (args.request_bootloader or args.status):
            with open(fw_path, "rb") as f:
                firmware = f.read()
            fw_dict = image_dictionary(firmware)
            if fw_dict:
                print(
                    "Detected Klipper binary version {}, MCU: {}".format(
                        fw_dict.get("version"), fw_dict.get("config", {}).get("MCU")
                    )
                )
        device = args.device
        if not os.path.exists(device):
            raise FlashError(f"No Serial Device found at {device}")
        usb = usb_dir(device)
        if usb is not None and usb_info(usb)["manufacturer"] == "klipper":
            print("Detected USB device running Klipper")
            device = request_usb_bootloader(device, usb)
            if device is None or args.request_bootloader:
                print("Bootloader Request Complete")
                return 0
        elif usb is None and args.request_bootloader:
            fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
            os.write(fd, REQUEST)
            os.close(fd)
            time.sleep(1.0)
            print("Bootloader Request Complete")
            return 0
        port = Port(device)
        try:
            info = port.command(0x11)
            _proto, start, block = struct.unpack("<III", info[:12])
            parts = [x.decode() for x in info[12:].split(b"\0") if x]
            mcu = parts[0] if parts else "?"
            version = parts[1] if len(parts) > 1 else "?"
            print(
                f"Katapult Connected\nSoftware Version: {version}\n"
                f"Block Size: {block} bytes\n"
                f"Application Start: 0x{start:X}\nMCU type: {mcu}"
            )
            if args.status:
                print("Status Request Complete")
                return 0
            bin_mcu = (fw_dict or {}).get("config", {}).get("MCU")
            if bin_mcu and bin_mcu != mcu:
                raise FlashError(
                    "MCU returned by Katapult does not match MCU "
                    f"identified in klipper.bin ({mcu} vs {bin_mcu})"
                )
            try:
                print(f"Flashing '{fw_path}'...", flush=True)
                blocks = [
                    firmware[i : i + block].ljust(block, b"\xff")
                    for i in range(0, len(firmware), block)
                ]
                for n, data in enumerate(blocks):
                    addr = start + n * block
                    port.command(0x12, struct.pack("<I", addr) + data, 3, 5.0)
                pages = struct.unpack("<I", port.command(0x13)[:4])[0]
                print(f"Write complete: {pages} pages")
                sent, back = hashlib.sha1(), hashlib.sha1()
                for n, data in enumerate(blocks):
                    sent.update(data)
                    resp = port.command(0x14, struct.pack("<I", start + n * block))
                    back.update(resp[4:])
                if sent.hexdigest() != back.hexdigest():
                    raise FlashError(
                        f"Checksum mismatch: Expected {sent.hexdigest().upper()}, "
                        f"Received {back.hexdigest().upper()}"
                    )
                print(f"Verification Complete: SHA = {back.hexdigest().upper()}")
            finally:
                port.command(0x15)
        finally:
            port.close()
    except (FlashError, OSError) as e:
        print(f"Flash Error: {e}", file=sys.stderr)
        return 1
    print("Programming Complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
