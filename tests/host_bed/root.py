"""The Debian bookworm root the host bed boots: its recipe and its cache.

`ensure_root()` returns a ``.tar.zst`` of a minimal bookworm root (systemd as
init, dbus, polkitd, sudo, python3 + venv, gcc, make, git, ...), built once with
``mmdebstrap --variant=minbase`` (no recommends) from the Debian mirror and cached
outside the checkout in ``$XDG_CACHE_HOME/kflash/host-bed`` (default ``~/.cache``),
named by a hash of the recipe: a changed recipe builds a new root, an unchanged one
is never rebuilt. Building needs root, mmdebstrap and zstd (`make test` installs
them); a failure says which and why. One builder at a time (flock); `prune` drops
the cache entries a newer recipe replaced.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from typing import Callable, Iterator

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
VARIANT = "minbase"
#: What a Raspberry Pi OS Lite / MainsailOS host has that the bed needs: systemd as
#: init with dbus and polkit (Moonraker's systemd_dbus provider and its polkit rules),
#: sudo, Python with venv (klippy-env, moonraker-env), gcc/make/git (firmware builds,
#: klippy's C helper), libsodium (Moonraker's libnacl), iproute2 (Moonraker runs
#: `ip -json address`), procps (ps for humans).
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "polkitd",
    "sudo",
    "passwd",
    "python3",
    "python3-venv",
    "gcc",
    "libc6-dev",
    "make",
    "git",
    "libsodium23",
    "iproute2",
    "procps",
)
#: Bump when the way the root is built changes in a way the fields above do not show.
RECIPE_VERSION = 1


class BedError(RuntimeError):
    """The host bed cannot be set up here; the message says why and what to do."""


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "kflash", "host-bed")


def recipe() -> dict[str, object]:
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "mirror": MIRROR,
        "variant": VARIANT,
        "arch": "amd64",
        "packages": sorted(PACKAGES),
        "recommends": False,
    }


def recipe_key(doc: object) -> str:
    text = json.dumps(doc, sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest()[:16]


@contextmanager
def cache_lock() -> Iterator[None]:
    """One builder of cached roots at a time (other test runs wait)."""
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def need_tools(*tools: str) -> None:
    if os.geteuid() != 0:
        raise BedError(
            "the host bed needs root (systemd-nspawn, mmdebstrap, nsenter); "
            f"this runs as uid {os.geteuid()}: run `make test` as root"
        )
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BedError(
            f"missing {', '.join(missing)}: install them with `apt-get install -y "
            "--no-install-recommends systemd-container mmdebstrap zstd` "
            "(`make test` does this when it runs as root)"
        )


def run_logged(argv: list[str], log: str, timeout: float, what: str) -> None:
    with open(log, "ab") as out:
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=timeout, check=False,
            )
        except subprocess.TimeoutExpired:
            raise BedError(
                f"{what} took more than {timeout:.0f} s (log: {log})") from None
    if proc.returncode != 0:
        with open(log, "rb") as f:
            tail = f.read()[-3000:].decode("utf-8", "replace")
        raise BedError(
            f"{what} failed (exit {proc.returncode}); log {log}, its end:\n{tail}"
        )


def ensure_root(log: Callable[[str], None] = print) -> str:
    """The cached root tarball, built first if missing; returns its path."""
    need_tools("mmdebstrap", "zstd", "systemd-nspawn", "nsenter")
    doc = recipe()
    path = os.path.join(cache_dir(), f"root-{recipe_key(doc)}.tar.zst")
    if os.path.exists(path):
        return path
    with cache_lock():
        if os.path.exists(path):
            return path
        tmp = path[: -len(".tar.zst")] + ".part.tar.zst"
        logfile = path + ".log"
        if os.path.exists(logfile):
            os.unlink(logfile)
        log(f"host bed: building the {SUITE} root once (mmdebstrap; 2-4 min)")
        start = time.monotonic()
        run_logged(
            [
                "mmdebstrap",
                f"--variant={VARIANT}",
                "--aptopt=APT::Install-Recommends \"false\"",
                "--include=" + ",".join(PACKAGES),
                "--skip=check/empty",
                SUITE,
                tmp,
                MIRROR,
            ],
            logfile, 1200, f"mmdebstrap {SUITE} from {MIRROR}",
        )
        os.replace(tmp, path)
        with open(path + ".json", "w") as f:
            json.dump({"recipe": doc, "build_s": round(time.monotonic() - start, 1)},
                      f, indent=1)
        log(f"host bed: root built in {time.monotonic() - start:.0f} s: {path}")
        prune("root-", path)
    return path


def prune(prefix: str, keep: str) -> None:
    """Remove the cached ``prefix*`` entries but ``keep`` (call under the lock).

    An entry an overlay still uses as its lower dir (a test run in progress) stays.
    """
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    for name in os.listdir(cache_dir()):
        path = os.path.join(cache_dir(), name)
        if not name.startswith(prefix) or path == keep or path.startswith(keep + "."):
            continue
        if f"lowerdir={path}" in mounts:
            continue
        if os.path.isdir(path):
            subprocess.run(["rm", "-rf", "--one-file-system", path], check=False)
        else:
            os.unlink(path)
