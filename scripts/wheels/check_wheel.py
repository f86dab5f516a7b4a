"""Check a kflash release wheel before it ships.

    python3 scripts/wheels/check_wheel.py [--version X.Y.Z] ARCH WHEEL...

ARCH is x86_64, aarch64 or armv7. A wheel passes when
- its file name and its WHEEL file say abi3 for CPython >= 3.9 and a manylinux
  platform of ARCH whose glibc is no newer than 2.36 (Raspberry Pi OS bookworm);
- its native module is an ELF for ARCH that asks for no GLIBC_ symbol version
  newer than 2.36 and carries no symbol table or debug sections (stripped);
- it holds the product only (the kflash package and its metadata), with the
  klippy extras and kflash.cfg;
- with --version, its version is X.Y.Z (the release workflow passes the tag).
Prints one line per wheel with its size and the newest GLIBC_ version it needs;
exits 1 on the first failure, saying what failed. Needs readelf (binutils).
"""

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GLIBC_MAX = (2, 36)
MACHINE = {"x86_64": "X86-64", "aarch64": "AArch64", "armv7": "ARM"}
PLATFORM = {"x86_64": "x86_64", "aarch64": "aarch64", "armv7": "armv7l"}
REQUIRED = [
    "kflash/__init__.py",
    "kflash/cli.py",
    "kflash/klippy_extras/kflash.py",
    "kflash/klippy_extras/status_snapshot.py",
    "kflash/klippy_extras/kflash.cfg",
]


class Failed(Exception):
    pass


def readelf(*args):
    out = subprocess.run(
        ["readelf", "-W", *args], capture_output=True, text=True, check=True
    )
    return out.stdout


def glibc_versions(so):
    """Every GLIBC_x.y the module's dynamic symbols need, as tuples."""
    found = set(re.findall(r"\bGLIBC_(\d+)\.(\d+)(?:\.(\d+))?\b", readelf("-V", so)))
    return sorted(tuple(int(p) for p in v if p) for v in found)


def check(arch, wheel, version):
    name = Path(wheel).name
    parts = name[: -len(".whl")].split("-")
    if len(parts) != 5:
        raise Failed(f"{name}: not a name-version-python-abi-platform wheel name")
    _, wheel_version, python, abi, platforms = parts
    if (python, abi) != ("cp39", "abi3"):
        raise Failed(f"{name}: tagged {python}-{abi}, want cp39-abi3")
    if version is not None and wheel_version != version:
        raise Failed(f"{name}: version {wheel_version}, want {version}")
    for platform in platforms.split("."):
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
        legacy = re.fullmatch(r"manylinux2014_(\w+)", platform)
        if m:
            glibc, plat_arch = (int(m[1]), int(m[2])), m[3]
        elif legacy:
            glibc, plat_arch = (2, 17), legacy[1]
        else:
            raise Failed(f"{name}: platform {platform} is not a manylinux tag")
        if plat_arch != PLATFORM[arch]:
            raise Failed(f"{name}: platform {platform} is not {PLATFORM[arch]}")
        if glibc > GLIBC_MAX:
            raise Failed(f"{name}: {platform} needs glibc newer than 2.36")
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        names = zf.namelist()
        stray = [n for n in names if not n.startswith(("kflash/", f"{parts[0]}-"))]
        if stray:
            raise Failed(f"{name}: holds more than the product: {stray[:5]}")
        missing = [n for n in REQUIRED if n not in names]
        if missing:
            raise Failed(f"{name}: lacks {missing}")
        wheel_file = next(n for n in names if n.endswith(".dist-info/WHEEL"))
        tags = re.findall(r"^Tag: (\S+)$", zf.read(wheel_file).decode(), re.M)
        want = {f"{python}-{abi}-{p}" for p in platforms.split(".")}
        if set(tags) != want:
            raise Failed(f"{name}: WHEEL says {tags}, the file name {sorted(want)}")
        modules = [n for n in names if re.fullmatch(r"kflash/_core\..*so", n)]
        if len(modules) != 1:
            raise Failed(f"{name}: want one kflash/_core*.so, found {modules}")
        so = zf.extract(modules[0], tmp)
        machine = re.search(r"Machine:\s+(.*)", readelf("-h", so))[1]
        if MACHINE[arch] not in machine:
            raise Failed(f"{name}: module is built for {machine}, not {arch}")
        sections = re.findall(r"\]\s+(\.\S+)", readelf("-S", so))
        unstripped = [s for s in sections if s == ".symtab" or s.startswith(".debug")]
        if unstripped:
            raise Failed(f"{name}: module not stripped (has {unstripped})")
        versions = glibc_versions(so)
        if not versions:
            raise Failed(f"{name}: module needs no GLIBC_ symbols at all?")
        newest = versions[-1]
        if newest > GLIBC_MAX:
            raise Failed(f"{name}: module needs GLIBC_{'.'.join(map(str, newest))}")
        so_size = zf.getinfo(modules[0]).file_size
    size = Path(wheel).stat().st_size
    print(
        f"{name}: ok, {size / 1e6:.2f} MB (module {so_size / 1e6:.2f} MB), "
        f"newest symbol GLIBC_{'.'.join(map(str, newest))}, stripped"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="the version every wheel must carry")
    parser.add_argument("arch", choices=sorted(MACHINE))
    parser.add_argument("wheels", nargs="+", metavar="WHEEL")
    args = parser.parse_args()
    try:
        for wheel in args.wheels:
            check(args.arch, wheel, args.version)
    except Failed as exc:
        print(f"check_wheel: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
