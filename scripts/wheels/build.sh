#!/usr/bin/env bash
# Build kflash's release wheels for x86_64, aarch64 and armv7 into dist/.
#
#   scripts/wheels/build.sh [x86_64|aarch64|armv7 ...]   (default: all three)
#
# How: inside a Debian bookworm root (amd64, with arm64 and armhf added as
# foreign architectures) Debian's own Rust, rustc-web (1.85), cross-compiles
# against Debian's std for each target (libstd-rust-web-dev:arm64/armhf) and
# links with Debian's cross gcc against bookworm's glibc 2.36, the glibc of
# Raspberry Pi OS bookworm; maturin (from PyPI) packs abi3 wheels, stripped
# by Cargo.toml's release profile.
# The root, the cargo registry and the target directory are cached outside
# the checkout (scripts/wheels/common.sh); a warm build recompiles only what
# changed. Each wheel is then checked by check_wheel.py (tags, glibc, strip).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIST="$REPO/dist"
MATURIN=maturin==1.16.0
PACKAGES="rustc-web,cargo-web,libstd-rust-web-dev:arm64,libstd-rust-web-dev:armhf"
PACKAGES+=",gcc,libc6-dev,gcc-aarch64-linux-gnu,libc6-dev-arm64-cross"
PACKAGES+=",gcc-arm-linux-gnueabihf,libc6-dev-armhf-cross"
PACKAGES+=",python3,python3-venv,binutils"
MATURIN_STEP="python3 -m venv /opt/maturin && /opt/maturin/bin/pip install --quiet $MATURIN"

declare -A TRIPLE=(
    [x86_64]=x86_64-unknown-linux-gnu
    [aarch64]=aarch64-unknown-linux-gnu
    [armv7]=armv7-unknown-linux-gnueabihf
)
declare -A PLATFORM=([x86_64]=x86_64 [aarch64]=aarch64 [armv7]=armv7l)
declare -A GCC=(
    [x86_64]=gcc
    [aarch64]=aarch64-linux-gnu-gcc
    [armv7]=arm-linux-gnueabihf-gcc
)

archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(x86_64 aarch64 armv7)
for arch in "${archs[@]}"; do
    [ -n "${TRIPLE[$arch]:-}" ] || die "unknown architecture $arch" \
        "(x86_64, aarch64 or armv7)"
done

ensure_host
tarball="$(make_root build amd64,arm64,armhf "$PACKAGES" "$MATURIN_STEP")"
rkey="$(basename "$tarball" .tar.zst)"
root="$CACHE/$rkey"
if [ ! -d "$root" ]; then
    unpack "$tarball" "$root.tmp"
    mv "$root.tmp" "$root"
fi
mkdir -p "$CACHE/cargo-home" "$CACHE/target-$rkey" "$DIST"
out="$(mktemp -d "$CACHE/out.XXXXXX")"
trap 'rm -rf "$out"' EXIT

env=(
    PATH=/usr/lib/rust-web/bin:/opt/maturin/bin:/usr/bin:/bin
    CARGO_HOME=/cache/cargo-home
    CARGO_TARGET_DIR=/cache/target
    CARGO_TERM_COLOR=never
)
for arch in "${archs[@]}"; do
    t="${TRIPLE[$arch]}"
    v="$(echo "$t" | tr a-z- A-Z_)"
    env+=("CARGO_TARGET_${v}_LINKER=${GCC[$arch]}" "CC_${t//-/_}=${GCC[$arch]}")
done

for arch in "${archs[@]}"; do
    start=$SECONDS
    say "building the $arch wheel"
    rm -f "$out"/*.whl
    in_root "$root" --bind "$REPO" /src --bind "$CACHE/cargo-home" /cache/cargo-home \
        --bind "$CACHE/target-$rkey" /cache/target --bind "$out" /out -- \
        "${env[@]}" sh -c 'cd /src && exec maturin build --release \
            --locked --target "$0" --out /out --quiet' "${TRIPLE[$arch]}" ||
        die "the $arch build failed"
    wheel="$(ls "$out"/*.whl)"
    "${PYTHON:-python3}" "$REPO/scripts/wheels/check_wheel.py" "$arch" "$wheel" ||
        die "$(basename "$wheel") fails the checks above"
    # replace this architecture's older wheels, keep the others'
    rm -f "$DIST"/*-cp39-abi3-*_"${PLATFORM[$arch]}".whl
    mv "$wheel" "$DIST/"
    say "$arch: built $(basename "$wheel") in $(elapsed $start)"
done
