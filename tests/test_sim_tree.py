"""The bench tree builds like Klipper: out of tree, and with Klipper's TRAP."""

import json
import os
import shutil
import subprocess

import pytest

from virtual_printer import tree

pytestmark = pytest.mark.usefixtures("bench_tools")


def dict_version(out):
    with open(os.path.join(out, "klipper.dict")) as f:
        return json.load(f)["version"]


def test_out_of_tree_builds_and_the_version_only_trap(tmp_path):
    src = tree.materialise(str(tmp_path / "klipper"))
    outs = {}
    for kind in ("stm32f446", "linux"):
        cfg = str(tmp_path / f"{kind}.config")
        shutil.copy(os.path.join(src, tree.SAMPLE_CONFIGS[kind]), cfg)
        outs[kind] = (cfg, tree.build(src, cfg, str(tmp_path / kind)))
    assert tree.git(src, "status", "--porcelain") == ""  # the tree stays clean
    stm32 = outs["stm32f446"][1]
    with open(os.path.join(stm32, "klipper.dict")) as f:
        d = json.load(f)
    assert d["config"]["MCU"] == "stm32f446xx" and "SERIAL_BAUD" not in d["config"]
    assert d["version"] == tree.describe(src)
    assert os.path.exists(os.path.join(stm32, "klipper.bin"))
    cfg, linux = outs["linux"]
    elf = os.path.join(linux, "klipper.elf")
    run = subprocess.run([elf, "--version"], capture_output=True, text=True)
    assert run.stdout.strip() == dict_version(linux)

    # A host-only change: the version moves, no firmware source does. An incremental
    # make keeps the old version string (Klipper's TRAP) ...
    old = dict_version(linux)
    tree.git(src, "commit", "-q", "--allow-empty", "-m", "host-only change")
    tree.build(src, cfg, linux)
    assert dict_version(linux) == old != tree.describe(src)
    # ... until the version object is regenerated.
    os.remove(os.path.join(linux, "compile_time_request.o"))
    tree.build(src, cfg, linux)
    assert dict_version(linux) == tree.describe(src)
