"""A small Klipper-like firmware source tree, for the build tests and bench.

``python3 benches/fixture_tree.py DIR [--sources N] [--work W]`` writes a git
repository (tagged ``v0.1.0``) whose Makefile behaves like Klipper's where kflash
depends on it:

- ``OUT`` and ``KCONFIG_CONFIG`` are taken from the make command line
  (``KCONFIG_CONFIG :=`` as upstream, so the environment does not override it);
- ``make olddefconfig`` adds missing symbols to the config and rewrites it only
  when it changed (like kconfiglib);
- real C compiled with ``$(CROSS_PREFIX)gcc``, one object per source, header
  dependencies tracked through ``-MD`` files which, as in Klipper, are deleted
  whenever the config is newer than ``$(OUT)board-link``;
- ``compile_time_request.c`` is generated from the objects and carries the
  version (``git describe --always --tags --long --dirty``, date-host suffix when
  dirty), so an incremental build after a version-only change does NOT relink:
  Klipper's trap, reproduced;
- ``klipper.dict`` (JSON: version, config.MCU, ...) and ``klipper.bin`` (the elf
  bytes followed by the zlib-compressed dictionary), or only ``klipper.elf`` for
  the linux target (``CONFIG_MACH_LINUX=y``, MCU "linux").

Knobs a config can set, for tests: ``CONFIG_CROSS_PREFIX`` (toolchain prefix),
``CONFIG_FIXTURE_FAIL=y`` (compile error), ``CONFIG_FIXTURE_SLEEP=<s>`` (hang),
``CONFIG_FIXTURE_DICT_MCU`` (dictionary claims another MCU).
Every make invocation appends its goals to ``make.log`` in the tree (untracked).
The fixture is a test double; it shares no code with Klipper.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

MAKEFILE = r"""# Fixture firmware tree (Klipper-like); see benches/fixture_tree.py.
OUT ?= out/
KCONFIG_CONFIG := $(CURDIR)/.config
PYTHON ?= python3
export KCONFIG_CONFIG

-include $(KCONFIG_CONFIG)

CROSS_PREFIX := $(patsubst "%",%,$(CONFIG_CROSS_PREFIX))
CC := $(CROSS_PREFIX)gcc
LD := $(CROSS_PREFIX)ld

GOALS := $(if $(MAKECMDGOALS),$(MAKECMDGOALS),all)
$(shell echo "$(GOALS) OUT=$(OUT)" >> $(CURDIR)/make.log)

SRCS := $(sort $(wildcard src/*.c))
OBJS := $(patsubst src/%.c,$(OUT)src/%.o,$(SRCS))

ifeq ($(CONFIG_MACH_LINUX),y)
target-y := $(OUT)klipper.elf $(OUT)klipper.dict
else
target-y := $(OUT)klipper.bin $(OUT)klipper.dict
endif

all: $(target-y)

olddefconfig:
	$(Q)$(PYTHON) scripts/olddefconfig.py $(KCONFIG_CONFIG)

$(OUT)autoconf.h: $(KCONFIG_CONFIG)
	@echo "  Building $@"
	@mkdir -p $(OUT)
	$(Q)$(PYTHON) scripts/autoconf.py $(KCONFIG_CONFIG) $@

$(OUT)src/%.o: src/%.c $(OUT)autoconf.h
	@echo "  Compiling $@"
	@mkdir -p $(@D)
	$(Q)$(CC) -O1 -MD -iquote src -include $(OUT)autoconf.h -c $< -o $@

# Like Klipper: on a config change (re)create OUT and forget the header dependencies.
$(OUT)board-link: $(KCONFIG_CONFIG)
	@mkdir -p $(OUT)src
	@rm -f $(OUT)src/*.d
	@echo "# board-link" > $@
include $(OUT)board-link

$(OUT)compile_time_request.c: $(OBJS) scripts/buildcommands.py
	@echo "  Building $@"
	$(if $(CONFIG_FIXTURE_SLEEP),sleep $(CONFIG_FIXTURE_SLEEP))
	$(Q)$(PYTHON) scripts/buildcommands.py $(KCONFIG_CONFIG) $(OUT) $(OBJS)

$(OUT)klipper.dict: $(OUT)compile_time_request.c
	@test -f $@

$(OUT)compile_time_request.o: $(OUT)compile_time_request.c
	@echo "  Compiling $@"
	$(Q)$(CC) -O1 -c $< -o $@

$(OUT)klipper.elf: $(OBJS) $(OUT)compile_time_request.o
	@echo "  Linking $@"
	$(Q)$(CC) $^ -o $@

$(OUT)klipper.bin: $(OUT)klipper.elf $(OUT)klipper.dict
	@echo "  Creating bin file $@"
	$(Q)$(PYTHON) scripts/mkimage.py $(OUT)klipper.elf $(OUT)klipper.dict $@

clean:
	rm -rf $(OUT)

-include $(OUT)src/*.d

.PHONY: all olddefconfig clean
"""

OLDDEFCONFIG = r'''"""Add default values for missing symbols; rewrite only on change."""
import sys

DEFAULTS = [("CONFIG_CLOCK_FREQ", "48000000"), ("CONFIG_HAVE_GPIO", "y")]
path = sys.argv[1]
try:
    text = open(path).read()
except OSError:
    text = ""
have = {l.split("=", 1)[0] for l in text.splitlines() if "=" in l}
if "CONFIG_MCU" not in have and "CONFIG_MACH_LINUX" not in have:
    DEFAULTS.append(("CONFIG_MCU", '"stm32f103xe"'))
new = text
if new and not new.endswith("\n"):
    new += "\n"
for name, value in DEFAULTS:
    if name not in have:
        new += "%s=%s\n" % (name, value)
if new == text:
    print("No change to configuration in '%s'" % path)
else:
    tmp = path + ".tmp"
    open(tmp, "w").write(new)
    import os
    os.replace(tmp, path)
    print("Configuration saved to '%s'" % path)
'''

AUTOCONF = r'''"""Write autoconf.h from a .config."""
import sys

lines = []
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("CONFIG_") or "=" not in line:
        continue
    name, value = line.split("=", 1)
    if value == "y":
        value = "1"
    lines.append("#define %s %s" % (name, value))
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
'''

BUILDCOMMANDS = r'''"""Write compile_time_request.c and klipper.dict, like Klipper."""
import json
import os
import socket
import subprocess
import sys
import time

config_path, out = sys.argv[1], sys.argv[2]
objs = sys.argv[3:]
config = {}
for line in open(config_path):
    line = line.strip()
    if line.startswith("CONFIG_") and "=" in line:
        name, value = line.split("=", 1)
        config[name[7:]] = value.strip('"')


def version():
    try:
        v = subprocess.check_output(
            ["git", "describe", "--always", "--tags", "--long", "--dirty"],
            stderr=subprocess.DEVNULL).decode().strip()
        git = True
    except (OSError, subprocess.CalledProcessError):
        git = False
        try:
            v = open("klippy/.version").read().strip()
        except OSError:
            v = "?"
    if not git or v.endswith("-dirty"):
        v = "%s-%s-%s" % (v, time.strftime("%Y%m%d_%H%M%S"), socket.gethostname())
    return v


if config.get("MACH_LINUX") == "y":
    mcu = "linux"
else:
    mcu = config.get("MCU", "?")
mcu = config.get("FIXTURE_DICT_MCU", mcu)
ver = version()
names = sorted(os.path.basename(o)[:-2] for o in objs)
data = {
    "app": "Klipper",
    "build_versions": "gcc: fixture",
    "commands": {"%s_cmd" % n: i + 1 for i, n in enumerate(names)},
    "config": {"MCU": mcu, "CLOCK_FREQ": int(config.get("CLOCK_FREQ", "0"))},
    "enumerations": {},
    "license": "GNU GPLv3",
    "responses": {},
    "version": ver,
}
with open(os.path.join(out, "compile_time_request.c"), "w") as f:
    f.write('const char fixture_version[] = "%s";\n' % ver)
    f.write('const char fixture_mcu[] = "%s";\n' % mcu)
with open(os.path.join(out, "klipper.dict"), "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)
'''

MKIMAGE = r'''"""klipper.bin = elf bytes + zlib(dict), standing in for objcopy."""
import sys
import zlib

elf, dictfile, out = sys.argv[1:4]
data = open(elf, "rb").read() + zlib.compress(open(dictfile, "rb").read())
open(out + ".tmp", "wb").write(data)
import os
os.replace(out + ".tmp", out)
'''

BOARD_H = """#define BOARD_SCALE 3
"""

MAIN_C = r"""#ifdef CONFIG_FIXTURE_FAIL
#error "fixture failure requested"
#endif
extern const char fixture_version[];
int work_total(void);
int main(void) { return (fixture_version[0] + work_total()) & 1; }
"""


def source_c(i, work):
    # Enough code that the compiler has real work: `work` small functions.
    # mod00.c also includes board.h (a header dependency make must track).
    body = ['#include "board.h"'] if i == 0 else []
    for j in range(work):
        body.append(
            f"static int f{i}_{j}(int x) {{ int s = 0; for (int k = 0; k < x; k++)"
            f" s += (k * {j + 1}) ^ (s >> 3); return s; }}"
        )
    calls = " + ".join(f"f{i}_{j}(n)" for j in range(work)) or "0"
    scale = "BOARD_SCALE * " if i == 0 else ""
    body.append(f"int work_{i}(int n) {{ return {scale}({calls}); }}")
    return "\n".join(body) + "\n"


def git(tree, *args):
    env = dict(os.environ)
    env.update(
        GIT_AUTHOR_NAME="fixture",
        GIT_AUTHOR_EMAIL="fixture@example.invalid",
        GIT_COMMITTER_NAME="fixture",
        GIT_COMMITTER_EMAIL="fixture@example.invalid",
    )
    subprocess.run(
        ["git", "-c", "init.defaultBranch=master", *args],
        cwd=tree,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def generate(tree, sources=4, work=2):
    """Write the fixture tree at `tree`, commit it and tag it v0.1.0."""
    tree = Path(tree)
    (tree / "src").mkdir(parents=True, exist_ok=True)
    (tree / "scripts").mkdir(exist_ok=True)
    (tree / "docs").mkdir(exist_ok=True)
    (tree / "Makefile").write_text(MAKEFILE)
    (tree / "scripts" / "olddefconfig.py").write_text(OLDDEFCONFIG)
    (tree / "scripts" / "autoconf.py").write_text(AUTOCONF)
    (tree / "scripts" / "buildcommands.py").write_text(BUILDCOMMANDS)
    (tree / "scripts" / "mkimage.py").write_text(MKIMAGE)
    (tree / "src" / "main.c").write_text(MAIN_C)
    (tree / "src" / "board.h").write_text(BOARD_H)
    decls = "".join(f"int work_{i}(int n);\n" for i in range(sources))
    total = " + ".join(f"work_{i}(n)" for i in range(sources)) or "0"
    (tree / "src" / "total.c").write_text(
        decls + f"int work_total(void) {{ int n = 3; return {total}; }}\n"
    )
    for i in range(sources):
        (tree / "src" / f"mod{i:02d}.c").write_text(source_c(i, work))
    (tree / "docs" / "README.md").write_text("Fixture firmware tree.\n")
    (tree / ".gitignore").write_text("make.log\nout/\n.config\n")
    git(tree, "init", "-q")
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", "fixture tree")
    git(tree, "tag", "v0.1.0")
    return tree


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--work", type=int, default=2)
    args = parser.parse_args(argv)
    generate(args.dir, args.sources, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
