"""The bench's Klipper-like source tree: materialise it, version it with git, build it.

`materialise` copies the data tree (``virtual_printer/firmware``) into a directory,
makes it a git repository tagged ``v0.13.0`` and adds commits on top, so a checkout of
the tag builds "outdated" firmware and HEAD builds the "new" one (``git describe``
gives ``v0.13.0-<n>-g<hash>``). Commit dates are fixed, so hashes are reproducible.
`build` runs the tree's Makefile out of tree (``OUT=``/``KCONFIG_CONFIG=`` on the make
command line, ``olddefconfig`` first). Functions are independent and thread-safe as long
as they work on different directories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional

FIRMWARE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "firmware")
#: Sample configs shipped with the tree, by board kind.
SAMPLE_CONFIGS = {
    "stm32f446": "config/stm32f446.config",
    "rp2040": "config/rp2040.config",
    "linux": "config/linux.config",
}
BASE_TAG = "v0.13.0"
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


def materialise(dest: str, tag: str = BASE_TAG, commits_after_tag: int = 1) -> str:
    """Copy the tree to ``dest``, git init, tag ``tag``, add commits; returns dest."""
    shutil.copytree(
        FIRMWARE_DIR,
        dest,
        ignore=shutil.ignore_patterns("out", ".config", ".config.old", "__pycache__"),
    )
    git(dest, "init", "-q", "-b", "master")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "Klipper-like tree", date="2026-01-01T00:00:00Z")
    git(dest, "tag", tag)
    for i in range(commits_after_tag):
        add_commit(dest, f"update {i + 1}", day=2 + i)
    return dest


def add_commit(tree: str, message: str, day: int = 2) -> str:
    """Commit a firmware-source change (a new static string); returns git describe."""
    path = os.path.join(tree, "src", "changes.c")
    with open(path, "a") as f:
        f.write('DECL_STATIC_STR("{}");\n'.format(message.replace('"', "'")))
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
