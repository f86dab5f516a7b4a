# Shared by scripts/wheels/*.sh (sourced, not run): the cache, the host's tools,
# Debian roots made once per recipe, and running a command inside one.
#
# Everything slow is cached outside the checkout, under $KFLASH_CACHE
# (default ~/.cache/kflash/wheels), each thing named after a hash of the recipe
# that made it: change the recipe and a new one is made; `rm -rf` the folder to
# start cold.

set -euo pipefail

CACHE="${KFLASH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kflash}/wheels"
SUITE=bookworm
# Debian bookworm, which Raspberry Pi OS bookworm is built on (glibc 2.36,
# python3.11). Its main suite carries rustc-web 1.85, the crate's rust-version,
# for every architecture. (bookworm-security has a newer rustc-web, but its armhf
# index was out of sync with its Release file on the mirror reachable here, so
# no root with armhf could be made from it.)
MIRRORS=(
    "deb http://deb.debian.org/debian $SUITE main"
    "deb http://deb.debian.org/debian $SUITE-updates main"
)

say() { echo "wheels: $*" >&2; }
die() { echo "wheels: ERROR: $*" >&2; exit 1; }

# key TEXT...: a short hash naming what TEXT (a recipe) makes.
key() { printf '%s\n' "$@" | sha256sum | cut -c1-12; }

# elapsed SECONDS_SINCE: "12 s" since the given $SECONDS value.
elapsed() { echo "$((SECONDS - $1)) s"; }

# The host tools: Debian's own packages, installed when missing (needs root).
ensure_host() {
    [ "$(id -u)" = 0 ] || die "needs root (mmdebstrap, chroot, binfmt_misc);" \
        "run make wheels as root"
    command -v apt-get >/dev/null || die "needs a Debian-like host (apt-get)"
    local need=() cmd pkg
    for cmd in mmdebstrap:mmdebstrap qemu-aarch64-static:qemu-user-static \
            update-binfmts:binfmt-support zstd:zstd readelf:binutils \
            unshare:util-linux arch-test:arch-test; do
        command -v "${cmd%%:*}" >/dev/null || need+=("${cmd#*:}")
    done
    if [ ${#need[@]} -gt 0 ]; then
        say "installing host packages: ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${need[@]}" >/dev/null
    fi
    # ARM binaries run under qemu-user through binfmt_misc.
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
            die "cannot mount binfmt_misc (a container without it?)"
    fi
    for pkg in qemu-aarch64 qemu-arm; do
        [ -e "/proc/sys/fs/binfmt_misc/$pkg" ] || update-binfmts --enable "$pkg" ||
            die "cannot register $pkg with binfmt_misc"
        # F (fix binary): the interpreter is found outside the chroot too.
        grep -q '^flags: .*F' "/proc/sys/fs/binfmt_misc/$pkg" ||
            die "$pkg is registered without the F flag; chroots cannot run it"
    done
}

# The host's CA bundle goes into every root, so that a TLS proxy the host
# trusts for PyPI and crates.io is trusted inside too.
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

# make_root NAME ARCH PACKAGES [STEP...]: a Debian $SUITE root tarball for ARCH
# (several: comma-separated, the first is native) with PACKAGES (and
# ca-certificates) installed, then each STEP run inside it by sh as root in a
# clean environment. Prints the tarball's path; made once per recipe.
make_root() {
    local name="$1" arch="$2" packages="$3,ca-certificates"
    shift 3
    local recipe=("$SUITE" "$arch" "$packages" "$@" "${MIRRORS[@]}")
    local tarball hooks=() step start=$SECONDS
    tarball="$CACHE/roots/$name-$(key "${recipe[@]}").tar.zst"
    if [ -f "$tarball" ]; then
        echo "$tarball"
        return
    fi
    hooks+=("--customize-hook=cp $CA_BUNDLE \"\$1$CA_BUNDLE\"")
    for step in "$@"; do
        hooks+=("--customize-hook=chroot \"\$1\" /usr/bin/env -i HOME=/root \
LC_ALL=C.UTF-8 PIP_CERT=$CA_BUNDLE PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin sh -euc $(printf %q "$step")")
    done
    mkdir -p "$CACHE/roots"
    say "making the $name root (mmdebstrap, a few minutes; once per recipe)"
    mmdebstrap --quiet --variant=apt --architectures="$arch" \
        --include="$packages" "${hooks[@]}" \
        "$SUITE" "$tarball.tmp.tar.zst" "${MIRRORS[@]}" >&2 ||
        { rm -f "$tarball.tmp.tar.zst"; die "mmdebstrap failed for the $name root"; }
    mv "$tarball.tmp.tar.zst" "$tarball"
    say "made $(basename "$tarball") ($(du -h "$tarball" | cut -f1)) in $(elapsed $start)"
    echo "$tarball"
}

# unpack TARBALL DIR: a fresh copy of a root in DIR.
unpack() {
    rm -rf "$2"
    mkdir -p "$2"
    tar --zstd -xf "$1" -C "$2"
    cp /etc/resolv.conf "$2/etc/resolv.conf"   # PyPI and crates.io from inside
    cp "$CA_BUNDLE" "$2$CA_BUNDLE"
}

# in_root ROOT [--bind SRC DST]... -- CMD...: run CMD as root inside ROOT, with
# /proc, /dev and the given binds mounted in a private mount namespace (so
# they vanish with it, whatever happens). ARM roots run under qemu-user.
in_root() {
    local root="$1" binds=()
    shift
    while [ "$1" = --bind ]; do
        binds+=("$2" "$3")
        shift 3
    done
    [ "$1" = -- ] && shift
    unshare --mount --propagation private -- bash -euc '
        root="$1"; n="$2"; shift 2
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        while [ "$n" -gt 0 ]; do
            mkdir -p "$root$2"
            mount --bind "$1" "$root$2"
            shift 2; n=$((n - 1))
        done
        exec chroot "$root" /usr/bin/env -i HOME=/root LC_ALL=C.UTF-8 \
            PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
            PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin "$@"
    ' in_root "$root" "$((${#binds[@]} / 2))" "${binds[@]}" "$@"
}
