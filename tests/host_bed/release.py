"""Releases of kflash for the host bed's update test: a newer version, where it ships.

`next_version()` is this checkout's version with the patch number raised.
`bump(tree, new)` is the commit that bumps the version, applied to a copy of the
checkout: Cargo.toml, Cargo.lock, scripts/klippy-requirements.txt and the [kflash]
extra's own ``VERSION`` (when it has one) say ``new``, and the description of the
``KFLASH_UPDATE_ALL`` macro in kflash.cfg names it (so a test can see which kflash.cfg
klippy read). `bumped_wheel()` builds that copy's wheel with maturin, cached outside
the checkout by the copy's content (its cargo target dir too, so a rebuild compiles
only kflash). `publish()` lays out a release site, served inside the container by
``python3 -m http.server``: ``github/v<version>/`` as GitHub serves a release's files
(the wheels and SHA256SUMS, what scripts/install.sh downloads) and ``simple/`` as a
PEP 503 package index (what pip, run by Moonraker's update, reads instead of PyPI).
"""

from __future__ import annotations

import glob
import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

from host_bed import root as bed_root
from host_bed.root import BedError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIST = "kflash-klipper"


def current_version() -> str:
    with open(os.path.join(REPO, "Cargo.toml")) as f:
        m = re.search(r'^version = "([^"]+)"', f.read(), re.M)
    if m is None:
        raise BedError("no version in Cargo.toml")
    return m.group(1)


def next_version() -> str:
    major, minor, patch = current_version().split(".")
    return f"{major}.{minor}.{int(patch) + 1}"


def checkout_files() -> list[str]:
    """The checkout's files as put_checkout copies them (tracked and new)."""
    out = subprocess.run(
        ["git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
         "--exclude-standard"], capture_output=True, check=True).stdout
    return sorted(f for f in out.decode().split("\0")
                  if f and os.path.isfile(os.path.join(REPO, f)))


def _edit(path: str, pattern: str, repl: str, what: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new, n = re.subn(pattern, repl, text, count=1, flags=re.M)
    if n != 1:
        raise BedError(f"cannot bump {what} in {path}: no match for {pattern!r}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


def bump(tree: str, new: str) -> None:
    """The version-bump commit's changes, applied to the checkout copy ``tree``."""
    old = re.escape(current_version())
    _edit(os.path.join(tree, "Cargo.toml"), rf'^version = "{old}"',
          f'version = "{new}"', "the version")
    _edit(os.path.join(tree, "Cargo.lock"),
          rf'^(name = "kflash"\nversion = )"{old}"', rf'\g<1>"{new}"', "the version")
    _edit(os.path.join(tree, "scripts/klippy-requirements.txt"),
          rf"^{DIST}=={old}$", f"{DIST}=={new}", "the pin")
    extra = os.path.join(tree, "python/kflash/klippy_extras/kflash.py")
    with open(extra, encoding="utf-8") as f:
        has_version = re.search(r"^VERSION = ", f.read(), re.M) is not None
    if has_version:
        _edit(extra, rf'^VERSION = "{old}"$', f'VERSION = "{new}"', "the version")
    _edit(os.path.join(tree, "python/kflash/klippy_extras/kflash.cfg"),
          r"^(\[gcode_macro KFLASH_UPDATE_ALL\]\ndescription: )kflash:",
          rf"\g<1>kflash {new}:", "the KFLASH_UPDATE_ALL description")


def bumped_wheel(log: Callable[[str], None] = print) -> str:
    """This checkout's wheel bumped to `next_version()` (built once per content)."""
    new = next_version()
    h = hashlib.sha256(new.encode())
    files = checkout_files()
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(REPO, rel), "rb") as f:
            h.update(f.read())
    cache = os.path.join(bed_root.cache_dir(), "releases")
    out = os.path.join(cache, f"kflash-{new}-{h.hexdigest()[:16]}")
    found = glob.glob(os.path.join(out, "kflash_klipper-*.whl"))
    if found:
        return found[0]
    with bed_root.cache_lock():
        found = glob.glob(os.path.join(out, "kflash_klipper-*.whl"))
        if found:
            return found[0]
        maturin = os.path.join(os.path.dirname(sys.executable), "maturin")
        if not os.path.exists(maturin):
            raise BedError("maturin not found next to this Python: run `make build`")
        start = time.monotonic()
        log(f"host bed: building kflash {new} (a bumped copy of the checkout)")
        with tempfile.TemporaryDirectory(prefix="kflash-bumped-") as tree:
            for rel in files:
                dst = os.path.join(tree, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(os.path.join(REPO, rel), dst)
            bump(tree, new)
            env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(cache, "target"),
                       VIRTUAL_ENV=os.path.dirname(os.path.dirname(sys.executable)))
            tmp = out + ".part"
            shutil.rmtree(tmp, ignore_errors=True)
            r = subprocess.run([maturin, "build", "--release", "--quiet", "--out", tmp],
                               cwd=tree, env=env, capture_output=True, text=True)
            wheels = glob.glob(os.path.join(tmp, "kflash_klipper-*.whl"))
            if r.returncode != 0 or len(wheels) != 1:
                raise BedError(f"building kflash {new} failed:\n{r.stdout[-2000:]}"
                               f"{r.stderr[-2000:]}")
        for old in glob.glob(os.path.join(cache, "kflash-*")):
            if old != tmp:
                shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
        log(f"host bed: kflash {new} built in {time.monotonic() - start:.0f} s")
        return os.path.join(out, os.path.basename(wheels[0]))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def publish(site: str, version: str, wheel: str, index: bool = True) -> None:
    """Add ``wheel`` (kflash ``version``) to the release site at ``site``: the GitHub
    release's files with SHA256SUMS, and (``index``) the package index's page for
    kflash-klipper (links with their sha256, as PyPI gives them)."""
    release = os.path.join(site, "github", f"v{version}")
    os.makedirs(release, exist_ok=True)
    name = os.path.basename(wheel)
    shutil.copy(wheel, os.path.join(release, name))
    with open(os.path.join(release, "SHA256SUMS"), "w") as f:
        f.write(f"{_sha256(wheel)}  {name}\n")
    if not index:
        return
    files = os.path.join(site, "files")
    os.makedirs(files, exist_ok=True)
    shutil.copy(wheel, os.path.join(files, name))
    project = os.path.join(site, "simple", DIST)
    os.makedirs(project, exist_ok=True)
    links = "".join(
        f'<a href="../../files/{html.escape(n)}'
        f'#sha256={_sha256(os.path.join(files, n))}">{html.escape(n)}</a><br>\n'
        for n in sorted(os.listdir(files)))
    with open(os.path.join(project, "index.html"), "w") as f:
        f.write(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
